"""The LLaDA2 config hook's engine settings, GPU ones included (checked on CPU with a pretend
CUDA-graph platform): PIECEWISE graphs, non-causal backend selection, async scheduling and cascade
attention off, sampling-parameter mapping."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")


def _config(cudagraph_mode=None, backend=None, async_scheduling=None):
    hf = SimpleNamespace(canvas_length=8, model_type="llada2_moe", architectures=[
        "LLaDA2MoeModelLM"], mask_token_id=5)
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf, disable_cascade_attn=False),
        cache_config=SimpleNamespace(enable_prefix_caching=True),
        scheduler_config=SimpleNamespace(async_scheduling=async_scheduling,
                                         max_num_batched_tokens=2048),
        attention_config=SimpleNamespace(backend=backend, use_non_causal=False),
        compilation_config=SimpleNamespace(cudagraph_mode=cudagraph_mode),
        diffusion_config=SimpleNamespace(canvas_length=8, max_denoising_steps=None))


@pytest.fixture
def block(monkeypatch):
    from vllm.platforms import current_platform
    from vllm.v1.worker import llada2_block

    if not hasattr(llada2_block, "_configure_attention_and_graphs"):
        pytest.skip("the installed vllm carries an older llada2_block overlay")
    monkeypatch.setattr(type(current_platform), "support_static_graph_mode",
                        classmethod(lambda cls: True))
    return llada2_block


@pytest.mark.parametrize("mode,want", [(None, "PIECEWISE"), ("FULL_AND_PIECEWISE", "PIECEWISE"),
                                       ("FULL_DECODE_ONLY", "PIECEWISE"), ("FULL", "PIECEWISE"),
                                       ("PIECEWISE", "PIECEWISE"), ("NONE", "NONE")])
def test_cuda_graph_mode(block, mode, want):
    from vllm.config.compilation import CUDAGraphMode

    cfg = _config(cudagraph_mode=None if mode is None else CUDAGraphMode[mode])
    block.LLaDA2BlockDiffusionConfig.verify_and_update_config(cfg)
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode[want]


def test_engine_settings(block):
    cfg = _config()
    block.LLaDA2BlockDiffusionConfig.verify_and_update_config(cfg)
    assert cfg.attention_config.use_non_causal is True
    assert cfg.scheduler_config.async_scheduling is False  # unset would mean "on" on GPU
    assert cfg.cache_config.enable_prefix_caching is False
    assert cfg.model_config.disable_cascade_attn is True
    # an explicitly chosen backend is left to vLLM's selector (which rejects a causal-only one)
    cfg = _config(backend="FLASH_ATTN", async_scheduling=True)
    block.LLaDA2BlockDiffusionConfig.verify_and_update_config(cfg)
    assert cfg.attention_config.use_non_causal is False
    assert cfg.scheduler_config.async_scheduling is False


def test_sampling_settings_mapping(block):
    from vllm import SamplingParams

    s = block.sampling_settings(SamplingParams(temperature=0.0, seed=3))
    assert s.greedy
    s = block.sampling_settings(SamplingParams(temperature=0.8, top_k=-1, top_p=0.9, seed=3))
    assert (s.temperature, s.top_k, s.top_p, s.seed) == (0.8, -1, 0.9, 3) and not s.greedy
    # below vLLM's greedy cut-off (SamplingParams itself lifts such values to 0.01)
    assert block.sampling_settings(SimpleNamespace(temperature=1e-6, top_k=0, top_p=1.0,
                                                   seed=None)).greedy


@pytest.mark.parametrize("fa4", [False, True])
def test_cuda_backend_without_fa4(block, monkeypatch, fa4):
    """On CUDA without FlashAttention 4's `cutlass` package the hook picks TRITON_ATTN (vLLM would
    upgrade FLASH_ATTN to FA4 for a diffusion model and fail at the first forward); with it, the
    auto-selection stays vLLM's."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    monkeypatch.setattr(block, "_fa4_importable", lambda: fa4)
    cfg = _config()
    block.LLaDA2BlockDiffusionConfig.verify_and_update_config(cfg)
    assert cfg.attention_config.use_non_causal is True
    assert cfg.attention_config.backend == (None if fa4 else AttentionBackendEnum.TRITON_ATTN)
    # an explicit choice is never overridden
    cfg = _config(backend="FLASH_ATTN")
    block.LLaDA2BlockDiffusionConfig.verify_and_update_config(cfg)
    assert cfg.attention_config.backend == "FLASH_ATTN"
