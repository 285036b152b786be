"""vLLM 0.26's CPU rms_norm applies row 0 of a per-layer [L, D] weight to every layer; the overlay
``dflash-cpu-grouped-k-norm`` makes DFlash's context-key norm run per layer on CPU. Without it a
multi-layer drafter (the trained pair's has 2) drafts from wrong keys on CPU."""
import pytest
import torch

dflash_cpu = pytest.importorskip("vllm.v1.spec_decode.dflash_cpu")


def naive_grouped_rms_norm(x, w, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y * w.float().view(w.shape[0], *([1] * (x.dim() - 2)), w.shape[1])


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_grouped_rms_norm_cpu_matches_naive(layers):
    g = torch.Generator().manual_seed(layers)
    x = torch.randn(layers, 7, 2, 64, generator=g).to(torch.bfloat16)
    w = (torch.randn(layers, 64, generator=g) * 2).to(torch.bfloat16)
    out = dflash_cpu.grouped_rms_norm_cpu(x, w, 1e-6)
    torch.testing.assert_close(out.float(), naive_grouped_rms_norm(x, w, 1e-6), atol=0.06, rtol=0.02)


def test_patched_drafter_normalises_each_layer_with_its_own_weight():
    from vllm.model_executor.models.qwen3_dflash import DFlashQwen3Model

    model = DFlashQwen3Model.__new__(DFlashQwen3Model)  # only the fields the method reads
    g = torch.Generator().manual_seed(0)
    model._k_norm_weights = (torch.randn(2, 64, generator=g) * 2).to(torch.bfloat16)
    model._rms_norm_eps = 1e-6
    all_k = torch.randn(2, 5, 2, 64, generator=g).to(torch.bfloat16)
    out = model._normalize_context_k(all_k)
    torch.testing.assert_close(out.float(), naive_grouped_rms_norm(all_k, model._k_norm_weights, 1e-6),
                               atol=0.06, rtol=0.02)


def test_bad_weight_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="do not match"):
        dflash_cpu.grouped_rms_norm_cpu(torch.zeros(2, 3, 64), torch.ones(3, 64), 1e-6)
