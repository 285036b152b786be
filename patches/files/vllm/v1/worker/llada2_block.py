# ddtree-vllm overlay module (copied into vllm/v1/worker/llada2_block.py by scripts/apply_overlays.py)
"""LLaDA2.0 block-diffusion decoding inside vLLM v1 (scheduler + V1 model runner).

Semantics (greedy, the LLaDA2.0 low-confidence rule; ddtree/llada2/reference.py is the
full-recompute reference the engine is tested against):

* blocks of ``block_length`` tokens aligned to absolute position 0; the first generated block
  starts with the prompt tail;
* in step k of a block every still-masked position whose argmax probability exceeds ``threshold``
  is unmasked (the mask token itself is excluded from the prediction); if fewer than ``schedule[k]`` qualify, the ``schedule[k]`` most confident are
  (``schedule`` splits the block over ``max_steps``; max_steps == block_length means "at least one");
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
            if getattr(sched, "async_scheduling", False):
                logger.info("LLaDA2 block decode: disabling async scheduling")
                sched.async_scheduling = False
            budget = sched.max_num_batched_tokens
            if budget is not None and budget < settings.block_length:
                raise ValueError(f"LLaDA2: max_num_batched_tokens ({budget}) must be at least the "
                                 f"block length ({settings.block_length})")
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


def validate_sampling_params(sampling_params: Any, model_config: "ModelConfig") -> None:
    """Replaces vLLM's diffusion sampling-params check for LLaDA2 (greedy decode)."""
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
                min_transfer: int) -> np.ndarray:
    """One denoising update of ``canvas`` [n] given its logits [n, vocab]; returns the new canvas."""
    masked = torch.from_numpy(canvas == mask_token_id)
    if not bool(masked.any()):
        return canvas
    logits = logits.float()
    # The mask token is never a prediction: otherwise a position whose argmax is the mask id would
    # stay masked forever (trained checkpoints give it ~0 probability anyway).
    logits[:, mask_token_id] = float("-inf")
    x0 = logits.argmax(-1)
    p = torch.softmax(logits, dim=-1).gather(1, x0[:, None])[:, 0].cpu()
    x0 = x0.cpu()
    conf = torch.where(masked, p, torch.full_like(p, float("-inf")))
    high = conf > threshold
    if int(high.sum()) >= min_transfer:
        pick = high
    else:
        k = min(min_transfer, int(masked.sum()))
        pick = torch.zeros_like(masked)
        pick[conf.topk(k).indices] = True
    out = canvas.copy()
    idx = pick.nonzero(as_tuple=True)[0].numpy()
    out[idx] = x0.numpy()[idx]
    return out


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
                self._steps.pop(req_id, None)
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
            before = canvas
            canvas = unmask_step(canvas, logits[r.logits_row:r.logits_row + r.num_rows],
                                 s.mask_token_id, s.threshold, need)
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
    return dec


def attention_is_causal(runner) -> bool:
    return decoder_for(runner) is None
