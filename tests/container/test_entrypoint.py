"""The entrypoint and the model checks outside Docker (fast): settings precedence, refusals before vLLM
starts, and the bench orchestration against a stand-in `vllm` (a tiny HTTP server + a fake bench)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "container" / "entrypoint.sh"
sys.path.insert(0, str(REPO / "container"))
import check_models  # noqa: E402


def run_entrypoint(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, **env}
    return subprocess.run([str(ENTRYPOINT), *args], env=full, capture_output=True, text=True, timeout=timeout)


def test_precedence_env_over_profile_over_flavour_over_defaults():
    r = run_entrypoint({"DRY_RUN": "1", "PROFILE": "dflash", "DDTREE_FLAVOUR": "cpu",
                        "NUM_SPECULATIVE_TOKENS": "7", "MAX_NUM_SEQS": "3"})
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.splitlines()[0])
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "dflash", "model": "/models/dflash-drafter", "num_speculative_tokens": 7}
    assert argv[argv.index("--max-num-seqs") + 1] == "3"          # env beats the cpu flavour's 8
    assert argv[argv.index("--max-model-len") + 1] == "4096"       # the cpu flavour's value
    assert argv[argv.index("--reasoning-parser") + 1] == "qwen3"   # defaults
    r = run_entrypoint({"DRY_RUN": "1", "PROFILE": "baseline", "DDTREE_FLAVOUR": "gb10",
                        "EXTRA_ARGS": "--disable-log-stats"}, "--seed", "5")
    argv = shlex.split(r.stdout)
    assert argv[-3:] == ["--disable-log-stats", "--seed", "5"]
    assert "--speculative-config" not in argv
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"image": 4, "video": 1}'


def test_model_checks_pass_then_exec(tiny_models):
    env = {"PROFILE": "ddtree", "DDTREE_FLAVOUR": "cpu", "MODEL": str(tiny_models / "target"),
           "DRAFTER": str(tiny_models / "drafter"), "VLLM": "echo"}
    r = run_entrypoint(env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"serve {tiny_models / 'target'} ")


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["Qwen3ForCausalLM"]}, "is not a DFlash drafter"),
    ({"vocab_size": 2048}, "drafter vocab_size 2048 != target vocab_size 1024"),
    ({"target_hidden_size": 64}, "drafter target_hidden_size 64 != target hidden_size 128"),
    ({"num_target_layers": 8}, "drafter num_target_layers 8 != target num_hidden_layers 4"),
    ({"dflash_config": {"mask_token_id": 1, "target_layer_ids": [1, 4]}}, "[4] not in 0..3"),
    ({"dflash_config": {"mask_token_id": 1}}, "target_layer_ids is missing"),
])
def test_mismatched_drafter_is_refused(change, message, tiny_models, tmp_path):
    bad = tmp_path / "drafter"
    bad.mkdir()
    cfg = json.loads((tiny_models / "drafter" / "config.json").read_text())
    cfg.update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    env = {"PROFILE": "ddtree", "MODEL": str(tiny_models / "target"), "DRAFTER": str(bad), "VLLM": "echo"}
    r = run_entrypoint(env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "does not match target" in r.stderr
    assert r.stdout == ""  # vLLM never started


def test_too_many_speculative_tokens_is_refused(tiny_models):
    env = {"PROFILE": "dflash", "MODEL": str(tiny_models / "target"), "DRAFTER": str(tiny_models / "drafter"),
           "NUM_SPECULATIVE_TOKENS": "16", "VLLM": "echo"}
    r = run_entrypoint(env)
    assert r.returncode == 2 and "NUM_SPECULATIVE_TOKENS 16 > drafter block_size - 1 (15)" in r.stderr


def test_missing_target_and_baseline_needs_no_drafter(tiny_models, tmp_path):
    r = run_entrypoint({"PROFILE": "baseline", "MODEL": str(tmp_path / "nothing"), "VLLM": "echo"})
    assert r.returncode == 2 and f"target model folder {tmp_path / 'nothing'} does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_entrypoint({"PROFILE": "baseline", "MODEL": str(tmp_path / "empty"), "VLLM": "echo"})
    assert r.returncode == 2 and "has no config.json" in r.stderr
    r = run_entrypoint({"PROFILE": "baseline", "MODEL": str(tiny_models / "target"),
                        "DRAFTER": str(tmp_path / "nothing"), "VLLM": "echo"})
    assert r.returncode == 0, r.stderr


def test_check_models_flat_config(tmp_path):
    """A dense target with a flat config.json (no text_config) is read the same way."""
    target = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 2}
    drafter = {"architectures": ["DFlashDraftModel"], "vocab_size": 10, "hidden_size": 8,
               "block_size": 4, "dflash_config": {"target_layer_ids": [0, 1]}}
    assert check_models.check_drafter(target, drafter, tmp_path, 3) == []
    assert check_models.check_drafter(target, drafter, tmp_path, 4)


FAKE_VLLM = r'''#!/usr/bin/env python3
"""Stand-in for `vllm`: `serve` answers /health on --port until SIGINT; `bench serve` writes a result."""
import http.server, json, os, signal, sys
argv = sys.argv[1:]
if argv[0] == "serve":
    port = int(argv[argv.index("--port") + 1])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a): pass
    srv = http.server.HTTPServer(("127.0.0.1", port), H)
    signal.signal(signal.SIGINT, lambda *a: (open(os.environ["FAKE_MARK"], "w").write("stopped"), os._exit(0)))
    srv.serve_forever()
elif argv[:2] == ["bench", "serve"]:
    d = argv[argv.index("--result-dir") + 1]; name = argv[argv.index("--result-filename") + 1]
    json.dump({"argv": argv, "key": os.environ.get("OPENAI_API_KEY")}, open(os.path.join(d, name), "w"))
'''


def test_bench_profile_runs_server_then_benchmark(tmp_path, tiny_models):
    from servertools import free_port

    fake = tmp_path / "vllm"
    fake.write_text(FAKE_VLLM)
    fake.chmod(0o755)
    port = free_port()
    env = {"PROFILE": "bench-ddtree", "MODEL": str(tiny_models / "target"), "DRAFTER": str(tiny_models / "drafter"),
           "VLLM": f"{sys.executable} {fake}", "PORT": str(port), "BENCH_RESULT_DIR": str(tmp_path / "results"),
           "BENCH_NUM_PROMPTS": "5", "API_KEY": "k", "FAKE_MARK": str(tmp_path / "mark")}
    r = run_entrypoint(env, timeout=120)
    assert r.returncode == 0, r.stderr
    results = list((tmp_path / "results").glob("bench-ddtree-*.json"))
    assert len(results) == 1
    got = json.loads(results[0].read_text())
    assert got["key"] == "k"
    assert got["argv"][got["argv"].index("--num-prompts") + 1] == "5"
    assert got["argv"][got["argv"].index("--base-url") + 1] == f"http://127.0.0.1:{port}"
    assert (tmp_path / "mark").read_text() == "stopped"  # the server was stopped after the benchmark
