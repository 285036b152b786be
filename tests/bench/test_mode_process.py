"""The parent/child protocol of the GPU check scripts (scripts/gpu_ddtree_check.py): a mode's child
runs ``serve_child`` on the config file it was given and prints one RESULT line, which
``run_mode_process`` returns; a child that dies returns None, and ``report_failure`` names its log."""

from __future__ import annotations

from pathlib import Path

import gpu_ddtree_check as gc  # scripts/ is on the path (tests/conftest.py)

CHILD = """
import sys
sys.path.insert(0, {scripts!r})
from gpu_ddtree_check import serve_child

def work(cfg):
    print("noise on stdout")
    if cfg.get("die"):
        raise SystemExit(3)
    return {{"doubled": [2 * x for x in cfg["xs"]]}}

if __name__ == "__main__":
    sys.exit(serve_child(sys.argv[3], work))
"""


def _script(tmp_path: Path) -> str:
    path = tmp_path / "child.py"
    path.write_text(CHILD.format(scripts=str(Path(gc.__file__).parent)))
    return str(path)


def test_round_trip(tmp_path):
    log = tmp_path / "ok.log"
    res, status = gc.run_mode_process(_script(tmp_path), tmp_path, "ok", {"xs": [1, 2]},
                                      gc.child_env(), log, timeout=60)
    assert (res, status) == ({"doubled": [2, 4]}, "0")
    assert "noise on stdout" in log.read_text() and "RESULT" not in log.read_text()
    assert not (tmp_path / "cfg-ok.json").exists()


def test_dead_child(tmp_path, capsys):
    log = tmp_path / "dead.log"
    res, status = gc.run_mode_process(_script(tmp_path), tmp_path, "dead", {"die": True},
                                      gc.child_env(), log, timeout=60)
    assert res is None and status == "3"
    assert gc.report_failure("dead", status, log, lines=3) == "exit 3; see dead.log"
    printed = capsys.readouterr().out
    assert printed.startswith("[dead] FAILED\n") and "noise on stdout" in printed
