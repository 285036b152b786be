"""One LLaDA2 denoising step: propose a token and a confidence per masked position, then unmask.

Shared by the full-recompute reference (``reference.generate``) and the vLLM engine's block decoder
(``vllm/v1/worker/llada2_block.py``), so both make exactly the same decision from the same logits.
Plain torch; no vLLM import.

Sampling follows the LLaDA2.0 ``generate()`` of the released checkpoints:

* temperature 0: the argmax, with its softmax probability as the confidence (greedy; what every
  reported evaluation uses);
* temperature T > 0: logits / T, then top-k (keep logits >= the k-th largest, ties kept), then top-p
  (sorted by probability, keep a token while the mass *before* it is <= p, the first always kept);
  one token is drawn from the renormalised distribution and its probability under that same
  distribution is the confidence the threshold / unmask rule sees.

Randomness is defined per request, not per batch: the uniforms of step ``k`` of the block starting
at absolute position ``block_start`` come from a CPU ``torch.Generator`` seeded with
``step_seed(seed, block_start, k)``, one uniform per block position (``block_length`` of them,
whatever is still masked). A draw is then the inverse CDF of the position's distribution at its
uniform (vocabulary order, float64 cumulative sum). So a seeded request gives the same tokens in any
batch, on any device, after a preemption that restarts its block, and in the reference.

The mask token itself is never proposed (else a position whose best token is the mask would stay
masked for good; trained checkpoints give it ~0 probability anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingSettings:
    """temperature 0 = greedy; top_k <= 0 and top_p == 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(temperature, top_k, top_p, where: str = "LLaDA2 sampling") -> None:
    """ValueError naming the field for settings the sampler cannot honour."""
    if not isinstance(temperature, (int, float)) or temperature != temperature or temperature < 0:
        raise ValueError(f"{where}: temperature must be a number >= 0, got {temperature!r}")
    if temperature == float("inf"):
        raise ValueError(f"{where}: temperature must be finite, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"{where}: top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or top_k < -1:
        raise ValueError(f"{where}: top_k must be an integer >= -1 (-1 or 0: off), got {top_k!r}")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, block_start: int, step: int) -> int:
    """A well-mixed 63-bit seed for (request seed, block, step): nearby seeds give unrelated streams."""
    x = _splitmix64(int(seed) & _MASK64)
    x = _splitmix64(x ^ (int(block_start) & _MASK64))
    x = _splitmix64(x ^ (int(step) & _MASK64))
    return x >> 1


def step_uniforms(seed: int, block_start: int, step: int, block_length: int) -> torch.Tensor:
    """float64 [block_length] uniforms in [0, 1) for one denoising step of one block (CPU)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(step_seed(seed, block_start, step))
    return torch.rand(block_length, generator=g, dtype=torch.float64)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p on [n, vocab] logits (already divided by the temperature); -inf = removed."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before > top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, mask_token_id: int, s: SamplingSettings) -> torch.Tensor:
    """The distribution each position samples from (fp32 [n, vocab]); greedy: plain softmax."""
    z = logits.to(torch.float32, copy=True)
    z[:, mask_token_id] = float("-inf")
    if s.greedy:
        return torch.softmax(z, dim=-1)
    return torch.softmax(filter_logits(z / s.temperature, s.top_k, s.top_p), dim=-1)


def propose(logits: torch.Tensor, mask_token_id: int, s: SamplingSettings,
            uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and confidence per row of ``logits`` [n, vocab] (any device); both returned on CPU.

    ``uniforms`` (float64 [n], CPU) are required when sampling; ignored when greedy.
    """
    if s.greedy:
        z = logits.to(torch.float32, copy=True)  # one copy whatever the logits' dtype
        z[:, mask_token_id] = float("-inf")
        x0 = z.argmax(-1)  # on the logits: softmax can round two close logits to one probability
        probs = torch.softmax(z, dim=-1)
    else:
        probs = sampling_probs(logits, mask_token_id, s)
        if uniforms is None or uniforms.shape[0] != probs.shape[0]:
            raise ValueError("propose: sampling needs one uniform per row")
        cdf = probs.double().cumsum(-1)
        target = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]
        # right=True: the first index whose cumulative mass exceeds the target, so a zero-probability
        # token (flat cdf) is never picked
        x0 = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    conf = probs.gather(1, x0[:, None])[:, 0]
    return x0.cpu(), conf.float().cpu()


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """How many positions each step must at least unmask: block_length split evenly over steps."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def choose_unmask(masked: torch.Tensor, conf: torch.Tensor, threshold: float,
                  min_transfer: int) -> torch.Tensor:
    """Bool [n]: every masked position with conf > threshold; if fewer than ``min_transfer``
    qualify, the ``min_transfer`` most confident masked positions instead."""
    conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    high = conf > threshold
    if int(high.sum()) >= min_transfer:
        return high
    k = min(min_transfer, int(masked.sum()))
    pick = torch.zeros_like(masked)
    pick[conf.topk(k).indices] = True
    return pick


def denoise_step(tokens: torch.Tensor, logits: torch.Tensor, *, mask_token_id: int,
                 threshold: float, min_transfer: int, sampling: SamplingSettings,
                 uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One update of ``tokens`` (long [n], CPU; masks are ``mask_token_id``) from ``logits`` [n, V].

    Returns the new tokens (a copy). ``uniforms`` [n] are the step's uniforms for these positions.
    """
    if not bool((tokens == mask_token_id).any()):
        return tokens.clone()
    x0, conf = propose(logits, mask_token_id, sampling, uniforms)
    return apply_unmask(tokens, x0, conf, mask_token_id=mask_token_id, threshold=threshold,
                        min_transfer=min_transfer)


def apply_unmask(tokens: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor, *, mask_token_id: int,
                 threshold: float, min_transfer: int) -> torch.Tensor:
    """The unmask half of ``denoise_step``, given the proposals (the engine batches ``propose``
    over the greedy requests of a step and applies this per request)."""
    masked = tokens == mask_token_id
    pick = choose_unmask(masked, conf, threshold, min_transfer)
    out = tokens.clone()
    out[pick] = x0[pick]
    return out
