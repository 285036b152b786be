# ddtree-vllm overlay module (copied into vllm/v1/worker/llada2_block.py by scripts/apply_overlays.py)
"""LLaDA2.0 block-diffusion decoding inside vLLM v1 (scheduler + V1 model runner).

Semantics (the LLaDA2.0 low-confidence rule; ddtree/llada2/reference.py is the full-recompute
reference the engine is tested against, and both call the same step, ddtree/llada2/denoise.py):

* blocks of ``block_length`` tokens aligned to absolute position 0; the first generated block
  starts with the prompt tail;
* in step k of a block every still-masked position gets a proposal and a confidence: the argmax
  and its probability at temperature 0, else a token drawn from softmax(logits / T) after top-k /
  top-p and its probability there (the mask token itself is never proposed). Every position whose
  confidence exceeds ``threshold`` is unmasked; if fewer than ``schedule[k]`` qualify, the
  ``schedule[k]`` most confident are (``schedule`` splits the block over ``max_steps``;
  max_steps == block_length means "at least one"). Sampling uniforms are drawn per (request seed,
  block, step) on a CPU generator, so a seeded request is reproducible in any batch;
* a finished block is committed (streamed) at once; one more forward over it rewrites its KV from
  its final tokens before the next block starts; EOS / max_tokens are applied by the scheduler.

How it maps onto vLLM (the model is marked a diffusion model, so the scheduler's spec-decode path
runs with zero sampled tokens per step):

* the canvas (the not-yet-committed part of the current block, masks included) travels as the
  request's draft tokens: the scheduler schedules it, the runner reads it from its token buffer and
  hands the updated canvas back through ``take_draft_token_ids``;
* every step schedules at most one whole, block-aligned block per request (prompt blocks during
  prefill, the canvas block with the committed prompt tail before it, or the refresh of a finished
  block). Within one block the LLaDA2 mask is bidirectional and earlier blocks are fully visible,
  so the attention call is plain non-causal attention over [0, block end): the runner builds
  non-causal attention metadata for this model;
* after each step ``num_computed_tokens`` is pulled back to the start of the first block whose KV
  is not final yet, so the scheduler re-sends that block (canvas steps, refresh).

Settings: server defaults from ``--diffusion-config '{"canvas_length": B, "max_denoising_steps": S}'``
(or the checkpoint config's ``block_length`` / ``denoising_steps``), threshold from
``VLLM_LLADA2_THRESHOLD`` (default 0.95); per request through ``SamplingParams.extra_args`` (OpenAI:
``vllm_xargs``) keys ``block_length``, ``threshold``, ``max_steps``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig

logger = init_logger(__name__)

LLADA2_ARCHITECTURE = "LLaDA2MoeModelLM"
LLADA2_MODEL_TYPE = "llada2_moe"
DEFAULT_BLOCK_LENGTH = 32
DEFAULT_THRESHOLD = 0.95
DEFAULT_MASK_TOKEN_ID = 156895
THRESHOLD_ENV = "VLLM_LLADA2_THRESHOLD"
_DEBUG = os.environ.get("VLLM_LLADA2_DEBUG") == "1"
REQUEST_KEYS = ("block_length", "threshold", "max_steps")


def is_llada2(model_config: "ModelConfig | None") -> bool:
    """True for an LLaDA2 model served with block decode (the default).

    ``--hf-overrides '{"canvas_length": null}'`` turns block decode off: the model then runs as a
    plain causal LM (block length 1), which the tests use to compare raw logits with the reference.
    """
    if model_config is None:
        return False
    hf = getattr(model_config, "hf_config", None)
    if getattr(hf, "canvas_length", None) is None:
        return False
    if getattr(hf, "model_type", None) == LLADA2_MODEL_TYPE:
        return True
    return LLADA2_ARCHITECTURE in (getattr(hf, "architectures", None) or [])


@dataclass(frozen=True)
class BlockSettings:
    block_length: int
    threshold: float
    max_steps: int
    mask_token_id: int

    def schedule(self) -> list[int]:
        base, rem = divmod(self.block_length, self.max_steps)
        return [base + (1 if i < rem else 0) for i in range(self.max_steps)]


def _check(block_length: Any, threshold: Any, max_steps: Any, where: str) -> tuple[int, float, int]:
    try:
        block_length = int(block_length)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: block_length must be an integer, got {block_length!r}") from None
    if block_length <= 0:
        raise ValueError(f"{where}: block_length must be a positive integer, got {block_length}")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: threshold must be a number in (0, 1], got {threshold!r}") from None
    if not (0.0 < threshold <= 1.0):
        raise ValueError(f"{where}: threshold must be in (0, 1], got {threshold}")
    max_steps = block_length if max_steps is None else max_steps
    try:
        max_steps = int(max_steps)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: max_steps must be an integer, got {max_steps!r}") from None
    if not (1 <= max_steps <= block_length):
        raise ValueError(f"{where}: max_steps must be in [1, block_length={block_length}], "
                         f"got {max_steps}")
    return block_length, threshold, max_steps


def server_settings(vllm_config: "VllmConfig") -> BlockSettings:
    hf = vllm_config.model_config.hf_config
    dc = getattr(vllm_config, "diffusion_config", None)
    block_length = (getattr(dc, "canvas_length", None) or getattr(hf, "block_length", None)
                    or DEFAULT_BLOCK_LENGTH)
    max_steps = getattr(dc, "max_denoising_steps", None) or getattr(hf, "denoising_steps", None)
    threshold = os.environ.get(THRESHOLD_ENV) or getattr(hf, "threshold", None) or DEFAULT_THRESHOLD
    b, t, s = _check(block_length, threshold, max_steps, "LLaDA2 server settings")
    mask = getattr(hf, "mask_token_id", None)
    return BlockSettings(b, t, s, DEFAULT_MASK_TOKEN_ID if mask is None else int(mask))


def request_settings(server: BlockSettings, sampling_params: Any) -> BlockSettings:
    extra = (getattr(sampling_params, "extra_args", None) or {}) if sampling_params else {}
    if not any(k in extra for k in REQUEST_KEYS):
        return server
    block_length = extra.get("block_length", server.block_length)
    max_steps = extra.get("max_steps", None if "block_length" in extra else server.max_steps)
    b, t, s = _check(block_length, extra.get("threshold", server.threshold), max_steps,
                     "LLaDA2 request (vllm_xargs)")
    if b > server.block_length:
        raise ValueError(f"LLaDA2 request (vllm_xargs): block_length {b} exceeds the server's "
                         f"block length {server.block_length} (the per-step token budget)")
    return BlockSettings(b, t, s, server.mask_token_id)


# ------------------------------------------------------------------------------ configuration


def _fa4_importable() -> bool:
    """FlashAttention 4 (vllm.vllm_flash_attn.cute) imports the CuTe DSL package ``cutlass``."""
    import importlib.util

    return importlib.util.find_spec("cutlass") is not None


def _configure_attention_and_graphs(vllm_config: "VllmConfig") -> None:
    """GPU settings the block decode needs (no-ops on CPU).

    * Attention must honour ``causal=False`` metadata (every step is non-causal attention over
      [0, block end)). As vLLM's own DiffusionGemma does, ``use_non_causal`` restricts the
      backend auto-selection to backends that support it (FLASH_ATTN on Hopper; it also keeps
      FlashInfer's causal-only TRT-LLM kernels out on Blackwell); an explicitly chosen backend
      without non-causal support is rejected by vLLM's selector.
    * CUDA graphs: PIECEWISE only. vLLM's V1 graph dispatcher sizes full decode graphs for a
      uniform query length of 1 + canvas_length while the V1 runner (no speculative config)
      classifies batches with 1, so FULL decode graphs would fail their size assertion at
      capture; and block-decode batches mix per-request query lengths (prompt tails, per-request
      block lengths), so full graphs would rarely apply anyway. Piecewise graphs keep attention
      outside the captured pieces, so the per-step non-causal metadata is used as built.
    """
    from vllm.platforms import current_platform

    attention = getattr(vllm_config, "attention_config", None)
    if attention is not None and getattr(attention, "backend", None) is None \
            and not getattr(attention, "use_non_causal", False):
        attention.use_non_causal = True
        logger.info("LLaDA2 block decode: non-causal block attention; attention backend "
                    "auto-selection limited to backends that support it (use_non_causal=True)")
        if current_platform.is_cuda() and not _fa4_importable():
            # vLLM upgrades FLASH_ATTN to FlashAttention 4 for diffusion models (per-sequence
            # causal), and FA4 is CuTe DSL code that imports `cutlass`; its capability check does
            # not look for it, so without the package the first forward fails deep in the
            # attention call (seen on an H100 with the offline bundle). Triton attention honours
            # causal=False and needs nothing extra.
            from vllm.v1.attention.backends.registry import AttentionBackendEnum

            attention.backend = AttentionBackendEnum.TRITON_ATTN
            logger.warning("LLaDA2 block decode: FlashAttention 4 (the `cutlass` CuTe DSL "
                           "package) is not installed; using TRITON_ATTN for the non-causal "
                           "block attention")
    model_config = vllm_config.model_config
    if model_config is not None and not getattr(model_config, "disable_cascade_attn", True):
        # FlashAttention's cascade path runs the per-request suffix with causal=True.
        logger.info("LLaDA2 block decode: disabling cascade attention")
        model_config.disable_cascade_attn = True
    if not current_platform.support_static_graph_mode():
        return
    from vllm.config.compilation import CUDAGraphMode

    comp = vllm_config.compilation_config
    mode = comp.cudagraph_mode
    if mode is None or mode.has_full_cudagraphs():
        if mode is not None:
            logger.warning("LLaDA2 block decode: cudagraph_mode %s has full CUDA graphs, which "
                           "the V1 runner cannot capture for block decode; using PIECEWISE",
                           mode.name)
        comp.cudagraph_mode = CUDAGraphMode.PIECEWISE
        logger.info("LLaDA2 block decode: cudagraph_mode=PIECEWISE (attention runs outside the "
                    "graphs with per-step non-causal metadata)")


class LLaDA2BlockDiffusionConfig:
    """Per-architecture config hook (MODELS_CONFIG_MAP): settings check and engine defaults."""

    @staticmethod
    def verify_and_update_model_config(model_config: "ModelConfig") -> None:
        return None

    @classmethod
    def verify_and_update_config(cls, vllm_config: "VllmConfig") -> None:
        if not is_llada2(vllm_config.model_config):
            return  # block decode switched off (canvas_length null): a plain causal LM
        settings = server_settings(vllm_config)  # raises ValueError on bad server settings
        cache = vllm_config.cache_config
        if cache is not None and cache.enable_prefix_caching:
            # A cached block's KV depends on the whole LLaDA2 block it sits in (bidirectional
            # attention), which a per-cache-block hash does not capture.
            logger.info("LLaDA2 block decode: disabling prefix caching")
            cache.enable_prefix_caching = False
        sched = vllm_config.scheduler_config
        if sched is not None:
            # Unset (None) means "on where supported" to vLLM, decided later in VllmConfig:
            # on GPU that would be on. The canvas must come back from step n before step n+1
            # is scheduled, so it is off, explicitly.
            if getattr(sched, "async_scheduling", None) is not False:
                logger.info("LLaDA2 block decode: disabling async scheduling")
                sched.async_scheduling = False
            budget = sched.max_num_batched_tokens
            if budget is not None and budget < settings.block_length:
                raise ValueError(f"LLaDA2: max_num_batched_tokens ({budget}) must be at least the "
                                 f"block length ({settings.block_length})")
        _configure_attention_and_graphs(vllm_config)
        # The frontend validates per-request settings against the server block length.
        vllm_config.model_config.hf_config.canvas_length = settings.block_length
        if vllm_config.diffusion_config is None:
            # Sizes the scheduler's per-step draft (canvas) bookkeeping and its metrics.
            from vllm.config.diffusion import DiffusionConfig

            vllm_config.diffusion_config = DiffusionConfig(
                canvas_length=settings.block_length, max_denoising_steps=settings.max_steps)
        logger.info("LLaDA2 block decode: block_length=%d threshold=%g max_steps=%d mask=%d",
                    settings.block_length, settings.threshold, settings.max_steps,
                    settings.mask_token_id)


# Sampling parameters the block decode cannot honour (vLLM's defaults switch them off).
_UNSUPPORTED = (("min_p", 0.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                ("repetition_penalty", 1.0), ("min_tokens", 0), ("logit_bias", None),
                ("allowed_token_ids", None), ("bad_words", None))


def sampling_settings(sampling_params: Any):
    """The denoising step's sampling settings of one request (temperature < 1e-5: greedy)."""
    from ddtree.llada2.denoise import SamplingSettings

    t = float(getattr(sampling_params, "temperature", 0.0) or 0.0)
    if t < 1e-5:  # vLLM's own greedy cut-off (_SAMPLING_EPS)
        return SamplingSettings()
    top_k = getattr(sampling_params, "top_k", 0)
    return SamplingSettings(temperature=t, top_k=0 if top_k is None else int(top_k),
                            top_p=float(getattr(sampling_params, "top_p", 1.0) or 1.0),
                            seed=getattr(sampling_params, "seed", None))


def validate_sampling_params(sampling_params: Any, model_config: "ModelConfig") -> None:
    """Replaces vLLM's diffusion sampling-params check for LLaDA2 (vLLM itself has already
    rejected a negative temperature or a top_p outside (0, 1])."""
    for key in (getattr(sampling_params, "extra_args", None) or {}):
        if key.startswith("llada2_"):
            raise ValueError(f"unknown LLaDA2 request setting {key!r}; use one of {REQUEST_KEYS}")
    hf = model_config.hf_config
    server = BlockSettings(int(hf.canvas_length), DEFAULT_THRESHOLD, int(hf.canvas_length),
                           DEFAULT_MASK_TOKEN_ID)
    request_settings(server, sampling_params)  # raises ValueError naming the bad field
    if getattr(sampling_params, "n", 1) != 1:
        raise ValueError("LLaDA2 block decode supports n=1 only")
    if getattr(sampling_params, "logprobs", None) or getattr(sampling_params, "prompt_logprobs", None):
        raise ValueError("LLaDA2 block decode does not return logprobs")
    for name, off in _UNSUPPORTED:
        value = getattr(sampling_params, name, off)
        if value is None or value == off or (off is None and not value):
            continue
        raise ValueError(f"LLaDA2 block decode does not support {name} (got {value!r}); "
                         "supported: temperature, top_k, top_p, seed")
    sampling_settings(sampling_params)  # raises ValueError naming temperature / top_k / top_p


# ------------------------------------------------------------------------------ scheduler side


class LLaDA2SchedulerHooks:
    def __init__(self, vllm_config: "VllmConfig") -> None:
        self.server = server_settings(vllm_config)

    def settings(self, request) -> BlockSettings:
        cached = getattr(request, "_llada2_settings", None)
        if cached is None:
            cached = request_settings(self.server, request.sampling_params)
            request._llada2_settings = cached
        return cached

    def before_schedule(self, request) -> None:
        """Open a fresh canvas (masks up to the block end) once the block before it is final."""
        if request.spec_token_ids:
            return
        s = self.settings(request)
        block_start = request.num_tokens // s.block_length * s.block_length
        if request.num_computed_tokens >= block_start:
            request.spec_token_ids = [s.mask_token_id] * (
                block_start + s.block_length - request.num_tokens)

    def clamp(self, request, num_computed: int, num_new_tokens: int) -> int:
        """At most one block-aligned block per step; never a partial canvas."""
        if num_new_tokens <= 0:
            return num_new_tokens
        b = self.settings(request).block_length
        block_end = (num_computed // b + 1) * b
        n = min(num_new_tokens, block_end - num_computed)
        if num_computed + n > request.num_tokens and num_computed + n < block_end:
            return 0  # the token budget cannot hold the whole canvas block this step
        return n

    def after_step(self, request, generated_token_ids, spec_decoding_stats):
        """Only blocks with final KV count as computed (called before new tokens are appended).

        Returns ``spec_decoding_stats`` with a finished block counted when this step committed one.
        """
        b = self.settings(request).block_length
        final = min(request.num_computed_tokens // b * b, request.num_tokens // b * b)
        request.num_computed_tokens = final
        if generated_token_ids and spec_decoding_stats is not None:
            spec_decoding_stats.num_finished_blocks = (
                getattr(spec_decoding_stats, "num_finished_blocks", 0) + 1)
        return spec_decoding_stats


def scheduler_hooks_for(vllm_config: "VllmConfig") -> LLaDA2SchedulerHooks | None:
    return LLaDA2SchedulerHooks(vllm_config) if is_llada2(vllm_config.model_config) else None


# ------------------------------------------------------------------------------ runner side


def unmask_step(canvas: np.ndarray, logits: torch.Tensor, mask_token_id: int, threshold: float,
                min_transfer: int, sampling=None, uniforms: torch.Tensor | None = None) -> np.ndarray:
    """One denoising update of ``canvas`` [n] given its logits [n, vocab]; returns the new canvas.

    The decision itself is ddtree.llada2.denoise.denoise_step, the reference's own step.
    """
    from ddtree.llada2.denoise import SamplingSettings, denoise_step

    if not (canvas == mask_token_id).any():
        return canvas
    out = denoise_step(torch.from_numpy(canvas.astype(np.int64)), logits,
                       mask_token_id=mask_token_id, threshold=threshold,
                       min_transfer=min_transfer, sampling=sampling or SamplingSettings(),
                       uniforms=uniforms)
    return out.numpy().astype(canvas.dtype)


@dataclass
class _CanvasRows:
    batch_index: int
    logits_row: int
    num_rows: int
    committed: int  # tokens committed before this step (canvas starts here)
    block_start: int


class LLaDA2BlockDecoder:
    def __init__(self, runner) -> None:
        self.server = server_settings(runner.vllm_config)
        self._settings: dict[str, BlockSettings] = {}
        self._sampling: dict[str, tuple[Any, int | None]] = {}  # req_id -> (settings, seed)
        self._steps: dict[str, tuple[int, int]] = {}  # req_id -> (block_start, steps done)
        self._rows: dict[str, _CanvasRows] = {}
        self._drafts: dict[str, list[int]] = {}
        self.stats = {"forwards": 0, "denoising_steps": 0, "blocks": 0, "committed": 0}

    def settings(self, runner, req_id: str) -> BlockSettings:
        s = self._settings.get(req_id)
        if s is None:
            s = request_settings(self.server, runner.requests[req_id].sampling_params)
            self._settings[req_id] = s
        return s

    def _greedy_proposals(self, runner, logits, live) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Argmax + confidence for every canvas row of the step's greedy requests in one pass and
        one device-to-host copy (per-request calls would sync once per request). Rows are
        independent, so each request gets exactly what ``propose`` gives it alone."""
        from ddtree.llada2.denoise import SamplingSettings, propose

        spans, reqs = [], []
        for req_id, r in self._rows.items():
            if req_id in live and self.sampling(runner, req_id)[0].greedy:
                spans.append((r.logits_row, r.num_rows))
                reqs.append(req_id)
        if not reqs:
            return {}
        mask_ids = {self.settings(runner, q).mask_token_id for q in reqs}
        if len(mask_ids) != 1:
            return {}
        if len(spans) == 1 or all(spans[j][0] + spans[j][1] == spans[j + 1][0]
                                  for j in range(len(spans) - 1)):
            rows = logits[spans[0][0]:spans[-1][0] + spans[-1][1]]  # contiguous: no gather
        else:
            idx = torch.cat([torch.arange(a, a + n) for a, n in spans]).to(logits.device)
            rows = logits.index_select(0, idx)
        x0, conf = propose(rows, mask_ids.pop(), SamplingSettings())
        out, at = {}, 0
        for req_id, (_, n) in zip(reqs, spans):
            out[req_id] = (x0[at:at + n], conf[at:at + n])
            at += n
        return out

    def sampling(self, runner, req_id: str):
        """(sampling settings, seed) of a request; an unseeded sampled request gets a seed from
        torch's global generator once (vLLM seeds that from ``--seed``)."""
        got = self._sampling.get(req_id)
        if got is None:
            settings = sampling_settings(runner.requests[req_id].sampling_params)
            seed = settings.seed
            if seed is None and not settings.greedy:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            got = self._sampling[req_id] = (settings, seed)
        return got

    def logits_indices(self, runner, scheduler_output) -> torch.Tensor:
        """Rows of the flattened batch whose logits are needed: every canvas position."""
        ib = runner.input_batch
        self._rows.clear()
        rows: list[np.ndarray] = []
        offset = n_logits = 0
        for i, req_id in enumerate(ib.req_ids):
            n = scheduler_output.num_scheduled_tokens.get(req_id, 0)
            c = int(ib.num_computed_tokens_cpu[i])
            committed = int(ib.num_tokens_no_spec[i])
            if n and c + n > committed:
                first = offset + (committed - c)
                rows.append(np.arange(first, offset + n))
                self._rows[req_id] = _CanvasRows(i, n_logits, c + n - committed, committed, c)
                n_logits += c + n - committed
            offset += n
        idx = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return torch.from_numpy(idx.astype(np.int64)).to(runner.device)

    def sample(self, runner, scheduler_output, logits, ec_connector_output=None):
        from vllm.v1.outputs import ModelRunnerOutput

        ib = runner.input_batch
        self.stats["forwards"] += 1
        sampled: list[list[int]] = [[] for _ in ib.req_ids]
        self._drafts = {}
        live = set(ib.req_ids)
        for req_id in list(self._settings):
            if req_id not in runner.requests:
                self._settings.pop(req_id, None)
                self._sampling.pop(req_id, None)
                self._steps.pop(req_id, None)
        greedy = self._greedy_proposals(runner, logits, live)
        for req_id, r in self._rows.items():
            if req_id not in live:
                continue
            i = r.batch_index
            s = self.settings(runner, req_id)
            schedule = s.schedule()
            block_start, done = self._steps.get(req_id, (r.block_start, 0))
            canvas = ib.token_ids_cpu[i, r.committed:r.committed + r.num_rows].copy()
            if block_start != r.block_start or (canvas == s.mask_token_id).all():
                # A new block (an all-mask canvas can only be a first step: every step unmasks
                # at least one position), also after a preempted request restarts its block.
                done = 0
            need = schedule[done] if done < len(schedule) else r.num_rows
            sampling, seed = self.sampling(runner, req_id)
            uniforms = None
            if not sampling.greedy:
                # The step's uniforms cover the whole block; the canvas starts after the prompt
                # tail, as in the reference.
                from ddtree.llada2.denoise import step_uniforms

                offset = r.committed - r.block_start
                uniforms = step_uniforms(seed, r.block_start, done, s.block_length)[
                    offset:offset + r.num_rows]
            before = canvas
            if req_id in greedy:
                from ddtree.llada2.denoise import apply_unmask

                x0, conf = greedy[req_id]
                canvas = apply_unmask(torch.from_numpy(canvas.astype(np.int64)), x0, conf,
                                      mask_token_id=s.mask_token_id, threshold=s.threshold,
                                      min_transfer=need).numpy().astype(canvas.dtype)
            else:
                canvas = unmask_step(canvas, logits[r.logits_row:r.logits_row + r.num_rows],
                                     s.mask_token_id, s.threshold, need, sampling, uniforms)
            if _DEBUG:
                logger.info("llada2 %s c=%d N=%d rows=%d step=%d need=%d %s -> %s", req_id,
                            r.block_start, r.committed, r.num_rows, done, need,
                            before.tolist(), canvas.tolist())
            self.stats["denoising_steps"] += 1
            if (canvas == s.mask_token_id).any():
                self._steps[req_id] = (r.block_start, done + 1)
                self._drafts[req_id] = canvas.tolist()
                continue
            # Block finished: commit it now (the scheduler applies EOS / max_tokens).
            self._steps.pop(req_id, None)
            tokens = canvas.tolist()
            end = r.committed + len(tokens)
            ib.token_ids_cpu[i, r.committed:end] = tokens
            ib.is_token_ids[i, r.committed:end] = True
            ib.num_tokens_no_spec[i] = end
            runner.requests[req_id].output_token_ids.extend(tokens)
            sampled[i] = tokens
            self.stats["blocks"] += 1
            self.stats["committed"] += len(tokens)
        self._rows.clear()
        kv_connector_output = runner.kv_connector_output
        runner.kv_connector_output = None
        return ModelRunnerOutput(
            req_ids=ib.req_ids.copy(),
            req_id_to_index=ib.req_id_to_index.copy(),
            sampled_token_ids=sampled,
            kv_connector_output=kv_connector_output,
            ec_connector_output=ec_connector_output,
        )

    def take_draft_token_ids(self):
        from vllm.v1.outputs import DraftTokenIds

        if not self._drafts:
            return None
        req_ids = list(self._drafts)
        out = DraftTokenIds(req_ids, [self._drafts[r] for r in req_ids])
        self._drafts = {}
        return out


def decoder_for(runner) -> LLaDA2BlockDecoder | None:
    """The runner's block decoder (created on first use), or None for other models."""
    dec = runner.__dict__.get("_llada2_decoder", False)
    if dec is False:
        dec = LLaDA2BlockDecoder(runner) if is_llada2(runner.model_config) else None
        runner.__dict__["_llada2_decoder"] = dec
        if dec is not None:
            _check_backends(runner)
    return dec


def _check_backends(runner) -> None:
    """Every attention backend must honour causal=False metadata (the whole block decode relies
    on it); log which ones run it."""
    names = []
    for groups in getattr(runner, "attn_groups", None) or []:
        for group in groups:
            backend = group.backend
            supports = getattr(backend, "supports_non_causal", None)
            if supports is not None and not supports():
                raise RuntimeError(
                    f"LLaDA2 block decode needs non-causal attention; backend "
                    f"{backend.get_name()} does not support it (try --attention-backend "
                    "FLASH_ATTN, TRITON_ATTN or FLEX_ATTENTION)")
            names.append(backend.get_name())
    logger.info("LLaDA2 block decode: non-causal block attention on %s",
                ", ".join(sorted(set(names))) or "(no attention groups yet)")


def attention_is_causal(runner) -> bool:
    return decoder_for(runner) is None
