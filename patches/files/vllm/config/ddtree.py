# ddtree-vllm overlay module (copied into vllm/config/ddtree.py by scripts/apply_overlays.py)
"""DDTree settings on ``SpeculativeConfig``: parsing, validation and the chain-form fallback.

Users ask for ``method="dflash_ddtree"`` with ``ddtree_budget``, ``ddtree_top_k`` and
``ddtree_chain_seed``. DDTree drafts with the DFlash drafter, so the request is normalised to
``method="dflash"`` with the ``ddtree_*`` fields filled in: every DFlash code path in vLLM keeps
working unchanged, and ``SpeculativeConfig.use_ddtree()`` (``ddtree_budget is not None``) tells the
tree path apart. ``num_speculative_tokens`` is the drafter depth L (the number of positions one
drafter pass proposes); the tree has at most ``ddtree_budget`` nodes over at most L levels.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

DDTREE_METHOD = "dflash_ddtree"
#: Largest node budget accepted. Verify runs budget + 1 query tokens per request and keeps budget + 1
#: recurrent-state slots per GDN layer; past ~128 the verify cost outgrows any acceptance gain.
MAX_DDTREE_BUDGET = 128
#: Largest number of siblings per level; acceptance saturates well before this (K = 8 is plenty).
MAX_DDTREE_TOP_K = 32
DEFAULT_DDTREE_BUDGET = 32
DEFAULT_DDTREE_TOP_K = 8
DEFAULT_DDTREE_CHAIN_SEED = True
DFLASH_DRAFT_ARCHITECTURES = ("DFlashDraftModel",)

_logged_once: set[str] = set()


def log_once(key: str, msg: str, *args: Any) -> None:
    """Log a message once per process (config validation runs in several places)."""
    if key not in _logged_once:
        _logged_once.add(key)
        logger.info(msg, *args)


def _err(field: str, msg: str) -> ValueError:
    return ValueError(f"speculative_config.{field}: {msg}")


def _local_drafter_config(model: str | None) -> dict | None:
    """The drafter's config.json when it is a local folder (hub ids are checked later by vLLM)."""
    if not model:
        return None
    cfg_path = os.path.join(model, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path) as f:
        return json.load(f)


def _drafter_architectures(model: str | None) -> list[str] | None:
    cfg = _local_drafter_config(model)
    return None if cfg is None else list(cfg.get("architectures") or [])


def _drafter_block_size(model: str | None) -> int | None:
    cfg = _local_drafter_config(model)
    if cfg is None:
        return None
    bs = cfg.get("block_size") or (cfg.get("dflash_config") or {}).get("block_size")
    return int(bs) if bs else None


def normalize_ddtree_request(sc: Any) -> None:
    """Called first thing in ``SpeculativeConfig.__post_init__``.

    Validates the ``ddtree_*`` fields and rewrites ``method="dflash_ddtree"`` to ``"dflash"``.
    A config that is already normalised (method ``dflash`` with ``ddtree_budget`` set, e.g. a copy
    re-validated inside vLLM) passes through unchanged.
    """
    ddtree_fields = {
        "ddtree_budget": sc.ddtree_budget,
        "ddtree_top_k": sc.ddtree_top_k,
        "ddtree_chain_seed": sc.ddtree_chain_seed,
    }
    if sc.method != DDTREE_METHOD:
        if sc.method == "dflash" and sc.ddtree_budget is not None:
            _validate_values(sc)  # already normalised
            return
        given = [k for k, v in ddtree_fields.items() if v is not None]
        if given:
            raise _err(given[0], f"is only valid with method='{DDTREE_METHOD}' "
                                 f"(got method={sc.method!r})")
        return

    if sc.model is None:
        raise _err("model", f"method='{DDTREE_METHOD}' needs a DFlash drafter checkpoint")
    if sc.ddtree_budget is None:
        sc.ddtree_budget = DEFAULT_DDTREE_BUDGET
    if sc.ddtree_top_k is None:
        sc.ddtree_top_k = DEFAULT_DDTREE_TOP_K
    if sc.ddtree_chain_seed is None:
        sc.ddtree_chain_seed = DEFAULT_DDTREE_CHAIN_SEED
    _validate_values(sc)

    # Settings the tree verifier has no use for, or that the tree path cannot honour.
    if sc.rejection_sample_method != "standard":
        raise _err("rejection_sample_method",
                   f"must be 'standard' with method='{DDTREE_METHOD}' (the tree sampler walks the "
                   f"tree itself); got {sc.rejection_sample_method!r}")
    if sc.draft_sample_method != "greedy":
        raise _err("draft_sample_method",
                   f"must be 'greedy' with method='{DDTREE_METHOD}' (the tree is built from the "
                   f"drafter's top-k log-probs); got {sc.draft_sample_method!r}")
    if sc.num_speculative_tokens_per_batch_size is not None:
        raise _err("num_speculative_tokens_per_batch_size",
                   f"dynamic speculation length is not supported with method='{DDTREE_METHOD}'")
    if sc.disable_padded_drafter_batch:
        raise _err("disable_padded_drafter_batch",
                   f"is not supported with method='{DDTREE_METHOD}' (the tree path needs static "
                   f"shapes)")

    archs = _drafter_architectures(sc.model)
    if archs is not None and not any(a in DFLASH_DRAFT_ARCHITECTURES for a in archs):
        raise _err("model", f"method='{DDTREE_METHOD}' needs a DFlash drafter "
                            f"(architectures {list(DFLASH_DRAFT_ARCHITECTURES)}); "
                            f"{sc.model!r} has {archs}")
    block_size = _drafter_block_size(sc.model)
    if sc.num_speculative_tokens is None:
        if block_size is None:
            raise _err("num_speculative_tokens",
                       "must be given (the tree depth L) when the drafter's block_size is unknown")
        sc.num_speculative_tokens = block_size - 1
    elif block_size is not None and sc.num_speculative_tokens > block_size - 1:
        raise _err("num_speculative_tokens",
                   f"{sc.num_speculative_tokens} exceeds what the drafter proposes per pass "
                   f"(block_size - 1 = {block_size - 1})")
    sc.method = "dflash"


def _validate_values(sc: Any) -> None:
    b, k, seed = sc.ddtree_budget, sc.ddtree_top_k, sc.ddtree_chain_seed
    if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= MAX_DDTREE_BUDGET:
        raise _err("ddtree_budget", f"must be an integer in [1, {MAX_DDTREE_BUDGET}], got {b!r}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DDTREE_TOP_K:
        raise _err("ddtree_top_k", f"must be an integer in [1, {MAX_DDTREE_TOP_K}], got {k!r}")
    if not isinstance(seed, bool):
        raise _err("ddtree_chain_seed", f"must be true or false, got {seed!r}")


def finalize_ddtree(sc: Any) -> None:
    """Called at the end of ``SpeculativeConfig.__post_init__``, once the drafter config exists."""
    if sc.ddtree_budget is None:
        return
    draft = sc.draft_model_config
    archs = list(getattr(draft, "architectures", None) or []) if draft is not None else []
    if not any(a in DFLASH_DRAFT_ARCHITECTURES for a in archs):
        raise _err("model", f"method='{DDTREE_METHOD}' needs a DFlash drafter "
                            f"(architectures {list(DFLASH_DRAFT_ARCHITECTURES)}); "
                            f"{sc.model!r} has {archs}")
    # The drafter proposes L = num_speculative_tokens positions per pass; a tree of `budget` nodes
    # is at most min(L, budget) deep. A config re-validated inside vLLM keeps its first decision.
    if sc.ddtree_max_depth is None:
        sc.ddtree_max_depth = min(sc.num_speculative_tokens, sc.ddtree_budget)
        sc.ddtree_fallback = tree_path_unsupported_reason(sc)
        if sc.ddtree_fallback is None:
            # The scheduler gives every tree node a slot: one "speculative token" per node.
            sc.num_speculative_tokens = sc.ddtree_budget
            log_once("tree", "dflash_ddtree: tree verify with budget=%d, top_k=%d, chain_seed=%s, "
                     "depth<=%d.", sc.ddtree_budget, sc.ddtree_top_k, sc.ddtree_chain_seed,
                     sc.ddtree_max_depth)
        else:
            # Flat DFlash over the top-1 chain = DDTree with top_k = 1, budget = min(L, budget).
            sc.num_speculative_tokens = sc.ddtree_max_depth
            record_fallback(sc.ddtree_fallback)
            log_once("fallback", "dflash_ddtree (budget=%d, top_k=%d, chain_seed=%s): tree verify "
                     "is not available here (%s); running flat DFlash over the top-1 chain "
                     "(%d tokens per step).", sc.ddtree_budget, sc.ddtree_top_k,
                     sc.ddtree_chain_seed, sc.ddtree_fallback, sc.ddtree_max_depth)


# ---------------------------------------------------------------- per-request tree shape

#: Per-request tree settings, read from ``SamplingParams.extra_args`` (the OpenAI server fills it
#: from the request body's ``vllm_xargs``). The server's ``ddtree_budget`` / ``ddtree_top_k`` are
#: the maxima: the scheduler's speculative token count and every per-node buffer are sized by them.
REQUEST_KEYS = ("ddtree_budget", "ddtree_top_k")


def _request_error(key: str, msg: str, value: Any = None) -> ValueError:
    from vllm.exceptions import VLLMValidationError  # a ValueError; the server answers 400

    return VLLMValidationError(f"vllm_xargs.{key}: {msg}", parameter=f"vllm_xargs.{key}", value=value)


def validate_ddtree_request(params: Any, sc: Any) -> None:
    """Check a request's DDTree settings (called from ``SamplingParams.verify``, where vLLM checks
    every request's parameters before it reaches the engine). Raises a ``VLLMValidationError``
    naming the field: unknown ``ddtree_*`` keys, a server that does not run tree verify, values
    that are not integers or lie outside [1, the server's value]."""
    extra = getattr(params, "extra_args", None) or {}
    unknown = sorted(k for k in extra if isinstance(k, str) and k.startswith("ddtree_")
                     and k not in REQUEST_KEYS)
    if unknown:
        raise _request_error(unknown[0], f"unknown DDTree request setting; use one of {list(REQUEST_KEYS)}")
    given = [k for k in REQUEST_KEYS if k in extra]
    if not given:
        return
    if sc is None or getattr(sc, "ddtree_budget", None) is None:
        raise _request_error(given[0], f"this server does not run speculative_config "
                                       f"method='{DDTREE_METHOD}'", extra[given[0]])
    if sc.ddtree_fallback:
        raise _request_error(given[0], f"this server runs flat DFlash over the top-1 chain "
                                       f"({sc.ddtree_fallback}); per-request tree shapes need tree "
                                       f"verify", extra[given[0]])
    v2 = v2_runner_cause(sc)
    if v2 is not None:  # DDTreeSpeculator (ddtree_v2.py) builds every tree at the server's shape
        raise _request_error(given[0], f"per-request tree shapes are not supported by the V2 model "
                                       f"runner ({v2}) yet; this server builds every tree with "
                                       f"budget={sc.ddtree_budget}, top_k={sc.ddtree_top_k}",
                             extra[given[0]])
    for key, server_value in (("ddtree_budget", sc.ddtree_budget), ("ddtree_top_k", sc.ddtree_top_k)):
        if key not in extra:
            continue
        value = extra[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise _request_error(key, f"must be an integer, got {value!r}", value)
        if not 1 <= value <= server_value:
            raise _request_error(key, f"must be in [1, {server_value}] (the server's {key} is the "
                                      f"maximum), got {value}", value)


def request_tree_shape(sc: Any, params: Any) -> tuple[int, int]:
    """(budget, top_k) of one request: its ``vllm_xargs`` values (validated on arrival by
    ``validate_ddtree_request``), else the server's."""
    extra = getattr(params, "extra_args", None) if params is not None else None
    if not extra:
        return sc.ddtree_budget, sc.ddtree_top_k
    return (int(extra.get("ddtree_budget", sc.ddtree_budget)),
            int(extra.get("ddtree_top_k", sc.ddtree_top_k)))


#: Attention backends whose paged KV layout the CUDA tree path reads (ddtree.attention.batched).
TREE_CUDA_ATTENTION_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")


def tree_path_unsupported_reason(sc: Any) -> str | None:
    """Why the tree verifier cannot run with this configuration (None: it can)."""
    if os.environ.get("DDTREE_FORCE_CHAIN", "0") == "1":
        return "DDTREE_FORCE_CHAIN=1"
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return None
    if not current_platform.is_cuda():
        return (f"platform {current_platform.device_name}: the tree path runs on vLLM's CPU "
                f"backend and on CUDA")
    # Both model runners verify trees (V1: vllm/v1/spec_decode/ddtree.py, V2:
    # vllm/v1/spec_decode/ddtree_v2.py); the V2 path passed scripts/gpu_ddtree_v2_check.py on an H100
    # (2026-11-23: greedy equality in every mode, eager and graphs, portable and FlashInfer tree
    # attention). DDTREE_V2_TREE=0 rolls V2 back to flat DFlash.
    v2 = v2_runner_cause(sc)
    if v2 is not None and os.environ.get("DDTREE_V2_TREE", "1") == "0":
        return f"V2 model runner ({v2}) with DDTREE_V2_TREE=0: flat DFlash (the V2 rollback switch)"
    backend = os.environ.get("VLLM_ATTENTION_BACKEND")
    if backend and backend.upper() not in TREE_CUDA_ATTENTION_BACKENDS:
        return (f"attention backend {backend}: the CUDA tree path reads the KV layout of "
                f"{', '.join(TREE_CUDA_ATTENTION_BACKENDS)}")
    return None


def v2_runner_cause(sc: Any) -> str | None:
    """Why vLLM will run the V2 model runner for this config (None: the V1 runner, as far as the
    speculative config tells). V2 is chosen by VLLM_USE_V2_MODEL_RUNNER=1 or forced by DFlash
    drafters that mix sliding and full attention layers (the Qwen3.6 drafters)."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").lower() in ("1", "true"):
        return "VLLM_USE_V2_MODEL_RUNNER=1"
    draft = getattr(sc, "draft_model_config", None)
    layer_types = list(getattr(getattr(draft, "hf_config", None), "layer_types", None) or [])
    n_sliding = sum(t == "sliding_attention" for t in layer_types)
    if 0 < n_sliding < len(layer_types):
        return "the drafter mixes sliding and full attention layers"
    return None


def ddtree_graph_mode(vllm_config: Any) -> None:
    """Engine settings for tree verify on CUDA (called while VllmConfig resolves CUDA graphs):
    a KV layout the tree attention reads (else flat DFlash), synchronous scheduling, and CUDA
    graphs PIECEWISE at most.

    The tree attention rows and the tree GDN ops run inside vLLM's splitting ops (attention and
    GDN core), which piecewise graphs leave eager; full graphs would replay the causal kernels only.
    """
    sc = vllm_config.speculative_config
    if sc is None or not sc.use_ddtree_tree():
        return
    from vllm.config.compilation import CUDAGraphMode
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    name = getattr(backend, "name", backend)
    kv_dtype = str(getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", "auto"))
    reason = None
    if name and str(name).upper() not in TREE_CUDA_ATTENTION_BACKENDS:
        reason = (f"attention backend {name}: the CUDA tree path reads the KV layout of "
                  f"{', '.join(TREE_CUDA_ATTENTION_BACKENDS)}")
    elif kv_dtype not in ("auto", "bfloat16", "float16", "half"):
        reason = f"kv_cache_dtype {kv_dtype}: the CUDA tree attention reads bf16/fp16 caches only"
    if reason is not None:
        # A KV cache the tree attention cannot read: flat DFlash.
        sc.ddtree_fallback = reason
        sc.num_speculative_tokens = sc.ddtree_max_depth
        record_fallback(sc.ddtree_fallback)
        log_once("fallback", "dflash_ddtree: tree verify is not available here (%s); running "
                 "flat DFlash over the top-1 chain (%d tokens per step).", sc.ddtree_fallback,
                 sc.ddtree_max_depth)
        return
    sched = vllm_config.scheduler_config
    if sched.async_scheduling:
        # Async scheduling plans step t+1 before step t's accepted count is known, assuming a chain
        # layout; tree positions and the KV/GDN commit need the walk's result first.
        log_once("async", "dflash_ddtree: asynchronous scheduling disabled for tree verify.")
        sched.async_scheduling = False
    cc = vllm_config.compilation_config
    if not cc.cudagraph_mode.has_full_cudagraphs():
        return
    log_once("graphs", "dflash_ddtree: cudagraph_mode %s -> PIECEWISE (tree attention and tree "
             "GDN run between the captured pieces).", cc.cudagraph_mode.name)
    cc.cudagraph_mode = CUDAGraphMode.PIECEWISE


_FALLBACKS: dict[str, int] = {}


class _FallbackMetric:
    """Puts the fallback counter into prometheus' default registry through a collector that vLLM's
    ``unregister_vllm_metrics`` leaves alone (it removes the collectors whose ``_name`` starts with
    ``vllm:``, which its stat logger does when it starts, after the config has counted its
    fallback), so an offline ``LLM.get_metrics()`` still sees it. A server runs prometheus in
    multiprocess mode: there the counter's values reach /metrics through its mmap files."""

    def __init__(self, counter) -> None:
        self._counter = counter

    def collect(self):
        return self._counter.collect()


def record_fallback(reason: str) -> None:
    """Count a fallback in the process's metrics (vllm:ddtree_fallback_total on /metrics)."""
    _FALLBACKS[reason] = _FALLBACKS.get(reason, 0) + 1
    try:
        from prometheus_client import REGISTRY, Counter

        counter = getattr(record_fallback, "_counter", None)
        if counter is None:
            counter = Counter("vllm:ddtree_fallback", "DDTree requests for the tree path that "
                              "fell back to flat DFlash", ["reason"], registry=None)
            record_fallback._counter = counter
            try:
                REGISTRY.register(_FallbackMetric(counter))
            except ValueError:  # the name is taken (a reloaded module's collector): count anyway
                pass
        counter.labels(reason=reason.split(":")[0]).inc()
    except Exception:  # metrics are best effort; the log line above always appears
        pass


def ddtree_hash_factors(sc: Any) -> list[Any]:
    """What of the DDTree settings changes the verify graph (query tokens per request)."""
    if sc.ddtree_budget is None:
        return []
    return ["ddtree", sc.ddtree_budget, sc.ddtree_top_k, bool(sc.ddtree_chain_seed)]
