"""Run a helper script of the tests in a fresh Python process (one vLLM engine per process: several
engines in one process trip over vLLM's kernel registration) and read its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_json_child(script: Path, cfg: dict, env: dict | None = None, timeout: float = 1200,
                   what: str = "child") -> dict:
    """``python SCRIPT JSON(cfg)`` with this checkout importable; the child prints one line
    ``RESULT <json>``, which is returned. Fails with the child's output tails when it printed none."""
    e = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    p = subprocess.run([sys.executable, str(script), json.dumps(cfg)], capture_output=True,
                       text=True, env=e, timeout=timeout, cwd=REPO)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, f"{what} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(line[len("RESULT "):])
