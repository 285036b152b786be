"""method="dflash_ddtree" through the Python API, --speculative-config JSON and the CLI, on the
patched vLLM installed in the test venv (no engine is started: only the config is built)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
from vllm.config import SpeculativeConfig  # noqa: E402
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

BASE = ["--language-model-only", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "8"]


def _engine_config(tiny_models, spec: dict):
    args = EngineArgs(model=str(tiny_models / "target"), language_model_only=True,
                      enforce_eager=True, max_model_len=2048, max_num_seqs=8,
                      speculative_config=spec)
    return args.create_engine_config()


def _cli_config(tiny_models, argv: list[str]):
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    ns = parser.parse_args(["--model", str(tiny_models / "target"), *BASE, *argv])
    return AsyncEngineArgs.from_cli_args(ns).create_engine_config()


def test_python_api(tiny_models):
    sc = _engine_config(tiny_models, {"method": "dflash_ddtree", "model": str(tiny_models / "drafter"),
                                      "ddtree_budget": 24, "ddtree_top_k": 4,
                                      "ddtree_chain_seed": False}).speculative_config
    assert sc.use_ddtree() and sc.use_dflash()
    assert (sc.ddtree_budget, sc.ddtree_top_k, sc.ddtree_chain_seed) == (24, 4, False)
    # the drafter depth defaults to its block_size - 1 (block 16); on CPU the tree path runs, so the
    # scheduler gets one speculative slot per tree node
    assert sc.use_ddtree_tree() and sc.ddtree_fallback is None
    assert sc.ddtree_max_depth == 15 and sc.num_speculative_tokens == 24
    assert "dflash_ddtree" in repr(sc) and "budget=24" in repr(sc)


def test_defaults(tiny_models):
    sc = _engine_config(tiny_models, {"method": "dflash_ddtree",
                                      "model": str(tiny_models / "drafter")}).speculative_config
    assert (sc.ddtree_budget, sc.ddtree_top_k, sc.ddtree_chain_seed) == (32, 8, True)
    assert sc.num_speculative_tokens == 32 and sc.ddtree_max_depth == 15


def test_small_budget_limits_the_depth(tiny_models):
    sc = _engine_config(tiny_models, {"method": "dflash_ddtree", "model": str(tiny_models / "drafter"),
                                      "ddtree_budget": 6}).speculative_config
    assert sc.ddtree_max_depth == 6 and sc.num_speculative_tokens == 6


def test_chain_fallback_runs_min_depth_budget(tiny_models, monkeypatch):
    monkeypatch.setenv("DDTREE_FORCE_CHAIN", "1")
    sc = _engine_config(tiny_models, {"method": "dflash_ddtree", "model": str(tiny_models / "drafter"),
                                      "ddtree_budget": 40}).speculative_config
    assert sc.use_ddtree() and not sc.use_ddtree_tree()
    assert sc.ddtree_fallback == "DDTREE_FORCE_CHAIN=1"
    # flat DFlash over the top-1 chain: min(L, budget) tokens per step
    assert sc.num_speculative_tokens == 15


def test_cli_json(tiny_models):
    spec = {"method": "dflash_ddtree", "model": str(tiny_models / "drafter"), "ddtree_budget": 12,
            "ddtree_top_k": 2}
    sc = _cli_config(tiny_models, ["--speculative-config", json.dumps(spec)]).speculative_config
    assert sc.use_ddtree() and (sc.ddtree_budget, sc.ddtree_top_k) == (12, 2)


def test_cli_dotted_keys(tiny_models):
    sc = _cli_config(tiny_models, [
        "--speculative-config.method", "dflash_ddtree",
        "--speculative-config.model", str(tiny_models / "drafter"),
        "--speculative-config.ddtree_budget", "20",
        "--speculative-config.ddtree_chain_seed", "false"]).speculative_config
    assert sc.use_ddtree() and sc.ddtree_budget == 20 and sc.ddtree_chain_seed is False


def test_plain_dflash_is_not_ddtree(tiny_models):
    sc = _engine_config(tiny_models, {"method": "dflash", "model": str(tiny_models / "drafter"),
                                      "num_speculative_tokens": 15}).speculative_config
    assert not sc.use_ddtree() and sc.ddtree_budget is None


@pytest.mark.parametrize("extra, field", [
    ({"ddtree_budget": 0}, "ddtree_budget"),
    ({"ddtree_budget": -3}, "ddtree_budget"),
    ({"ddtree_budget": 129}, "ddtree_budget"),
    ({"ddtree_top_k": 0}, "ddtree_top_k"),
    ({"ddtree_top_k": 33}, "ddtree_top_k"),
    ({"rejection_sample_method": "synthetic", "synthetic_acceptance_length": 2.0},
     "rejection_sample_method"),
    ({"draft_sample_method": "probabilistic"}, "draft_sample_method"),
    ({"num_speculative_tokens": 40}, "num_speculative_tokens"),
])
def test_invalid_values_name_the_field(tiny_models, extra, field):
    spec = {"method": "dflash_ddtree", "model": str(tiny_models / "drafter"), **extra}
    with pytest.raises(Exception) as ei:
        _engine_config(tiny_models, spec)
    assert f"speculative_config.{field}" in str(ei.value)


def test_drafter_that_is_not_dflash(tiny_models):
    with pytest.raises(Exception) as ei:
        _engine_config(tiny_models, {"method": "dflash_ddtree", "model": str(tiny_models / "target")})
    msg = str(ei.value)
    assert "speculative_config.model" in msg and "DFlashDraftModel" in msg


def test_ddtree_fields_need_the_ddtree_method(tiny_models):
    with pytest.raises(Exception) as ei:
        SpeculativeConfig(method="ngram", ddtree_budget=8, prompt_lookup_max=3,
                          num_speculative_tokens=3)
    assert "speculative_config.ddtree_budget" in str(ei.value)


def test_invalid_value_from_the_cli_fails_at_startup(tiny_models):
    spec = {"method": "dflash_ddtree", "model": str(tiny_models / "drafter"), "ddtree_top_k": 0}
    with pytest.raises(Exception) as ei:
        _cli_config(tiny_models, ["--speculative-config", json.dumps(spec)])
    assert "speculative_config.ddtree_top_k" in str(ei.value)


# ----------------------------------------------------------------------------- CUDA decisions


class _FakeCuda:
    device_name = "cuda"

    def is_cpu(self):
        return False

    def is_cuda(self):
        return True


def _sc(layer_types=None, budget=16):
    from types import SimpleNamespace

    draft = SimpleNamespace(hf_config=SimpleNamespace(layer_types=layer_types))
    sc = SimpleNamespace(ddtree_budget=budget, ddtree_max_depth=min(15, budget), ddtree_fallback=None,
                         num_speculative_tokens=budget, draft_model_config=draft)
    sc.use_ddtree_tree = lambda: sc.ddtree_fallback is None
    return sc


@pytest.fixture
def fake_cuda(monkeypatch):
    import vllm.platforms as platforms

    monkeypatch.setattr(platforms, "_current_platform", _FakeCuda(), raising=False)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.delenv("VLLM_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("DDTREE_FORCE_CHAIN", raising=False)
    monkeypatch.delenv("DDTREE_V2_TREE", raising=False)
    from vllm.platforms import current_platform

    assert current_platform.is_cuda()


def test_cuda_tree_path_reasons(fake_cuda, monkeypatch):
    from vllm.config.ddtree import tree_path_unsupported_reason

    assert tree_path_unsupported_reason(_sc(["full_attention"])) is None
    # the V2 runner (forced by a mixed sliding/full drafter, or chosen) verifies trees by default
    # (GPU-verified); DDTREE_V2_TREE=0 rolls it back to flat DFlash, the reason naming V2 and why
    mixed = ["sliding_attention", "full_attention"]
    assert tree_path_unsupported_reason(_sc(mixed)) is None
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert tree_path_unsupported_reason(_sc()) is None
    monkeypatch.setenv("DDTREE_V2_TREE", "0")
    reason = tree_path_unsupported_reason(_sc())
    assert "V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1)" in reason and "DDTREE_V2_TREE=0" in reason
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    assert "mixes sliding and full" in tree_path_unsupported_reason(_sc(mixed))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    monkeypatch.setenv("DDTREE_V2_TREE", "1")
    assert tree_path_unsupported_reason(_sc()) is None
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    assert tree_path_unsupported_reason(_sc(mixed)) is None
    monkeypatch.delenv("DDTREE_V2_TREE")
    assert tree_path_unsupported_reason(_sc(["full_attention"])) is None  # V1: switch irrelevant
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "FLASHINFER")
    assert tree_path_unsupported_reason(_sc()) is None
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "FLEX_ATTENTION")
    assert "FLEX_ATTENTION" in tree_path_unsupported_reason(_sc())


def _vllm_config(sc, backend=None, mode="FULL_AND_PIECEWISE", async_sched=True, kv_dtype="auto"):
    from types import SimpleNamespace

    from vllm.config.compilation import CUDAGraphMode

    return SimpleNamespace(speculative_config=sc, attention_config=SimpleNamespace(backend=backend),
                           cache_config=SimpleNamespace(cache_dtype=kv_dtype),
                           scheduler_config=SimpleNamespace(async_scheduling=async_sched),
                           compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[mode]))


def test_cuda_engine_settings_for_tree_verify(fake_cuda):
    from vllm.config.compilation import CUDAGraphMode
    from vllm.config.ddtree import ddtree_graph_mode

    cfg = _vllm_config(_sc())
    ddtree_graph_mode(cfg)
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert cfg.scheduler_config.async_scheduling is False
    assert cfg.speculative_config.ddtree_fallback is None
    eager = _vllm_config(_sc(), mode="NONE")
    ddtree_graph_mode(eager)
    assert eager.compilation_config.cudagraph_mode == CUDAGraphMode.NONE


def test_cuda_unreadable_backend_falls_back_to_flat_dflash(fake_cuda):
    from vllm.config.compilation import CUDAGraphMode
    from vllm.config.ddtree import ddtree_graph_mode

    cfg = _vllm_config(_sc(budget=32), backend="FLEX_ATTENTION")
    ddtree_graph_mode(cfg)
    sc = cfg.speculative_config
    assert sc.ddtree_fallback is not None and "FLEX_ATTENTION" in sc.ddtree_fallback
    assert sc.num_speculative_tokens == 15  # flat DFlash over min(L, budget)
    # flat DFlash keeps vLLM's own graph and scheduling choices
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
    assert cfg.scheduler_config.async_scheduling is True


def test_cuda_quantized_kv_cache_falls_back(fake_cuda):
    from vllm.config.ddtree import ddtree_graph_mode

    cfg = _vllm_config(_sc(), kv_dtype="fp8_e4m3")
    ddtree_graph_mode(cfg)
    assert "fp8_e4m3" in cfg.speculative_config.ddtree_fallback
    ok = _vllm_config(_sc(), kv_dtype="bfloat16")
    ddtree_graph_mode(ok)
    assert ok.speculative_config.ddtree_fallback is None
