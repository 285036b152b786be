"""A server start that times out leaves every Python process's thread stacks in the server log.

``VllmServer.start`` gives up after its timeout; before it kills the server it sends SIGUSR1 to the
armed Python processes of the server's process group (``scripts/stackdump/sitecustomize.py`` armed
them), so the log the benchmark runner keeps shows where each one was stuck. The fast test uses a
stand-in server (a parent and a spawned child that never answer /health); the slow one asks a real
tiny ``vllm serve`` for its stacks and finds the engine core's.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

import servertools
from servertools import CPU_TINY_FLAGS, STACKS_ENV, VllmServer

STANDIN = textwrap.dedent("""
    import multiprocessing as mp, sys, time

    def child_stuck_in_startup():
        time.sleep(600)

    if __name__ == "__main__":
        ctx = mp.get_context(sys.argv[1])
        p = ctx.Process(target=child_stuck_in_startup, daemon=True)
        p.start()
        print("standin up", flush=True)
        time.sleep(600)
""")


class _StandIn(VllmServer):
    def __init__(self, script, start_method, *a, **kw):
        super().__init__(*a, **kw)
        self._script, self._start_method = str(script), start_method

    def command(self):
        return [sys.executable, self._script, self._start_method]


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_timeout_dumps_stacks_of_parent_and_child(tmp_path, start_method):
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    log = tmp_path / "server.log"
    server = _StandIn(script, start_method, "unused-model", [], log)
    # parent, child, and under spawn multiprocessing's resource tracker (vLLM has one too)
    with pytest.raises(TimeoutError, match="stacks of [23] processes"):
        server.start(timeout=4)
    text = log.read_text()
    chunks = text.split("[servertools ")[1:]  # a header per process, each followed by its dump
    dumps, end_note = chunks[:-1], chunks[-1]
    assert len(dumps) in (2, 3) and end_note.startswith(tuple("0123456789")), text
    assert all("most recent call first" in c for c in dumps), text
    # each process wrote its own stack below its own header: the child is inside its target, the
    # parent in its main block
    assert sum("child_stuck_in_startup" in c for c in dumps) == 1, text
    assert sum("standin.py\", line" in c and "child_stuck_in_startup" not in c for c in dumps) == 1, text
    assert server.proc.poll() is not None  # stopped after the dump


def test_stack_dumps_can_be_turned_off(tmp_path):
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    log = tmp_path / "server.log"
    server = _StandIn(script, "spawn", "unused-model", [], log, env={STACKS_ENV: "0"})
    assert str(servertools.STACKDUMP_DIR) not in server.env["PYTHONPATH"]
    with pytest.raises(TimeoutError, match="stacks of 0 processes"):
        server.start(timeout=3)
    assert "most recent call first" not in log.read_text()


def test_sitecustomize_chains_to_the_next_one(tmp_path):
    """Shadowing the system's sitecustomize must not lose it: ours runs the next one found."""
    import os
    import subprocess

    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_SITE_RAN = True\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(servertools.STACKDUMP_DIR), str(other)]),
               **{STACKS_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", "import builtins, faulthandler, sys; "
                          "print(getattr(builtins, 'OTHER_SITE_RAN', False), "
                          "sys.modules['sitecustomize'].__file__)"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert out[1].startswith(str(servertools.STACKDUMP_DIR))


@pytest.mark.slow
def test_real_server_engine_core_stacks_land_in_log(log_dir):
    """A real tiny `vllm serve` (multiprocess engine): the engine core's stacks reach the log."""
    from pathlib import Path

    target = Path(servertools.REPO) / "models" / "tiny-pair" / "target"
    log = log_dir / "stackdump-server.log"
    server = VllmServer(target, CPU_TINY_FLAGS + ["--mamba-ssm-cache-dtype", "float32"], log)
    server.start(timeout=600)
    try:
        pids = server.dump_stacks()
    finally:
        server.stop()
    text = log.read_text(errors="replace")
    assert len(pids) >= 2, text[-4000:]
    # the engine core process (renamed VLLM::EngineCore by vLLM; its busy loop lives in
    # vllm/v1/engine/core.py) dumped its own threads under its header
    dumps = text.split("[servertools ")
    engine = [d for d in dumps if "VLLM::EngineCore" in d.split("\n", 1)[0]]
    assert engine, text[-6000:]
    assert "most recent call first" in engine[0] and "vllm/v1/engine/core.py" in engine[0], engine[0]


def test_periodic_dumps_stop_after_their_window(tmp_path):
    """DDTREE_STACKS_EVERY_S dumps repeatedly, and only for DDTREE_STACKS_FOR_S seconds."""
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(servertools.STACKDUMP_DIR), DDTREE_STACKS_EVERY_S="0.3",
               DDTREE_STACKS_FOR_S="1.0")
    env.pop(STACKS_ENV, None)
    p = subprocess.run([sys.executable, "-c", "import time\ndef waiting_here():\n    time.sleep(3)\n"
                        "waiting_here()"], env=env, capture_output=True, text=True, timeout=60)
    dumps = p.stderr.count("waiting_here")
    assert 2 <= dumps <= 4, p.stderr  # ~3 in the first second, none in the two after


def test_periodic_dumps_survive_busy_threads_and_name_them():
    """The periodic dumps read frames under the GIL: a process whose threads are busy calling
    Python survives dumps every 2 ms (faulthandler.dump_traceback_later, used before, segfaults
    such a process: it killed vLLM engine cores on the H100), and each thread comes with its name."""
    import json
    import os
    import subprocess

    stress = servertools.STACKDUMP_DIR / "stress_check.py"
    p = subprocess.run([sys.executable, str(stress), "--trials", "2", "--seconds", "2"],
                       capture_output=True, text=True, timeout=300)
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    assert doc["gil-thread"] == [0, 0], (doc, p.stderr[-2000:])

    env = dict(os.environ, PYTHONPATH=str(servertools.STACKDUMP_DIR), DDTREE_STACKS_EVERY_S="0.05")
    env.pop(STACKS_ENV, None)
    code = ("import threading, time\n"
            "def spinning_here(end):\n"
            "    while time.monotonic() < end: sum(range(50))\n"
            "end = time.monotonic() + 1\n"
            "t = threading.Thread(target=spinning_here, args=(end,), name='spinner'); t.start()\n"
            "spinning_here(end); t.join()\n")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[spinner] (most recent call first)" in p.stderr and "in spinning_here" in p.stderr, p.stderr[-2000:]
    assert "[ddtree-stacks]" not in p.stderr  # the dumping thread leaves itself out
