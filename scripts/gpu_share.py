"""Engine memory settings for GPU checks that run side by side on one GPU.

The device lease is short, so independent correctness checks (V1, V2, FlashInfer, LLaDA2) and the
drafter training run at the same time on one H100. Two vLLM settings make that work:

- ``DDTREE_GPU_MEM_UTIL``: ``gpu_memory_utilization`` for each engine. vLLM refuses to start when
  less than this fraction of the whole GPU is free, so concurrent engines need a small one.
- ``DDTREE_KV_CACHE_GIB``: a fixed KV cache (``kv_cache_memory_bytes``). vLLM then skips its memory
  profile, whose assertion "initial free memory >= free memory after profiling" fails whenever
  another process on the GPU frees memory during the profile run.

``gdn_prefill_config()`` is the one other engine setting they all share (the GDN prefill backend).

Unset, the scripts keep their own defaults (one engine owning the GPU). Timings taken while the
GPU is shared are not benchmark numbers; the checks record ``gpu_shared`` in their results.
"""
from __future__ import annotations

import os


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    return value


def engine_memory_kwargs(default_util: float) -> dict:
    """``LLM(...)`` keyword arguments for GPU memory: the script's ``default_util`` unless the
    environment asks for a shared-GPU setting (module docstring)."""
    util = _env_float("DDTREE_GPU_MEM_UTIL")
    if util is not None and not 0.0 < util <= 1.0:
        raise ValueError(f"DDTREE_GPU_MEM_UTIL must be in (0, 1], got {util}")
    kwargs: dict = {"gpu_memory_utilization": util if util is not None else default_util}
    kv_gib = _env_float("DDTREE_KV_CACHE_GIB")
    if kv_gib is not None:
        if kv_gib <= 0:
            raise ValueError(f"DDTREE_KV_CACHE_GIB must be positive, got {kv_gib}")
        kwargs["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
    return kwargs


def gdn_prefill_config() -> dict:
    """``additional_config`` of every GPU engine the scripts start: GDN prefill on vLLM's Triton
    kernels. vLLM 0.26 picks FlashInfer's SM90 GDN prefill on Hopper, which needs
    nvidia-cutlass-dsl (not in the offline bundle); ``GDN_PREFILL`` names another backend."""
    return {"gdn_prefill_backend": os.environ.get("GDN_PREFILL", "triton")}


def gpu_shared() -> bool:
    """True when the shared-GPU settings are on (timings then carry that caveat)."""
    return bool(os.environ.get("DDTREE_GPU_MEM_UTIL") or os.environ.get("DDTREE_KV_CACHE_GIB"))
