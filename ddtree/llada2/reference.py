"""Plain-torch LLaDA2.0 reference: the model forward and the block-diffusion ``generate()``.

No vLLM, no KV cache: every denoising step recomputes the whole sequence up to the end of the
current block under a block-causal mask. This is the ground truth the vLLM model and the engine's
block decode are compared against (see ../../docs/llada2.md).

Weights use the names of the HF checkpoints (``LLaDA2MoeModelLM``, model_type ``llada2_moe``):

    model.word_embeddings.weight
    model.layers.N.input_layernorm.weight / post_attention_layernorm.weight
    model.layers.N.attention.query_key_value.weight       fused [Q; K; V] rows, no bias
    model.layers.N.attention.query_layernorm.weight       per-head RMSNorm on Q (head_dim)
    model.layers.N.attention.key_layernorm.weight         per-head RMSNorm on K
    model.layers.N.attention.dense.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight         dense layers (N < first_k_dense_replace)
    model.layers.N.mlp.gate.weight / gate.expert_bias     router (fp32 math), selection-only bias
    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight
    model.layers.N.mlp.shared_experts.{gate,up,down}_proj.weight
    model.norm.weight, lm_head.weight
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .denoise import SamplingSettings, denoise_step, step_uniforms, transfer_schedule  # noqa: F401

DEFAULT_MASK_TOKEN_ID = 156895
DEFAULT_EOS_TOKEN_ID = 156892


@dataclass
class LLaDA2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    partial_rotary_factor: float = 0.5
    rope_theta: float = 600000.0
    rms_norm_eps: float = 1e-6
    use_qk_norm: bool = True
    moe_shared_expert_intermediate_size: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "LLaDA2Config":
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        if "head_dim" not in kw:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" not in kw and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if d.get("rotary_dim"):
            kw["partial_rotary_factor"] = d["rotary_dim"] / kw["head_dim"]
        return cls(**kw, extra=d)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def shared_intermediate_size(self) -> int:
        base = self.moe_shared_expert_intermediate_size or self.moe_intermediate_size
        return base * self.num_shared_experts


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 statistics, result cast back before the weight (as the HF module does)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                             device=positions.device) / rotary_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_neox_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, seq, head_dim]; rotate only the first ``rotary_dim`` dims (NeoX half split)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def block_causal_mask(seq_len: int, block_length: int, device=None) -> torch.Tensor:
    """Boolean [seq, seq]: query i may see key j iff block(j) <= block(i) (blocks from position 0)."""
    blk = torch.arange(seq_len, device=device) // block_length
    return blk[None, :] <= blk[:, None]


def route(scores_logits: torch.Tensor, expert_bias: torch.Tensor, cfg: LLaDA2Config):
    """Group-limited top-k on sigmoid scores; the bias picks experts but never weights them.

    Returns (expert ids [T, k], weights [T, k] fp32).
    """
    scores = torch.sigmoid(scores_logits.float())
    biased = scores + expert_bias.float()
    T, E = biased.shape
    grouped = biased.view(T, cfg.n_group, E // cfg.n_group)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)
    keep_groups = group_score.topk(cfg.topk_group, dim=-1).indices
    group_keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
    expert_keep = group_keep[:, :, None].expand(T, cfg.n_group, E // cfg.n_group).reshape(T, E)
    ids = biased.masked_fill(~expert_keep, float("-inf")).topk(cfg.num_experts_per_tok, dim=-1).indices
    w = scores.gather(1, ids)
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * cfg.routed_scaling_factor


class LLaDA2Reference:
    """The forward of ``LLaDA2MoeModelLM`` over one full sequence with an explicit mask."""

    def __init__(self, cfg: LLaDA2Config, weights: dict[str, torch.Tensor], dtype=torch.float32,
                 device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.w = {k: v.to(self.device, dtype) for k, v in weights.items()}
        for k, v in weights.items():  # the router runs in fp32 whatever the model dtype
            if k.endswith("mlp.gate.weight") or k.endswith("mlp.gate.expert_bias"):
                self.w[k] = v.to(self.device, torch.float32)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype=torch.float32,
                        device: str | torch.device = "cpu") -> "LLaDA2Reference":
        from safetensors.torch import load_file
        folder = Path(folder)
        cfg = LLaDA2Config.from_dict(json.loads((folder / "config.json").read_text()))
        weights = {}
        for f in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(f))
        return cls(cfg, weights, dtype, device)

    def _mlp(self, x, prefix):
        w = self.w
        return F.linear(F.silu(F.linear(x, w[f"{prefix}.gate_proj.weight"]))
                        * F.linear(x, w[f"{prefix}.up_proj.weight"]), w[f"{prefix}.down_proj.weight"])

    def _moe(self, x, prefix):
        cfg = self.cfg
        logits = F.linear(x.float(), self.w[f"{prefix}.gate.weight"])
        bias = self.w.get(f"{prefix}.gate.expert_bias", torch.zeros(cfg.num_experts, device=x.device))
        ids, weights = route(logits, bias, cfg)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            y = self._mlp(x[tok], f"{prefix}.experts.{e}")
            out.index_add_(0, tok, y.float() * weights[tok, slot, None])
        out = out.to(x.dtype)
        if cfg.num_shared_experts:
            out = out + self._mlp(x, f"{prefix}.shared_experts")
        return out

    def _attention(self, x, prefix, cos, sin, allowed):
        cfg, w = self.cfg, self.w
        T = x.shape[0]
        H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = F.linear(x, w[f"{prefix}.query_key_value.weight"]).view(T, H + 2 * KV, D)
        q, k, v = qkv.split([H, KV, KV], dim=1)
        if cfg.use_qk_norm:
            q = rms_norm(q, w[f"{prefix}.query_layernorm.weight"], cfg.rms_norm_eps)
            k = rms_norm(k, w[f"{prefix}.key_layernorm.weight"], cfg.rms_norm_eps)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, T, D]
        q = apply_partial_neox_rope(q, cos, sin)
        k = apply_partial_neox_rope(k, cos, sin)
        k = k.repeat_interleave(H // KV, dim=0)
        v = v.repeat_interleave(H // KV, dim=0)
        scores = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(D)
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v.float()
        out = out.to(x.dtype).transpose(0, 1).reshape(T, H * D)
        return F.linear(out, w[f"{prefix}.dense.weight"])

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, block_length: int,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] -> logits [T, vocab] (fp32) under the block-causal mask."""
        cfg, w = self.cfg, self.w
        input_ids = input_ids.to(self.device)
        T = input_ids.shape[0]
        positions = torch.arange(T) if positions is None else positions
        positions = positions.to(self.device)
        allowed = block_causal_mask(T, block_length, self.device)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, self.dtype)
        h = w["model.word_embeddings.weight"][input_ids]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            a = self._attention(rms_norm(h, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps),
                                f"{p}.attention", cos, sin, allowed)
            h = h + a
            y = rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
            y = self._mlp(y, f"{p}.mlp") if i < cfg.first_k_dense_replace else self._moe(y, f"{p}.mlp")
            h = h + y
        h = rms_norm(h, w["model.norm.weight"], cfg.rms_norm_eps)
        return F.linear(h, w["lm_head.weight"]).float()


@dataclass
class GenerateResult:
    tokens: list[int]          # generated tokens (truncated at max_new_tokens and after the first EOS)
    forwards: int              # denoising forwards (one per step)
    steps_per_block: list[int]


@torch.no_grad()
def generate(model: LLaDA2Reference, prompt: list[int], *, max_new_tokens: int,
             block_length: int = 32, threshold: float = 0.95, steps: int | None = None,
             mask_token_id: int = DEFAULT_MASK_TOKEN_ID, eos_token_id: int | None = DEFAULT_EOS_TOKEN_ID,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             ) -> GenerateResult:
    """Block-diffusion decoding, full recompute (the LLaDA2.0 low-confidence remasking rule).

    Blocks are aligned to absolute position 0; the first generated block holds the prompt tail. In
    step k of a block every position still masked gets a proposal and a confidence
    (``denoise.propose``: the argmax and its probability at temperature 0, else a token drawn from
    softmax(logits / temperature) after top-k / top-p, with its probability there); every masked
    position whose confidence exceeds ``threshold`` is unmasked; if fewer than ``schedule[k]``
    qualify, the ``schedule[k]`` most confident are unmasked instead (``schedule`` splits the block
    over ``steps``; with steps == block_length that is "at least one"). The mask token is never
    proposed, so every block ends unmasked. Decoding stops after the block that holds an EOS; tokens
    after it are dropped. Sampling draws its uniforms per (seed, block, step) (``denoise``), so
    the vLLM engine reproduces a seeded request token for token; ``seed=None`` picks one from
    torch's global generator.
    """
    if not (0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if block_length <= 0:
        raise ValueError(f"block_length must be positive, got {block_length}")
    steps = block_length if steps is None else steps
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    sampling = SamplingSettings(temperature, top_k, top_p, seed)
    if not sampling.greedy and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    schedule = transfer_schedule(block_length, steps)
    P = len(prompt)
    total = P + max_new_tokens
    n_blocks = -(-total // block_length)
    x = torch.full((n_blocks * block_length,), mask_token_id, dtype=torch.long)
    x[:P] = torch.tensor(prompt, dtype=torch.long)
    forwards, steps_per_block = 0, []
    for b in range(P // block_length, n_blocks):
        start, end = b * block_length, (b + 1) * block_length
        n_steps = 0
        for k in range(steps):
            if not (x[start:end] == mask_token_id).any():
                break
            logits = model.forward(x[:end], block_length)[start:end]
            forwards += 1
            n_steps += 1
            uniforms = None if sampling.greedy else step_uniforms(seed, start, k, block_length)
            x[start:end] = denoise_step(x[start:end], logits, mask_token_id=mask_token_id,
                                        threshold=threshold, min_transfer=schedule[k],
                                        sampling=sampling, uniforms=uniforms)
        steps_per_block.append(n_steps)
        if eos_token_id is not None and (x[P:end] == eos_token_id).any():
            break
    out = x[P:total].tolist()
    if eos_token_id is not None and eos_token_id in out:
        # blocks past the EOS block were never decoded (they still hold mask ids): cut at the EOS
        out = out[: out.index(eos_token_id) + 1]
    return GenerateResult(tokens=out, forwards=forwards, steps_per_block=steps_per_block)
