"""scripts/lm_eval_llada2.py end to end: vllm serve (tiny LLaDA2, CPU) + lm-eval's OpenAI
completions model on the local 4-document smoke task (no hub access)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm"),
              pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                 reason="needs lm-eval (pip install 'lm-eval[api]==0.4.13')")]

REPO = Path(__file__).resolve().parents[2]


def test_lm_eval_smoke(tiny_llada2, tmp_path):
    out = tmp_path / "lm-eval"
    serve_args = '--enforce-eager --dtype float32 --max-model-len 512 --diffusion-config {"canvas_length":8}'
    p = subprocess.run([sys.executable, str(REPO / "scripts/lm_eval_llada2.py"), "--serve",
                        str(tiny_llada2), "--serve-args", serve_args, "--smoke", "--output",
                        str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    results = list(out.rglob("results_*.json"))
    assert results, list(out.rglob("*"))
    data = json.loads(results[0].read_text())
    assert "llada2_smoke" in data["results"]
    assert data["results"]["llada2_smoke"]["exact_match,none"] >= 0.0
