# ddtree-vllm overlay module
"""CPU fix for vLLM 0.26's DFlash context-key normalisation.

``DFlashQwen3Model._normalize_context_k`` normalises the context keys of every drafter layer with one
``ops.rms_norm`` call and a ``[num_layers, head_dim]`` weight, relying on the CUDA kernel to pick the
weight row by the outermost index. The CPU kernel does not: it applies row 0 (layer 0's ``k_norm``)
to every layer, so a drafter with two or more layers drafts from wrong context keys on CPU (measured
on the trained tiny pair: drafter logits off by up to 5.3 of 12.6, flat-DFlash acceptance 1.35
instead of the ~4 the drafter reaches). On CPU we run the same op once per layer instead.
"""

from __future__ import annotations

import torch


def grouped_rms_norm_cpu(x: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x[i]`` with ``weights[i]`` for every layer i (``x``: [L, ..., D], ``weights``:
    [L, D]), with vLLM's own rms_norm op per layer so the numerics match the single-layer case."""
    from vllm import _custom_ops as ops

    if weights.dim() != 2 or weights.shape[0] != x.shape[0] or weights.shape[1] != x.shape[-1]:
        raise ValueError(f"grouped_rms_norm_cpu: weights {tuple(weights.shape)} do not match "
                         f"x {tuple(x.shape)} ([L, D] for x [L, ..., D])")
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        ops.rms_norm(out[i], x[i].contiguous(), weights[i].contiguous(), eps)
    return out
