"""vLLM engine on the tiny LLaDA2 checkpoint (CPU): model forward and block decode against the
plain-torch reference, token for token; invalid settings rejected with clear messages."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")]

CHECK = Path(__file__).with_name("engine_check.py")
REPO = Path(__file__).resolve().parents[2]


def _run(*args, timeout=900) -> dict:
    p = subprocess.run([sys.executable, str(CHECK), *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
    for line in p.stdout.splitlines():
        if line.startswith("ENGINE_CHECK_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise AssertionError(f"engine_check {args} failed (rc={p.returncode}):\n"
                         + "\n".join((p.stdout + p.stderr).splitlines()[-40:]))


def test_vllm_forward_equals_reference(tiny_llada2):
    r = _run("forward", tiny_llada2)
    # float32 on both sides: only summation-order round-off remains
    assert r["max_abs_logprob_diff"] < 1e-4


@pytest.mark.parametrize("concurrency", [1, 8])
def test_block_decode_equals_reference(tiny_llada2, concurrency):
    r = _run("batch", tiny_llada2, concurrency)
    bad = [row for row in r["rows"] if not row["equal"]]
    assert not bad, json.dumps(bad, indent=1)
    assert len(r["rows"]) == 8


def test_invalid_request_settings(tiny_llada2):
    errors = _run("invalid", tiny_llada2)["errors"]
    assert "threshold must be in (0, 1]" in errors["threshold_zero"]
    assert "threshold must be in (0, 1]" in errors["threshold_above_one"]
    assert "block_length must be a positive integer" in errors["block_length_zero"]
    assert "exceeds the server's block length" in errors["block_length_too_big"]
    assert "max_steps must be in [1, block_length=4]" in errors["max_steps_too_big"]
    assert "unknown LLaDA2 request setting" in errors["typo_key"]


def test_diffusion_config_rejected_for_non_llada2_model(tiny_models):
    code = (
        "import json, sys\n"
        "from vllm.engine.arg_utils import EngineArgs\n"
        "try:\n"
        "    EngineArgs(model=sys.argv[1], language_model_only=True, enforce_eager=True,\n"
        "               diffusion_config={'canvas_length': 8}).create_engine_config()\n"
        "    print('NO_ERROR')\n"
        "except ValueError as e:\n"
        "    print('ERROR', e)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tiny_models / "target")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert "needs a block-diffusion model" in p.stdout, (p.stdout + p.stderr)[-3000:]
