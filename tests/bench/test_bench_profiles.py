"""Benchmark profiles: the prompt sets, the physical bound, and (slow) one profile run end to end on
CPU against the tiny models through vLLM's own benchmark client."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import physical_bound  # noqa: E402
import profiles  # noqa: E402
import prompt_sets  # noqa: E402


def test_prompt_sets_are_deterministic_and_categorised(tmp_path):
    a = prompt_sets.build(tmp_path / "a", per_category=20, max_chars=400)
    b = prompt_sets.build(tmp_path / "b", per_category=20, max_chars=400,
                          categories=("prose", "docmath"))      # (code scans the whole stdlib: slow)
    assert set(a) == set(prompt_sets.CATEGORIES)
    for cat in b:
        assert a[cat]["sha256"] == b[cat]["sha256"]
    for cat in prompt_sets.CATEGORIES:
        rows = [json.loads(l) for l in Path(a[cat]["path"]).read_text().splitlines()]
        assert len(rows) == a[cat]["count"] == 20
        assert all(0 < len(r["prompt"]) <= 400 for r in rows)
    code = Path(a["code"]["path"]).read_text()
    assert "def " in code or "class " in code
    with pytest.raises(ValueError, match="categories"):
        prompt_sets.build(tmp_path / "c", categories=("poetry",))


def test_every_profile_is_well_formed():
    for p in profiles.PROFILES.values():
        assert p.modes and p.concurrency and p.categories
        assert len({m.name for m in p.modes}) == len(p.modes), p.name
        for _, cat, c, _ in p.points():
            assert cat in prompt_sets.CATEGORIES
            assert c <= p.max_num_seqs, p.name
            assert p.requests(c) >= c or p.requests(c) == p.max_requests
        for m in p.all_modes():  # per-request shapes within their server's maxima
            if m.xargs:
                assert m.xargs["ddtree_budget"] <= m.spec["ddtree_budget"]
                assert m.xargs["ddtree_top_k"] <= m.spec["ddtree_top_k"]
        if any(m.pick_best for m in p.all_modes()):
            assert p.best_of and all(cat in p.categories and c in p.concurrency for cat, c in p.best_of)
    sweep = profiles.PROFILES["gpu-ddtree-sweep"]
    # every shape on one server at the sweep's maxima, the shape itself sent per request
    mode = next(m for m in sweep.modes if m.name == "ddtree-b32-k2")
    assert mode.speculative_config("/d") == {"method": "dflash_ddtree", "ddtree_budget": 64,
                                             "ddtree_top_k": 8, "model": "/d"}
    assert mode.xargs == {"ddtree_budget": 32, "ddtree_top_k": 2}
    assert sweep.servers() == ["dflash", "ddtree-server-b64-k8"]
    twelve = profiles.PROFILES["gpu-sweep-12min"]
    assert twelve.servers() == ["ddtree-server-b64-k8", "dflash", "nospec"]
    assert "--enforce-eager" in twelve.extra_server_args
    curve = profiles.PROFILES["gpu-ddtree-curve"]  # the sweep's server shape, so points compare
    assert curve.servers() == ["ddtree-server-b64-k8"] and len(curve.points()) == 21
    assert {m.xargs["ddtree_budget"] for m, *_ in curve.points()} == {32}
    assert curve.extra_server_args == twelve.extra_server_args and curve.output_len == twelve.output_len


def _write_model(folder: Path, cfg: dict, nbytes: int) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"\0" * nbytes)


def test_physical_bound_from_config_and_bandwidth(tmp_path):
    text = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
            "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4, "mamba_ssm_dtype": "float32"}
    _write_model(tmp_path / "target", {"text_config": text}, 1_000_000)
    _write_model(tmp_path / "drafter", {"hidden_size": 64}, 250_000)
    sizes = physical_bound.model_bytes(tmp_path / "target", tmp_path / "drafter")
    assert sizes["kv_bytes_per_token"] == 1 * 2 * 2 * 16 * 2
    conv_dim = 2 * 2 * 8 + 4 * 8
    assert sizes["gdn_state_bytes_per_request"] == 3 * (4 * 8 * 8 * 4 + conv_dim * 3 * 2)
    bw = {"bytes_per_s": 2e12}
    b1 = physical_bound.bound_tokens_per_s(sizes, bw, 1, 1.0, False, 100, 100)
    step = 1_000_000 + sizes["kv_bytes_per_token"] * 150 + 2 * sizes["gdn_state_bytes_per_request"]
    assert b1["bytes_per_step"] == pytest.approx(step)
    assert b1["tokens_per_s"] == pytest.approx(2e12 / step)
    # speculation reads the drafter too and commits AL tokens per step
    b2 = physical_bound.bound_tokens_per_s(sizes, bw, 1, 4.0, True, 100, 100)
    assert b2["tokens_per_s"] == pytest.approx(4 * 2e12 / (step + 250_000))
    assert physical_bound.bound_tokens_per_s(sizes, None, 1, 1.0, False, 1, 1) is None


def test_device_slug_names_the_device():
    import run_profile
    assert run_profile.device_slug({"kind": "gpu", "device": "NVIDIA H100 80GB HBM3"}) == "h100"
    assert run_profile.device_slug({"kind": "cpu", "device": "CPU AMD EPYC 7B13 (2 cores)"}) == \
        "cpu-amd-epyc-7b13"


@pytest.mark.slow
def test_cpu_smoke_profile_end_to_end(tiny_models, tmp_path):
    pytest.importorskip("pandas", reason="vllm bench serve's custom dataset reads JSONL with pandas")
    import run_profile
    out = tmp_path / "out"
    rc = run_profile.main(["--profile", "cpu-smoke", "--models", str(tiny_models), "--out", str(out),
                           "--prompts-dir", str(tmp_path / "prompts"), "--model-label", "tiny (test)"])
    doc = json.loads((out / "results.json").read_text())
    assert rc == 0, json.dumps(doc.get("servers"), indent=1)[-3000:]
    assert doc["device"]["device"] and doc["device"]["kind"] == "cpu"
    points = doc["points"]
    assert [(p["mode"], p["category"], p["concurrency"]) for p in points] == \
        [("dflash", "code", 1), ("dflash", "code", 2)]
    for p in points:
        assert p["completed"] == p["requests"] and p["failed"] == 0
        assert p["total_output_tokens"] == p["requests"] * profiles.PROFILES["cpu-smoke"].output_len
        assert p["output_throughput"] > 0 and p["p50_ttft_ms"] > 0
        sd = p["spec_decode"]
        assert sd["drafts"] > 0 and sd["draft_tokens"] == sd["drafts"] * profiles.DFLASH_DEPTH
        assert 1.0 <= sd["acceptance_length"] <= 1 + profiles.DFLASH_DEPTH
        assert p["bench"]["client_argv"][:3] == ["vllm", "bench", "serve"]
    summary = (out / "summary.md").read_text()
    assert doc["device"]["device"] in summary and "dflash" in summary
