"""The one-command GPU check (scripts/gpu_llada2_check.sh) in its CPU dry-run form, from a copy of
the tracked files only (the GPU host gets nothing else). The bf16 and benchmark parts are left out
here to keep the suite short (test_engine covers the decode; run the full dry run by hand:
``bash scripts/gpu_llada2_check.sh /tmp/x --device cpu --quick``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")]
REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_from_tracked_files(tmp_path):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    checkout = tmp_path / "checkout"
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():  # the working-tree version of every tracked file
            (checkout / f).parent.mkdir(parents=True, exist_ok=True)
            (checkout / f).write_bytes(src.read_bytes())
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, VLLM_SITE=str(tmp_path / "no-bundle"))
    env.pop("PYTHONPATH", None)
    p = subprocess.run(["bash", "scripts/gpu_llada2_check.sh", str(out), "--device", "cpu",
                        "--quick", "--skip-bench", "--skip-bf16"], cwd=checkout, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    eq = summary["parts"]["equality_float32"]["result"]
    assert eq["strict_equal"] and eq["requests"] == 5
    assert sum(r["sampling"]["temperature"] > 0 for r in eq["rows"]) == 2
    assert sorted(x.name for x in out.iterdir()) == ["logs.tgz", "summary.json", "summary.md"]
    assert "engine == reference" in (out / "summary.md").read_text()
