#!/usr/bin/env python3
"""Train the tiny target + DFlash drafter pair on the Python standard library (no downloads).

    python scripts/train_tiny_pair.py --out models/tiny-pair          # GPU: a few minutes on an H100
    python scripts/train_tiny_pair.py --smoke --out build/pair-smoke  # CPU: seconds, tiny dims

Steps (all seeded):

1. Corpus: the ``*.py``, ``*.txt`` and ``*.rst`` files of a Python standard library (``--stdlib``,
   default: this interpreter's). The held-out split is by file: a file is held out when the SHA-256 of
   its path relative to the library root ends in a byte below ``HELDOUT_BYTE_BELOW`` (about 5 %), so
   every machine and every run agrees on the split.
2. Tokenizer: byte-level BPE (vocab ``VOCAB_SIZE``) trained with ``tokenizers`` on the training files.
3. Target: ``transformers``' Qwen3.5 text model (Gated DeltaNet and full attention in the 3:1 pattern),
   trained as a causal LM on random windows of the training token stream. On a GPU the GDN layers use
   ``flash-linear-attention`` when installed (``transformers`` picks it up by itself), otherwise the
   torch reference path.
4. Self-distillation data: the frozen target continues training-text prompts greedily; those
   continuations are exactly what the drafter must predict at inference.
5. Drafter: a DFlash drafter (``DFlashModel`` below) trained against the frozen target. Its training
   forward is the inference math of vLLM 0.26's ``qwen3_dflash`` + ``v1/spec_decode/dflash.py``:
   context features = ``fc(concat(target layer outputs))``, normalised by ``hidden_norm`` and projected
   by every drafter layer's ``k_proj``/``v_proj`` (+ ``k_norm``, RoPE at the context positions) straight
   into that layer's K/V (no ``input_layernorm``); the query block is ``[last token, mask x 15]`` at the
   positions following the context, attending to all earlier context and non-causally to its own block.
   Loss: cross entropy to the target's greedy tokens plus KL to the target's distribution, weighted
   ``exp(-(k-1)/gamma)`` by block position k as in the DFlash recipe.
6. Export in the layout ``scripts/tiny_models.py`` writes (``Qwen3_5ForConditionalGeneration`` with a
   tiny vision config, bf16, ``mamba_ssm_dtype`` float32; drafter ``DFlashDraftModel`` without its own
   embedding / LM head, so vLLM shares the target's), a ``SHA256SUMS`` file and ``train_report.json``
   (held-out perplexity, unigram perplexity, an offline acceptance-length estimate, timings, device).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

from tiny_models import EOS_TOKEN, MASK_TOKEN, bpe_tokenizer_and_trainer, save_tokenizer

VOCAB_SIZE = 4096
BLOCK_SIZE = 16
#: a file is held out when sha256(relative path)[0] < this (16/256 = 6.25 %)
HELDOUT_BYTE_BELOW = 16
CORPUS_SUFFIXES = (".py", ".txt", ".rst")

TARGET_DIMS = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=8,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
#: target layers whose outputs feed the drafter (vLLM logs them as these + 1)
DRAFT_TARGET_LAYER_IDS = [1, 4, 6]
#: 3 layers (2.6 M params, 5.1 MB bf16): recipe v3; the pair stays under 25 MB
DRAFTER_LAYERS = 3

#: The CPU preset (``--preset cpu``): what 2 CPU cores can train in about half an hour; same
#: tokenizer and layout as the GPU pair, smaller dims, attention shape shared with its drafter.
CPU_DIMS = dict(TARGET_DIMS, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=2,
                num_key_value_heads=1, linear_num_key_heads=1, linear_num_value_heads=2)
CPU_LAYER_IDS = [1, 3]

SMOKE_DIMS = dict(TARGET_DIMS, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  layer_types=["linear_attention"] * 3 + ["full_attention"], head_dim=32,
                  linear_key_head_dim=32, linear_value_head_dim=32)
SMOKE_LAYER_IDS = [1, 3]


# ----------------------------------------------------------------------------------------------
# corpus and tokenizer


def corpus_files(stdlib: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every corpus file, sorted by relative path."""
    out = []
    for p in stdlib.rglob("*"):
        rel = p.relative_to(stdlib).as_posix()
        if (not p.is_file() or p.suffix not in CORPUS_SUFFIXES or rel.startswith("site-packages/")
                or "__pycache__" in rel or "dist-packages" in rel):
            continue
        out.append((rel, p))
    out.sort()
    return out


def is_heldout(rel: str) -> bool:
    return hashlib.sha256(rel.encode()).digest()[0] < HELDOUT_BYTE_BELOW


def split_corpus(stdlib: Path, max_files: int | None = None):
    files = corpus_files(stdlib)
    if max_files is not None:
        files = files[:max_files]
    train = [(r, p) for r, p in files if not is_heldout(r)]
    held = [(r, p) for r, p in files if is_heldout(r)]
    return train, held


def read_text(p: Path) -> str:
    return p.read_bytes().decode("utf-8", errors="replace")


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    tok, trainer = bpe_tokenizer_and_trainer(vocab_size)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    save_tokenizer(tok, out)
    return tok


def encode_stream(tok, texts: list[str], eos_id: int):
    """All texts as one token stream, each followed by EOS (files are the documents)."""
    import numpy as np

    parts = []
    for enc in tok.encode_batch(texts):
        parts.append(np.asarray(enc.ids + [eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# target


def target_text_config(dims: dict, vocab: int, eos_id: int):
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=vocab, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25},
        mamba_ssm_dtype="float32", **dims)


def random_windows(stream, batch: int, length: int, gen):
    import torch

    starts = torch.randint(0, len(stream) - length - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(length + 1)[None, :]
    return stream[idx]


def lr_at(step: int, total: int, peak: float, warmup: int, time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine decay to 10 % of peak. Progress is the larger of the step fraction
    and the fraction of the time cap used, so a run cut short by its time cap still ends decayed."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = max((step - warmup) / max(1, total - warmup), time_frac)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_target(model, stream, args, device, log):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(args.seed + 11)
    opt = torch.optim.AdamW(model.parameters(), lr=args.target_lr, betas=(0.9, 0.95),
                            weight_decay=0.1, fused=device.type == "cuda")
    model.train()
    t0 = time.monotonic()
    steps_done, loss_ema = 0, None
    for step in range(args.target_steps):
        if time.monotonic() - t0 > args.target_max_s:
            log(f"target: stopping at step {step}: time cap {args.target_max_s}s")
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.target_steps, args.target_lr, args.warmup,
                            (time.monotonic() - t0) / args.target_max_s)
        w = random_windows(stream, args.batch, args.seq_len, gen).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        if step % 25 == 0 or step == args.target_steps - 1:
            lv = loss.item()
            loss_ema = lv if loss_ema is None else loss_ema
            log(f"target step {step:5d} loss {lv:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{time.monotonic() - t0:6.1f}s")
    return {"steps": steps_done, "seconds": round(time.monotonic() - t0, 1)}


def heldout_nll(model, stream, seq_len: int, device, max_windows: int, batch: int) -> float:
    """Mean next-token NLL over non-overlapping held-out windows (the first token of a window is
    context only)."""
    import torch
    import torch.nn.functional as F

    n = min(max_windows, (len(stream) - 1) // seq_len)
    if n == 0:
        raise ValueError("held-out stream shorter than one window; use more corpus files")
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b0 in range(0, n, batch):
            rows = [stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(b0, min(n, b0 + batch))]
            w = torch.stack(rows).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=w[:, :-1]).logits
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                  reduction="sum")
            total += nll.item()
            count += w[:, 1:].numel()
    return total / count


def unigram_nll(train_stream, held_stream, vocab: int) -> float:
    import numpy as np

    counts = np.bincount(train_stream, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[held_stream[1:]].mean())


class LayerTap:
    """Forward hooks that keep the outputs (residual stream) of the chosen decoder layers. vLLM's
    aux hidden state "layer i + 1" is the same tensor: the input of layer i + 1."""

    def __init__(self, layers, ids):
        self.ids = list(ids)
        self.out: dict[int, object] = {}
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in self.ids]

    def _hook(self, i):
        def hook(_mod, _inp, output):
            self.out[i] = output[0] if isinstance(output, tuple) else output
        return hook

    def features(self):
        import torch
        return torch.cat([self.out[i] for i in self.ids], dim=-1)


def greedy_continue(model, prompts, new_tokens: int, device):
    """Greedy continuation with the target's own cache (ties broken by argmax like vLLM)."""
    import torch

    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                         enabled=device.type == "cuda"):
        out = model(input_ids=prompts, use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1].float().argmax(-1)
        toks = [nxt]
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].float().argmax(-1)
            toks.append(nxt)
    return torch.cat([prompts, torch.stack(toks, dim=1)], dim=1)


# ----------------------------------------------------------------------------------------------
# drafter


def build_drafter_class():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class RMSNorm(nn.Module):
        """Qwen3 / vLLM RMSNorm: weight * x / rms(x), computed in float32."""

        def __init__(self, dim, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.eps = eps

        def forward(self, x):
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (self.weight.float() * xf).to(x.dtype)

    def rope(x, pos, theta):
        """Neox-style rotary embedding over the full head dim. x: [..., T, D], pos: [..., T]."""
        d = x.shape[-1]
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
        ang = pos.float()[..., None] * inv
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2:]
        rot = torch.cat([-x2, x1], -1)
        return (x.float() * cos + rot * sin).to(x.dtype)

    class DFlashLayer(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            h, nh, nkv, hd = cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
            self.nh, self.nkv, self.hd, self.theta = nh, nkv, hd, cfg["rope_theta"]
            self.input_layernorm = RMSNorm(h, cfg["eps"])
            self.post_attention_layernorm = RMSNorm(h, cfg["eps"])
            self.self_attn = nn.Module()
            a = self.self_attn
            a.q_proj = nn.Linear(h, nh * hd, bias=False)
            a.k_proj = nn.Linear(h, nkv * hd, bias=False)
            a.v_proj = nn.Linear(h, nkv * hd, bias=False)
            a.o_proj = nn.Linear(nh * hd, h, bias=False)
            a.q_norm = RMSNorm(hd, cfg["eps"])
            a.k_norm = RMSNorm(hd, cfg["eps"])
            self.mlp = nn.Module()
            self.mlp.gate_proj = nn.Linear(h, cfg["intermediate"], bias=False)
            self.mlp.up_proj = nn.Linear(h, cfg["intermediate"], bias=False)
            self.mlp.down_proj = nn.Linear(cfg["intermediate"], h, bias=False)

        def context_kv(self, ctx_normed, ctx_pos):
            """K/V of the context features, as vLLM's precompute_and_store_context_kv makes them."""
            a = self.self_attn
            b, t, _ = ctx_normed.shape
            k = a.k_norm(a.k_proj(ctx_normed).view(b, t, self.nkv, self.hd)).transpose(1, 2)
            v = a.v_proj(ctx_normed).view(b, t, self.nkv, self.hd).transpose(1, 2)
            return rope(k, ctx_pos[:, None, :], self.theta), v

        def forward(self, h, q_pos, ctx_k, ctx_v, mask):
            """h: [B, Q, H] query-block states; mask: [B, 1, Q, T + Q] (True = visible)."""
            a = self.self_attn
            b, q, _ = h.shape
            x = self.input_layernorm(h)
            qq = a.q_norm(a.q_proj(x).view(b, q, self.nh, self.hd)).transpose(1, 2)
            kk = a.k_norm(a.k_proj(x).view(b, q, self.nkv, self.hd)).transpose(1, 2)
            vv = a.v_proj(x).view(b, q, self.nkv, self.hd).transpose(1, 2)
            qq = rope(qq, q_pos[:, None, :], self.theta)
            kk = rope(kk, q_pos[:, None, :], self.theta)
            k_all = torch.cat([ctx_k, kk], dim=2)
            v_all = torch.cat([ctx_v, vv], dim=2)
            rep = self.nh // self.nkv
            k_all = k_all.repeat_interleave(rep, dim=1)
            v_all = v_all.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(qq, k_all, v_all, attn_mask=mask,
                                               scale=self.hd ** -0.5)
            h = h + a.o_proj(o.transpose(1, 2).reshape(b, q, self.nh * self.hd))
            x = self.post_attention_layernorm(h)
            return h + self.mlp.down_proj(F.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))

    class DFlashModel(nn.Module):
        """The trainable part of the drafter; parameter names are the checkpoint's."""

        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.layers = nn.ModuleList([DFlashLayer(cfg) for _ in range(cfg["layers"])])
            self.fc = nn.Linear(cfg["target_hidden"] * cfg["n_aux"], cfg["hidden"], bias=False)
            self.hidden_norm = RMSNorm(cfg["hidden"], cfg["eps"])
            self.norm = RMSNorm(cfg["hidden"], cfg["eps"])

        def forward(self, aux, anchors, block_tokens, embed):
            """Draft hidden states for query blocks.

            aux: [B, T, target_hidden * n_aux] target layer outputs at positions 0..T-1;
            anchors: [B, N] position p0 of each block (context = positions < p0);
            block_tokens: [B, N, BLOCK] = [token at p0, mask, ...]; embed: the shared embedding.
            Returns [B, N, BLOCK, H].
            """
            b, t, _ = aux.shape
            n, bs = block_tokens.shape[1], block_tokens.shape[2]
            dev = aux.device
            ctx = self.hidden_norm(self.fc(aux))
            ctx_pos = torch.arange(t, device=dev)[None].expand(b, t)
            q_pos = (anchors[:, :, None] + torch.arange(bs, device=dev)).reshape(b, n * bs)
            # visibility: block j's queries see context positions < p0_j and all of block j
            ctx_vis = torch.arange(t, device=dev)[None, None, :] < anchors[:, :, None]  # [B,N,T]
            ctx_vis = ctx_vis[:, :, None, :].expand(b, n, bs, t).reshape(b, n * bs, t)
            blk = torch.arange(n, device=dev).repeat_interleave(bs)
            blk_vis = (blk[:, None] == blk[None, :])[None].expand(b, -1, -1)
            mask = torch.cat([ctx_vis, blk_vis], dim=-1)[:, None]
            h = embed(block_tokens.reshape(b, n * bs))
            for layer in self.layers:
                ck, cv = layer.context_kv(ctx, ctx_pos)
                h = layer(h, q_pos, ck, cv, mask)
            return self.norm(h).view(b, n, bs, -1)

    return DFlashModel


def drafter_cfg(tcfg, layers: int, n_aux: int) -> dict:
    return dict(hidden=tcfg.hidden_size, intermediate=tcfg.intermediate_size,
                heads=tcfg.num_attention_heads, kv_heads=tcfg.num_key_value_heads,
                head_dim=tcfg.head_dim, eps=tcfg.rms_norm_eps, rope_theta=10000.0, layers=layers,
                target_hidden=tcfg.hidden_size, n_aux=n_aux)


def sample_anchors(lo, hi: int, n: int, gen):
    """n distinct block starts per row in [lo[row], hi] (hi inclusive), sorted. lo: [B] tensor."""
    import torch

    b = lo.shape[0]
    span = hi - int(lo.min()) + 1
    # random keys, pushed to +inf below each row's lower bound, keep the n smallest
    keys = torch.rand(b, span, generator=gen)
    cand = torch.arange(span)[None, :] + int(lo.min())
    keys[cand < lo[:, None]] = float("inf")
    n = min(n, int((hi - lo.max()) + 1))
    pick = keys.argsort(dim=1)[:, :n]
    return torch.gather(cand.expand(b, -1), 1, pick).sort(dim=1).values


def cache_bytes(n_seqs: int, seq_len: int, aux_dim: int, topk: int) -> int:
    """Memory of a TargetCache: bf16 features, bf16 top-k log-probs, int16 top-k ids, int64 tokens."""
    return n_seqs * seq_len * (aux_dim * 2 + topk * 2 + topk * 2 + 8)


class TargetCache:
    """The frozen target's view of the drafter's training sequences, computed once: the outputs of
    the chosen layers (the drafter's context features) and the top-k next-token log-probs per
    position (slot 0 = the target's greedy token; the drafter's labels)."""

    def __init__(self, target, tap, seqs, device, topk: int, batch: int = 64):
        import torch

        self.seqs = seqs.to(device)
        n, t = seqs.shape
        self.aux = None
        self.top_lp = torch.empty(n, t, topk, dtype=torch.bfloat16, device=device)
        self.top_ix = torch.empty(n, t, topk, dtype=torch.int16, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                             enabled=device.type == "cuda"):
            for b0 in range(0, n, batch):
                s = self.seqs[b0:b0 + batch]
                lp = torch.log_softmax(target(input_ids=s).logits.float(), -1)
                feats = tap.features().to(torch.bfloat16)
                if self.aux is None:
                    self.aux = torch.empty(n, t, feats.shape[-1], dtype=torch.bfloat16, device=device)
                self.aux[b0:b0 + batch] = feats
                v, i = lp.topk(topk, dim=-1)
                self.top_lp[b0:b0 + batch] = v.to(torch.bfloat16)
                self.top_ix[b0:b0 + batch] = i.to(torch.int16)


def drafter_logits(cache: TargetCache, rows, anchors, drafter, target, mask_id, device):
    """The drafter's logits for the blocks starting at ``anchors`` of sequences ``rows``, the
    target's top-k (log-probs, ids) for the same tokens, and which block positions carry a label.

    Position k (1..BS-1) of a block starting at p0 is the token at p0 + k; its label is the target's
    argmax at p0 + k - 1 given the sequence's own prefix (one teacher-forced forward). That equals the
    engine's greedy chain from p0 only while the sequence follows the target's argmax: position k
    counts while ``seq[p0 + j] == argmax(p0 + j - 1)`` for j = 1..k-1 (position 1 always counts). On
    greedy continuations this holds everywhere except for ties / bf16 noise between generation and
    the full forward; on real text it cuts each block at the first token the target would not have
    produced."""
    import torch

    seqs, aux = cache.seqs[rows], cache.aux[rows]
    if device.type != "cuda":  # no autocast there: run the drafter in its own (float32) dtype
        aux = aux.float()
    b = seqs.shape[0]
    bs = BLOCK_SIZE
    pos = anchors[:, :, None] + torch.arange(bs, device=device)  # [B,N,BS]
    src = (pos[:, :, 1:] - 1).reshape(b, -1)
    k = cache.top_lp.shape[-1]
    t_lp = torch.gather(cache.top_lp[rows], 1, src[:, :, None].expand(-1, -1, k)).view(b, -1, bs - 1, k)
    t_ix = torch.gather(cache.top_ix[rows], 1, src[:, :, None].expand(-1, -1, k)).view(b, -1, bs - 1, k)
    t_ix = t_ix.long()
    seq_next = torch.gather(seqs, 1, pos[:, :, 1:].reshape(b, -1)).view(b, -1, bs - 1)
    valid = label_validity(seq_next, t_ix[..., 0])
    block_tokens = torch.full_like(pos, mask_id)
    block_tokens[:, :, 0] = torch.gather(seqs, 1, anchors)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hid = drafter(aux, anchors, block_tokens, target.model.embed_tokens)
        d_logits = target.lm_head(hid[:, :, 1:])
    return d_logits, t_lp.float(), t_ix, valid


def label_validity(seq_next, labels):
    """[..., BS-1] bool: block position k (index k-1) has a greedy-chain label. ``seq_next[..., k-1]``
    is the sequence's token at p0 + k, ``labels[..., k-1]`` the target's argmax for it."""
    import torch

    follows = (seq_next == labels).to(torch.int32)
    first = torch.ones_like(follows[..., :1])
    return torch.cat([first, follows[..., :-1].cumprod(-1)], dim=-1).bool()


def distill_loss_terms(d_logits, t_lp, t_ix, valid, pos_w):
    """(weighted loss sum, weight sum) of cross entropy to the target's greedy token plus KL(target
    top-k || drafter) per block position; both terms count only where the label is valid."""
    import torch
    import torch.nn.functional as F

    d_logp = F.log_softmax(d_logits.float(), -1)
    ce = -torch.gather(d_logp, -1, t_ix[..., :1])[..., 0]
    # KL(target || drafter) over the target's top-k (renormalised): the soft part of distillation
    t_p = torch.softmax(t_lp, -1)
    kl = (t_p * (torch.log_softmax(t_lp, -1) - torch.gather(d_logp, -1, t_ix))).sum(-1)
    w = pos_w * valid.to(pos_w.dtype)
    return ((ce + kl) * w).sum(), w.sum()


def split_batch(total: int, real_frac: float, have_real: bool, have_greedy: bool) -> tuple[int, int]:
    """(real-text rows, greedy rows) of one drafter batch."""
    if not have_real:
        return 0, total
    if not have_greedy:
        return total, 0
    n_real = min(total - 1, max(1, round(total * real_frac)))
    return n_real, total - n_real


def train_drafter(target, drafter, sources, args, mask_id, device, log):
    """sources: {name: (TargetCache, lo, rows per step)}; lo[i] is the first anchor position of
    sequence i (the prompt length of a greedy continuation, 1 for a real-text window)."""
    import torch

    gen = torch.Generator().manual_seed(args.seed + 23)
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.drafter_lr, betas=(0.9, 0.95),
                            weight_decay=0.01, fused=device.type == "cuda")
    kpos = torch.arange(1, BLOCK_SIZE, device=device, dtype=torch.float32)
    pos_w = torch.exp(-(kpos - 1) / args.gamma)
    pos_w = pos_w / pos_w.mean()
    t0 = time.monotonic()
    steps_done = 0
    valid_sum = {name: torch.zeros(BLOCK_SIZE - 1, device=device) for name in sources}
    blocks_seen = {name: 0 for name in sources}
    for step in range(args.drafter_steps):
        if time.monotonic() - t0 > args.drafter_max_s:
            log(f"drafter: stopping at step {step}: time cap {args.drafter_max_s}s")
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.drafter_steps, args.drafter_lr, args.warmup,
                            (time.monotonic() - t0) / args.drafter_max_s)
        loss_sum, w_sum, hits, counts = 0.0, 0.0, 0.0, 0.0
        for name, (cache, lo, n_rows) in sources.items():
            if n_rows == 0:
                continue
            n_seq, seq_len = cache.seqs.shape
            rows = torch.randint(0, n_seq, (n_rows,), generator=gen)
            anchors = sample_anchors(lo[rows], seq_len - BLOCK_SIZE, args.blocks_per_seq, gen)
            rows, anchors = rows.to(device), anchors.to(device)
            d_logits, t_lp, t_ix, valid = drafter_logits(cache, rows, anchors, drafter, target,
                                                         mask_id, device)
            ls, ws = distill_loss_terms(d_logits, t_lp, t_ix, valid, pos_w)
            loss_sum, w_sum = loss_sum + ls, w_sum + ws
            with torch.no_grad():
                vf = valid.float()
                valid_sum[name] += vf.sum(dim=(0, 1))
                blocks_seen[name] += vf.shape[0] * vf.shape[1]
                hits = hits + ((d_logits.argmax(-1) == t_ix[..., 0]).float() * vf).sum(dim=(0, 1))
                counts = counts + vf.sum(dim=(0, 1))
        loss = loss_sum / w_sum.clamp_min(1e-6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        if step % 25 == 0 or step == args.drafter_steps - 1:
            acc = (hits / counts.clamp_min(1)).tolist()
            log(f"drafter step {step:5d} loss {loss.item():.3f} top1@k1 {acc[0]:.2f} "
                f"@k4 {acc[3]:.2f} @k8 {acc[7]:.2f} (labelled positions) "
                f"{time.monotonic() - t0:6.1f}s")
    labelled = {name: [round(float(v) / max(1, blocks_seen[name]), 3) for v in valid_sum[name]]
                for name in sources if blocks_seen[name]}
    return {"steps": steps_done, "seconds": round(time.monotonic() - t0, 1),
            "labelled_fraction_by_block_position": labelled}


def per_anchor_acceptance(target, drafter, cache: TargetCache, lo, mask_id, device, blocks: int,
                          gen):
    """The recipe-v1/v2 offline metric, kept for comparison: mean over random anchors inside greedy
    continuations (often deep in them, where they repeat themselves) of 1 + the leading drafted
    tokens equal to the target's greedy tokens. It overstates what the engine sees; the headline is
    ``engine_like_acceptance``."""
    import torch

    drafter.eval()
    lens = []
    n_seq, seq_len = cache.seqs.shape
    with torch.no_grad():
        for b0 in range(0, n_seq, 16):
            rows = torch.arange(b0, min(n_seq, b0 + 16))
            anchors = sample_anchors(lo[rows], seq_len - BLOCK_SIZE, blocks, gen)
            d_logits, _, t_ix, _ = drafter_logits(cache, rows.to(device), anchors.to(device), drafter,
                                                  target, mask_id, device)
            lens.append((leading_matches(d_logits.argmax(-1), t_ix[..., 0]) + 1).float().flatten())
    drafter.train()
    return float(torch.cat(lens).mean())


def leading_matches(drafts, truth):
    """[...]: how many leading drafted tokens equal the truth (drafts, truth: [..., BS-1])."""
    import torch

    return (drafts == truth).to(torch.int32).cumprod(-1).sum(-1)


def chain_walk(matches: list[int], new_tokens: int, block: int = BLOCK_SIZE) -> tuple[int, list[int]]:
    """The engine's flat-DFlash chain over one greedy request, from the leading-match count of the
    draft anchored at every generated token (``matches[a]``: the block [token a, mask x 15] placed
    right after generated token a; a = 0 is the first generated token, the prefill's output).

    The engine drafts at a = 0, accepts matches[a] drafts plus the bonus token, and drafts next at
    a + matches[a] + 1, until ``new_tokens`` tokens exist (prefill's token + every step's tokens).
    Returns (draft steps, accepted count per draft position [block - 1]); acceptance length as vLLM
    reports it = 1 + sum(accepted) / steps."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    per_pos = [0] * (block - 1)
    steps, a = 0, 0
    while a < new_tokens - 1:
        if a >= len(matches):
            raise ValueError(f"matches has {len(matches)} anchors; the chain needs anchor {a}")
        m = int(matches[a])
        if not 0 <= m <= block - 1:
            raise ValueError(f"matches[{a}] = {m} is outside 0..{block - 1}")
        steps += 1
        for j in range(m):
            per_pos[j] += 1
        a += m + 1
    return steps, per_pos


def engine_like_acceptance(target, tap, drafter, prompts, new_tokens: int, mask_id, device) -> dict:
    """Flat-DFlash acceptance length as vLLM measures it (``measure_tiny_pair.py``: greedy, 15
    speculative tokens, ``new_tokens`` tokens per prompt, pooled over prompts), computed offline:
    the target continues each prompt greedily, one teacher-forced forward over prompt + continuation
    gives the drafter's context features, the drafter drafts at every generated token, and
    ``chain_walk`` follows the anchors the engine would use."""
    import torch

    drafter.eval()
    steps, per_pos = 0, [0] * (BLOCK_SIZE - 1)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.no_grad():
        for prompt in prompts:
            n_p = len(prompt)
            seq = greedy_continue(target, torch.tensor([prompt], device=device),
                                  new_tokens + BLOCK_SIZE, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                target(input_ids=seq)
                aux = tap.features().to(dt)
                anchors = torch.arange(n_p, n_p + new_tokens, device=device)[None]
                block = torch.full((1, new_tokens, BLOCK_SIZE), mask_id, device=device)
                block[0, :, 0] = seq[0, n_p:n_p + new_tokens]
                hid = drafter(aux, anchors, block, target.model.embed_tokens)
                drafts = target.lm_head(hid[0, :, 1:]).argmax(-1)  # [new_tokens, BS-1]
            idx = anchors[0, :, None] + torch.arange(1, BLOCK_SIZE, device=device)
            m = leading_matches(drafts, seq[0][idx]).tolist()
            s, pp = chain_walk(m, new_tokens)
            steps += s
            per_pos = [x + y for x, y in zip(per_pos, pp)]
    drafter.train()
    return {"acceptance_length": round(1 + sum(per_pos) / max(1, steps), 3), "drafts": steps,
            "accepted_tokens": sum(per_pos), "accepted_per_position": per_pos,
            "prompts": len(prompts), "new_tokens": new_tokens}


def file_start_prompts(encode, files, n: int, min_len: int = 48, max_len: int = 256) -> list[list[int]]:
    """``n`` token-id prompts, each the start of a different ``.py`` file of ``files`` ((relative
    path, path) in path order), lengths spread over [min_len, max_len], skipping files too short.
    ``measure_tiny_pair.heldout_prompts`` (the vLLM measurement) uses this on the held-out files."""
    prompts = []
    for _, path in (f for f in files if f[0].endswith(".py")):
        if len(prompts) == n:
            break
        want = min_len + (len(prompts) * 37) % (max_len - min_len + 1)
        ids = encode(read_text(path))
        if len(ids) >= want + 8:
            prompts.append(ids[:want])
    if len(prompts) < n:
        raise ValueError(f"only {len(prompts)} files are long enough for {n} prompts")
    return prompts


def make_greedy_data(target, stream, n: int, seq_len: int, prompt_lens: list[int], batch: int,
                     device, gen):
    """n sequences of seq_len tokens: a prompt cut from ``stream`` (lengths cycling through
    ``prompt_lens``, one length per generation batch) continued greedily by the target.
    Returns (sequences [n, seq_len], prompt length of each)."""
    import torch

    chunks, lo = [], []
    for j, b0 in enumerate(range(0, n, batch)):
        nb = min(batch, n - b0)
        p = prompt_lens[j % len(prompt_lens)]
        prompts = random_windows(stream, nb, p - 1, gen).to(device)
        chunks.append(greedy_continue(target, prompts, seq_len - p, device).cpu())
        lo += [p] * nb
    return torch.cat(chunks), torch.tensor(lo)


# ----------------------------------------------------------------------------------------------
# export


def tensor_size_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def export_target(model, tcfg, tok_dir: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("model."):
            name = "model.language_model." + name[len("model."):]
        state[name] = t.detach().to("cpu", torch.bfloat16).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    text_dict = tcfg.to_dict()
    for k in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        text_dict.pop(k, None)
    text_dict["model_type"] = "qwen3_5_text"
    text_dict["dtype"] = "bfloat16"
    v = tcfg.vocab_size
    config = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text_dict,
        # Never run (served with language_model_only=True), but the multimodal config needs one.
        "vision_config": {"model_type": "qwen3_5_vision", "depth": 1, "hidden_size": 32,
                          "intermediate_size": 64, "num_heads": 2, "out_hidden_size": tcfg.hidden_size,
                          "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "in_channels": 3, "num_position_embeddings": 64},
        "image_token_id": v - 1, "video_token_id": v - 2,
        "vision_start_token_id": v - 3, "vision_end_token_id": v - 4,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "eos_token_id": tcfg.eos_token_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tcfg.eos_token_id, "pad_token_id": tcfg.eos_token_id, "do_sample": False},
        indent=2) + "\n")
    copy_tokenizer(tok_dir, out)


def export_drafter(drafter, dcfg: dict, tcfg, layer_ids, mask_id: int, tok_dir: Path, out: Path):
    import torch
    from safetensors.torch import save_file

    state = {name: t.detach().to("cpu", torch.bfloat16).contiguous()
             for name, t in drafter.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "vocab_size": tcfg.vocab_size,
        "hidden_size": dcfg["hidden"],
        "intermediate_size": dcfg["intermediate"],
        "num_hidden_layers": dcfg["layers"],
        "num_attention_heads": dcfg["heads"],
        "num_key_value_heads": dcfg["kv_heads"],
        "head_dim": dcfg["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": dcfg["eps"],
        "attention_bias": False,
        "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": dcfg["rope_theta"]},
        "dtype": "bfloat16",
        "block_size": BLOCK_SIZE,
        "target_hidden_size": dcfg["target_hidden"],
        "num_target_layers": tcfg.num_hidden_layers,
        "dflash_config": {"mask_token_id": mask_id, "target_layer_ids": list(layer_ids)},
        "eos_token_id": tcfg.eos_token_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(tok_dir, out)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir()):
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())


def write_sha256sums(root: Path) -> None:
    lines = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "SHA256SUMS" and not p.name.startswith("."):
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root).as_posix()}")
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def verify_sha256sums(root: Path) -> list[str]:
    """Names of files whose checksum does not match (empty when all match)."""
    bad = []
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        p = root / name
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            bad.append(name)
    return bad


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("models/tiny-pair"))
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                    help="root of the Python standard library used as the corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny dims and a few steps (CPU test)")
    ap.add_argument("--preset", choices=["gpu", "cpu"], default="gpu",
                    help="gpu: the full pair (minutes on an H100); cpu: smaller dims and step counts "
                         "that 2 CPU cores train in about half an hour")
    ap.add_argument("--drafter-only", action="store_true",
                    help="load the trained target from --target instead of training one; the export "
                         "copies its files byte-identical and keeps its report section")
    ap.add_argument("--target", type=Path, default=None,
                    help="with --drafter-only: the target folder (e.g. models/tiny-pair/target)")
    ap.add_argument("--init-drafter", type=Path, default=None,
                    help="start from this drafter checkpoint (its layer count and target layers); "
                         "with --drafter-steps 0 this only evaluates it")
    ap.add_argument("--layer-ids", default=None,
                    help="target layers feeding the drafter, e.g. 1,4,6 (default: the preset's; with "
                         "--drafter-only the committed drafter's next to --target when present)")
    ap.add_argument("--n-eval", type=int, default=128, help="held-out greedy continuations for the "
                    "per-anchor (recipe v2) acceptance estimate")
    ap.add_argument("--chain-prompts", type=int, default=20,
                    help="held-out prompts of the engine-like acceptance (the first ones of "
                         "measure_tiny_pair.py's list)")
    ap.add_argument("--chain-train-prompts", type=int, default=20,
                    help="the same on training-file prompts (0: skip)")
    ap.add_argument("--chain-tokens", type=int, default=64,
                    help="greedy tokens per prompt of the engine-like acceptance")
    ap.add_argument("--eval-windows", type=int, default=400, help="held-out perplexity windows")
    ap.add_argument("--drafter-layers", type=int, default=DRAFTER_LAYERS)
    ap.add_argument("--device", default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--target-steps", type=int, default=2500)
    ap.add_argument("--target-lr", type=float, default=2e-3)
    ap.add_argument("--target-max-s", type=float, default=180)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--gen-prompts", type=int, default=8192, help="greedy continuations to make")
    ap.add_argument("--gen-prompt-lens", default="48,176",
                    help="prompt lengths of the greedy continuations (one per generation batch)")
    ap.add_argument("--gen-len", type=int, default=None,
                    help="tokens per greedy sequence, prompt included (default --seq-len)")
    ap.add_argument("--gen-batch", type=int, default=2048)
    ap.add_argument("--real-windows", type=int, default=16384,
                    help="training-text windows labelled by one teacher-forced target forward "
                         "(0: greedy continuations only, recipe v2)")
    ap.add_argument("--real-len", type=int, default=None, help="tokens per real-text window "
                    "(default --seq-len)")
    ap.add_argument("--real-frac", type=float, default=0.5,
                    help="share of each drafter batch taken from the real-text windows")
    ap.add_argument("--cache-max-gb", type=float, default=40.0,
                    help="refuse to start when the cached target features + top-k exceed this")
    ap.add_argument("--topk", type=int, default=16, help="target log-probs kept for the KL term")
    ap.add_argument("--drafter-steps", type=int, default=12000)
    ap.add_argument("--drafter-batch", type=int, default=32)
    ap.add_argument("--blocks-per-seq", type=int, default=24)
    ap.add_argument("--drafter-lr", type=float, default=1.5e-3)
    ap.add_argument("--drafter-max-s", type=float, default=180)
    ap.add_argument("--gamma", type=float, default=7.0, help="block-position loss decay (DFlash)")
    ap.add_argument("--gdn", choices=["auto", "fla", "torch"], default="auto",
                    help="GDN kernels: flash-linear-attention if it works here (auto), or force one")
    ap.add_argument("--max-files", type=int, default=None, help="use only the first N corpus files")
    ap.add_argument("--report", type=Path, default=None, help="also write the report JSON here")
    args = ap.parse_args(argv)
    if args.preset == "cpu" and not args.smoke:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        cpu_defaults = {"--seq-len": ("seq_len", 128), "--batch": ("batch", 16),
                        "--target-steps": ("target_steps", 100000), "--target-lr": ("target_lr", 3e-3),
                        "--target-max-s": ("target_max_s", 900), "--warmup": ("warmup", 20),
                        "--gen-prompts": ("gen_prompts", 256), "--gen-prompt-lens": ("gen_prompt_lens", "24,64"),
                        "--gen-batch": ("gen_batch", 128), "--drafter-steps": ("drafter_steps", 100000),
                        "--drafter-batch": ("drafter_batch", 8), "--blocks-per-seq": ("blocks_per_seq", 12),
                        "--drafter-lr": ("drafter_lr", 2e-3), "--drafter-max-s": ("drafter_max_s", 420),
                        "--n-eval": ("n_eval", 24), "--eval-windows": ("eval_windows", 96),
                        "--drafter-layers": ("drafter_layers", 1), "--real-windows": ("real_windows", 1024)}
        for flag, (attr, value) in cpu_defaults.items():
            if flag not in given:
                setattr(args, attr, value)
    if args.smoke:
        args.seq_len, args.batch, args.target_steps, args.warmup = 32, 4, 3, 2
        args.gen_prompts, args.gen_prompt_lens, args.gen_batch = min(args.gen_prompts, 4), "8,12", 2
        args.drafter_steps = min(args.drafter_steps, 4)
        args.drafter_batch, args.blocks_per_seq = 2, 3
        args.max_files = args.max_files or 40
        args.n_eval, args.eval_windows, args.drafter_layers = 4, 8, 1
        args.real_windows, args.chain_prompts, args.chain_tokens = 6, 1, 8
        args.chain_train_prompts = min(args.chain_train_prompts, 1)
    args.gen_len = args.gen_len or args.seq_len
    args.real_len = args.real_len or args.seq_len
    if args.drafter_only and args.target is None:
        raise ValueError("--drafter-only needs --target DIR (the trained target folder)")
    if args.target is not None and not args.drafter_only:
        raise ValueError("--target is only used with --drafter-only")
    if args.drafter_only and not (args.target / "model.safetensors").is_file():
        raise ValueError(f"--target {args.target}: no model.safetensors there")
    if not 0.0 <= args.real_frac <= 1.0:
        raise ValueError(f"--real-frac must be in [0, 1], got {args.real_frac}")
    if args.real_windows < 0 or args.gen_prompts < 0:
        raise ValueError("--real-windows and --gen-prompts must be >= 0")
    if (args.real_windows == 0 or args.real_frac == 0) and args.gen_prompts == 0:
        raise ValueError("no drafter data: --gen-prompts 0 and no real-text windows in use")
    for name in ("gen_len", "real_len"):
        if getattr(args, name) < BLOCK_SIZE + 2:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {BLOCK_SIZE + 2}")
    return args


def load_target(target_dir: Path, device):
    """The exported target (``export_target`` layout) as transformers' Qwen3_5ForCausalLM in float32
    (bf16 weights widen exactly) with its text config."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    cfg = json.loads((target_dir / "config.json").read_text())
    tcfg = Qwen3_5TextConfig(**{k: v for k, v in cfg["text_config"].items() if k != "model_type"})
    tcfg._attn_implementation = "sdpa"
    model = Qwen3_5ForCausalLM(tcfg)
    state = {k.replace("model.language_model.", "model.", 1): v.to(torch.float32)
             for k, v in load_file(target_dir / "model.safetensors").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{target_dir}: not a tiny-pair target (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    return model.to(device), tcfg


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


#: tokenizer files that travel with both checkpoints
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    import numpy as np
    import torch

    def log(msg):
        print(f"[{time.monotonic() - t_start:7.1f}s] {msg}", flush=True)

    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if not args.stdlib.is_dir():
        raise ValueError(f"--stdlib {args.stdlib} is not a directory")

    # 1-2: corpus, tokenizer (trained here, or the committed target's), token streams
    train_files, held_files = split_corpus(args.stdlib, max_files=args.max_files)
    if not held_files or not train_files:
        raise ValueError(f"--stdlib {args.stdlib}: need both training and held-out files")
    train_texts = [read_text(p) for _, p in train_files]
    held_texts = [read_text(p) for _, p in held_files]
    work = args.out
    import shutil
    import tempfile
    tok_dir = Path(tempfile.mkdtemp(prefix="tiny-pair-tokenizer-"))
    if args.drafter_only:
        from tokenizers import Tokenizer

        for name in TOKENIZER_FILES:
            if (args.target / name).is_file():
                shutil.copyfile(args.target / name, tok_dir / name)
        tok = Tokenizer.from_file(str(args.target / "tokenizer.json"))
        vocab = tok.get_vocab_size()
    else:
        vocab = 512 if args.smoke else VOCAB_SIZE
        tok = train_tokenizer(train_texts, vocab, tok_dir)
    eos_id, mask_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(MASK_TOKEN)
    train_stream = torch.from_numpy(encode_stream(tok, train_texts, eos_id).astype(np.int64))
    held_stream = torch.from_numpy(encode_stream(tok, held_texts, eos_id).astype(np.int64))
    log(f"corpus {args.stdlib}: {len(train_files)} train files ({len(train_stream)} tokens), "
        f"{len(held_files)} held-out files ({len(held_stream)} tokens)")

    # 3: target (trained, or loaded with --drafter-only)
    gdn_impl = select_gdn(args.gdn, device, log)
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    if args.smoke:
        dims, layer_ids = SMOKE_DIMS, SMOKE_LAYER_IDS
    elif args.preset == "cpu":
        dims, layer_ids = CPU_DIMS, CPU_LAYER_IDS
    else:
        dims, layer_ids = TARGET_DIMS, DRAFT_TARGET_LAYER_IDS
    if args.drafter_only:
        target, tcfg = load_target(args.target, device)
        dims = {k: getattr(tcfg, k) for k in TARGET_DIMS}
        sibling = args.target.parent / "drafter" / "config.json"
        if sibling.is_file():
            layer_ids = json.loads(sibling.read_text())["dflash_config"]["target_layer_ids"]
        target_run = {"retrained": False}
    else:
        tcfg = target_text_config(dims, vocab, eos_id)
        tcfg._attn_implementation = "sdpa"
        target = Qwen3_5ForCausalLM(tcfg).to(device)
    if args.init_drafter is not None:
        layer_ids = json.loads((args.init_drafter / "config.json").read_text())[
            "dflash_config"]["target_layer_ids"]
    if args.layer_ids:
        layer_ids = [int(x) for x in args.layer_ids.split(",")]
    if not layer_ids or max(layer_ids) >= tcfg.num_hidden_layers or min(layer_ids) < 0:
        raise ValueError(f"--layer-ids {layer_ids}: need target layers in 0..{tcfg.num_hidden_layers - 1}")
    n_target = sum(p.numel() for p in target.parameters())
    log(f"target: {n_target / 1e6:.2f}M parameters, GDN kernels: {gdn_impl}"
        + (f", loaded from {args.target}" if args.drafter_only else ""))
    if not args.drafter_only:
        target_run = train_target(target, train_stream, args, device, log)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    nll = heldout_nll(target, held_stream, args.seq_len, device, args.eval_windows, 16)
    uni = unigram_nll(train_stream.numpy(), held_stream.numpy(), vocab)
    log(f"held-out perplexity {math.exp(nll):.2f} (unigram {math.exp(uni):.1f})")

    # 4: drafter data. Greedy continuations of training-text prompts (the engine's situation:
    # contexts the target wrote itself) and real training-text windows labelled by one teacher-forced
    # forward (many more contexts for the same cost; labels masked where they leave the greedy chain)
    aux_dim = tcfg.hidden_size * len(layer_ids)
    use_real = args.real_windows > 0 and args.real_frac > 0
    n_real = args.real_windows if use_real else 0
    planned = {"greedy": cache_bytes(args.gen_prompts, args.gen_len, aux_dim, args.topk),
               "real_text": cache_bytes(n_real, args.real_len, aux_dim, args.topk),
               "eval": cache_bytes(args.n_eval, args.seq_len, aux_dim, args.topk)}
    total_gb = sum(planned.values()) / 1e9
    log(f"target cache plan: {total_gb:.2f} GB ({', '.join(f'{k} {v / 1e9:.2f}' for k, v in planned.items())})")
    if total_gb > args.cache_max_gb:
        raise ValueError(f"--cache-max-gb {args.cache_max_gb}: the target caches need {total_gb:.2f} GB; "
                         f"lower --real-windows / --gen-prompts or raise the cap")
    gen = torch.Generator().manual_seed(args.seed + 31)
    t_gen = time.monotonic()
    prompt_lens = [int(x) for x in args.gen_prompt_lens.split(",")]
    if max(prompt_lens) >= args.gen_len - BLOCK_SIZE:
        raise ValueError(f"--gen-prompt-lens {prompt_lens}: each must be < --gen-len - {BLOCK_SIZE}")
    tap = LayerTap(target.model.layers, layer_ids)
    sources = {}
    n_real_rows, n_greedy_rows = split_batch(args.drafter_batch, args.real_frac, use_real,
                                             args.gen_prompts > 0)
    data = None
    if args.gen_prompts > 0:
        data, data_lo = make_greedy_data(target, train_stream, args.gen_prompts, args.gen_len,
                                         prompt_lens, args.gen_batch, device, gen)
        log(f"greedy continuations: {data.shape[0]} x {data.shape[1]} tokens in "
            f"{time.monotonic() - t_gen:.1f}s")
        cache = TargetCache(target, tap, data, device, args.topk)
        sources["greedy"] = (cache, data_lo, n_greedy_rows)
    gen_s = time.monotonic() - t_gen
    t_real = time.monotonic()
    if use_real:
        real = random_windows(train_stream, n_real, args.real_len - 1, gen)
        real_cache = TargetCache(target, tap, real, device, args.topk)
        sources["real_text"] = (real_cache, torch.ones(n_real, dtype=torch.long), n_real_rows)
    real_s = time.monotonic() - t_real
    eval_data, eval_lo = make_greedy_data(target, held_stream, args.n_eval, args.seq_len, prompt_lens,
                                          max(1, args.n_eval // len(prompt_lens)), device, gen)
    eval_cache = TargetCache(target, tap, eval_data, device, args.topk)
    log(f"target features cached (real-text windows {n_real} x {args.real_len} in {real_s:.1f}s); "
        f"rows per drafter step: real text {n_real_rows}, greedy {n_greedy_rows}")

    # 5: drafter
    DFlashModel = build_drafter_class()
    n_layers = args.drafter_layers
    if args.init_drafter is not None:
        n_layers = json.loads((args.init_drafter / "config.json").read_text())["num_hidden_layers"]
    dcfg = drafter_cfg(tcfg, n_layers, len(layer_ids))
    torch.manual_seed(args.seed + 1)
    drafter = DFlashModel(dcfg).to(device)
    if args.init_drafter is not None:
        from safetensors.torch import load_file

        drafter.load_state_dict({k: v.float() for k, v in
                                 load_file(args.init_drafter / "model.safetensors").items()})
    n_drafter = sum(p.numel() for p in drafter.parameters())
    log(f"drafter: {n_layers} layers, {n_drafter / 1e6:.2f}M parameters (+ the target's embedding "
        f"and LM head)")
    drafter_run = train_drafter(target, drafter, sources, args, mask_id, device, log)
    t_eval = time.monotonic()
    encode = lambda text: tok.encode(text).ids  # noqa: E731
    chain_min, chain_max = (48, 64) if args.smoke else (48, 256)
    chain_held = engine_like_acceptance(
        target, tap, drafter, file_start_prompts(encode, held_files, args.chain_prompts, chain_min,
                                                 chain_max), args.chain_tokens, mask_id, device)
    chain_train = None
    if args.chain_train_prompts > 0:
        chain_train = engine_like_acceptance(
            target, tap, drafter, file_start_prompts(encode, train_files, args.chain_train_prompts,
                                                     chain_min, chain_max),
            args.chain_tokens, mask_id, device)
    train_al = f"{chain_train['acceptance_length']:.2f}" if chain_train else "-"
    al_gen = torch.Generator().manual_seed(args.seed + 41)
    al_held = per_anchor_acceptance(target, drafter, eval_cache, eval_lo, mask_id, device, 8, al_gen)
    al_train = None
    if data is not None:
        al_train = per_anchor_acceptance(target, drafter, TargetCacheView(cache, 128), data_lo[:128],
                                         mask_id, device, 8, al_gen)
    log(f"ENGINE-LIKE flat-DFlash acceptance length (chain over the first {args.chain_tokens} greedy "
        f"tokens of {chain_held['prompts']} prompts, as measure_tiny_pair.py runs vLLM): held-out "
        f"{chain_held['acceptance_length']:.2f}, training files {train_al}")
    log(f"  accepted per draft position (held-out): "
        f"{' '.join(map(str, chain_held['accepted_per_position']))} of {chain_held['drafts']} drafts")
    log(f"per-anchor average inside greedy continuations (recipe v2 metric, overstates): held-out "
        f"{al_held:.2f}" + (f", training prompts {al_train:.2f}" if al_train is not None else "")
        + f"; eval {time.monotonic() - t_eval:.1f}s")

    # 6: export
    if args.drafter_only:
        dst = work / "target"
        if dst.resolve() != args.target.resolve():
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(args.target, dst)
        changed = [f.name for f in args.target.iterdir() if f.is_file()
                   and sha256_file(f) != sha256_file(dst / f.name)]
        if changed:
            raise RuntimeError(f"target files changed in the copy: {changed}")
    else:
        export_target(target, tcfg, tok_dir, work / "target")
    export_drafter(drafter, dcfg, tcfg, layer_ids, mask_id, tok_dir, work / "drafter")
    write_sha256sums(work)
    sizes = {sub: sum(p.stat().st_size for p in (work / sub).rglob("*") if p.is_file())
             for sub in ("target", "drafter")}
    target_section = {"parameters": n_target, "dims": dims, "gdn_kernels": gdn_impl, **target_run,
                      "seq_len": args.seq_len, "batch": args.batch,
                      "heldout_nll": round(nll, 4), "heldout_perplexity": round(math.exp(nll), 3),
                      "unigram_perplexity": round(math.exp(uni), 2)}
    if args.drafter_only:
        old_report = args.target.parent / "train_report.json"
        old = json.loads(old_report.read_text()) if old_report.is_file() else {}
        target_section = {
            "note": "not retrained in this run: the files are copied byte-identical from "
                    f"{args.target}; 'trained' is that run's report section",
            # the run that trained the target: the old report's own, or, when that run was
            # drafter-only too, the section it carried (no nesting per drafter-only run)
            "trained": (old["target"]["trained"] if "trained" in old.get("target", {}) else
                        {**old.get("target", {}), "device": old.get("device"),
                         "command": old.get("command")}),
            "recheck_here": {"parameters": n_target, "gdn_kernels": gdn_impl,
                             "heldout_nll": round(nll, 4),
                             "heldout_perplexity": round(math.exp(nll), 3),
                             "unigram_perplexity": round(math.exp(uni), 2)},
            "sha256": {f.name: sha256_file(f) for f in sorted(args.target.iterdir()) if f.is_file()},
        }
    acc_what = ("flat DFlash, greedy, 15 drafts: the engine's chain (draft at the first generated "
                "token, jump by the accepted length) over the first chain_tokens greedy tokens after "
                "prompts that start a .py file (lengths 48..256); 'heldout' uses the held-out files "
                "in measure_tiny_pair.py's order (its first prompts), 'train' training files")
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({cpu_model_name()})",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "recipe": "v3",
        "drafter_only": args.drafter_only,
        "corpus": {"stdlib": str(args.stdlib), "train_files": len(train_files),
                   "heldout_files": len(held_files), "train_tokens": len(train_stream),
                   "heldout_tokens": len(held_stream),
                   "heldout_rule": f"sha256(relative path)[0] < {HELDOUT_BYTE_BELOW}"},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": vocab},
        "target": target_section,
        "drafter_data": {
            "greedy": ({"sequences": int(data.shape[0]), "length": int(data.shape[1]),
                        "prompt_lens": prompt_lens, "seconds": round(gen_s, 1)}
                       if data is not None else None),
            "real_text": ({"windows": n_real, "length": args.real_len, "seconds": round(real_s, 1),
                           "labels": "teacher-forced target argmax; block position k counts while the "
                                     "real tokens before it equal the target's argmax"}
                          if use_real else None),
            "rows_per_step": {"real_text": n_real_rows, "greedy": n_greedy_rows},
            "cache_bytes_planned": planned,
            "cache_max_gb": args.cache_max_gb,
        },
        "drafter": {"parameters": n_drafter, "layers": dcfg["layers"], "block_size": BLOCK_SIZE,
                    "target_layer_ids": layer_ids, **drafter_run,
                    "init": str(args.init_drafter) if args.init_drafter else None,
                    "acceptance_engine_like_heldout": chain_held,
                    "acceptance_engine_like_train": chain_train,
                    "acceptance_engine_like_what": acc_what,
                    "acceptance_per_anchor_deep_heldout": round(al_held, 3),
                    "acceptance_per_anchor_deep_train": (round(al_train, 3) if al_train is not None
                                                         else None),
                    "acceptance_per_anchor_what": "recipe v1/v2 metric, overstates: mean over random "
                                                  "anchors inside 512-token greedy continuations",
                    "drafter_batch": args.drafter_batch, "blocks_per_seq": args.blocks_per_seq},
        "bytes": sizes,
        "seed": args.seed,
        "smoke": args.smoke,
        "preset": args.preset,
        "command": "python scripts/train_tiny_pair.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:])),
        "total_seconds": round(time.monotonic() - t_start, 1),
    }
    if torch.cuda.is_available() and device.type == "cuda":
        report["cuda_max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    (work / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"| target | drafter | engine-like AL held-out | train files | per-anchor AL (old) |\n"
          f"| {n_target / 1e6:.2f}M ppl {math.exp(nll):.2f} | {dcfg['layers']} layers "
          f"{n_drafter / 1e6:.2f}M | {chain_held['acceptance_length']:.2f} | "
          f"{train_al} | {al_held:.2f} |", flush=True)
    log(f"wrote {work} (target {sizes['target'] / 1e6:.1f} MB, drafter {sizes['drafter'] / 1e6:.1f} MB)")
    return 0


def select_gdn(choice: str, device, log) -> str:
    """Decide which GDN kernels transformers will bind (it resolves ``fla`` once, at import of the
    Qwen3.5 modeling module, so this must run before that import). ``auto`` tries a forward and
    backward of flash-linear-attention's chunked kernel and falls back to the torch path if it fails."""
    if "transformers.models.qwen3_5.modeling_qwen3_5" in sys.modules:
        raise RuntimeError("select_gdn must run before transformers' Qwen3.5 module is imported")
    use_fla = False
    if choice != "torch" and device.type == "cuda":
        try:
            import torch
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            b, t, h, d = 2, 128, 2, 64
            q, k, v = (torch.randn(b, t, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            g = -torch.rand(b, t, h, device=device, dtype=torch.float32)
            beta = torch.rand(b, t, h, device=device, dtype=torch.bfloat16)
            o, _ = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
            o.float().sum().backward()
            torch.cuda.synchronize()
            use_fla = True
        except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
            if choice == "fla":
                raise
            log(f"flash-linear-attention unusable here ({type(e).__name__}: {e}); torch GDN path")
    if not use_fla:
        sys.modules["fla"] = None  # makes transformers' import of fla fail -> torch reference path
    return "flash-linear-attention" if use_fla else "torch reference"


class TargetCacheView:
    """The first n sequences of a TargetCache."""

    def __init__(self, cache: TargetCache, n: int):
        self.seqs, self.aux = cache.seqs[:n], cache.aux[:n]
        self.top_lp, self.top_ix = cache.top_lp[:n], cache.top_ix[:n]


if __name__ == "__main__":
    sys.exit(main())
