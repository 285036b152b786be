"""One-launch Triton version of ``build._build_from_topk`` (same keys, same rule, same output).

One program per request. The beam of a depth lives in registers; ``tl.topk`` (bitonic) over the
[beam x K] int64 keys picks the next beam, whose scores are decoded straight from the key bits, so no
gather is needed between depths. Every depth's beam is written to scratch for the final pick over
all depths, which is again one ``tl.topk`` over [depth x beam] keys. Saves the ~20 small kernels
per depth of the torch path (launch-bound at decode batch sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .types import DraftTree


@triton.jit
def _keys(score, valid, flat, IB: tl.constexpr):
    # float32 -> order-preserving uint32 (held in int64), then (valid, score, inverted index)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    ordered = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
    key = (ordered << IB) | (((1 << IB) - 1) - flat.to(tl.int64))
    return key | (valid.to(tl.int64) << (32 + IB))


@triton.jit
def _decode_score(key, IB: tl.constexpr):
    ordered = (key >> IB) & 4294967295
    bits = tl.where(ordered >= 2147483648, ordered - 2147483648, -1 - ordered)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _ddtree_build_kernel(
    logq_ptr, ids_ptr, limit_ptr, root_ptr, rbud_ptr, rtopk_ptr,
    beam_score_ptr, beam_valid_ptr, beam_parent_ptr, beam_rank_ptr, pos_ptr,
    tok_ptr, par_ptr, depth_ptr, rank_ptr, score_ptr, valid_ptr, num_ptr,
    L, K,
    M: tl.constexpr, CHAIN: tl.constexpr, MP: tl.constexpr, KP: tl.constexpr, LP: tl.constexpr,
    BP: tl.constexpr, IB: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    N: tl.constexpr = M + 1
    lim = tl.load(limit_ptr + b)
    rb = tl.load(rbud_ptr + b)  # this request's budget (<= M) and branching limit (<= K)
    rk_lim = tl.load(rtopk_ptr + b)
    slots = tl.arange(0, MP)
    ks = tl.arange(0, KP)
    score = tl.where(slots == 0, 0.0, float("-inf"))
    valid = slots == 0
    flat = slots[:, None] * KP + ks[None, :]
    idx_mask: tl.constexpr = (1 << IB) - 1
    for d in range(0, L):
        lq = tl.load(logq_ptr + (b * L + d) * K + ks, mask=ks < K, other=float("-inf"))
        cand = score[:, None] + lq[None, :]
        cvalid = valid[:, None] & (ks < rk_lim)[None, :] & (d < lim)
        top = tl.topk(tl.reshape(_keys(cand, cvalid, flat, IB), [MP * KP]), MP)
        f = idx_mask - (top & idx_mask)
        valid = (((top >> (32 + IB)) & 1) != 0) & (slots < M)
        score = _decode_score(top, IB)
        base = (b * LP + d) * MP + slots
        tl.store(beam_score_ptr + base, score)
        tl.store(beam_valid_ptr + base, valid.to(tl.int8))
        tl.store(beam_parent_ptr + base, (f // KP).to(tl.int32))
        tl.store(beam_rank_ptr + base, (f % KP).to(tl.int32))
    tl.debug_barrier()

    dd = tl.arange(0, LP)
    offs = (b * LP + dd[:, None]) * MP + slots[None, :]
    inside = (dd[:, None] < L) & (slots[None, :] < M)
    sc = tl.load(beam_score_ptr + offs, mask=inside, other=float("-inf"))
    vd = tl.load(beam_valid_ptr + offs, mask=inside, other=0) != 0
    key = _keys(sc, vd, dd[:, None] * MP + slots[None, :], IB)
    if CHAIN:
        chain_len = tl.minimum(lim, rb)
        forced = (slots[None, :] == 0) & (dd[:, None] < chain_len)
        key = key | (forced.to(tl.int64) << (33 + IB))
    top = tl.topk(tl.reshape(key, [LP * MP]), BP)
    j = tl.arange(0, BP)
    f = idx_mask - (top & idx_mask)
    d_sel = f // MP
    i_sel = f % MP
    v_sel = (((top >> (32 + IB)) & 1) != 0) & (j < rb)
    s_sel = _decode_score(top, IB)
    prow = tl.load(beam_parent_ptr + (b * LP + d_sel) * MP + i_sel, mask=v_sel, other=0).to(tl.int64)
    rk = tl.load(beam_rank_ptr + (b * LP + d_sel) * MP + i_sel, mask=v_sel, other=0).to(tl.int64)
    tl.store(pos_ptr + b * LP * MP + f, j + 1, mask=v_sel)
    tl.debug_barrier()
    has_up = v_sel & (d_sel > 0)
    ppos = tl.load(pos_ptr + b * LP * MP + (d_sel - 1) * MP + prow, mask=has_up, other=0)
    tok = tl.load(ids_ptr + (b * L + d_sel) * K + rk, mask=v_sel, other=-1)
    out = b * N + 1 + j
    live = j < M
    tl.store(tok_ptr + out, tl.where(v_sel, tok, -1), mask=live)
    tl.store(par_ptr + out, tl.where(v_sel, ppos, -1), mask=live)
    tl.store(depth_ptr + out, tl.where(v_sel, d_sel + 1, 0), mask=live)
    tl.store(rank_ptr + out, tl.where(v_sel, rk, -1), mask=live)
    tl.store(score_ptr + out, tl.where(v_sel, s_sel, float("-inf")), mask=live)
    tl.store(valid_ptr + out, v_sel.to(tl.int8), mask=live)
    tl.store(tok_ptr + b * N, tl.load(root_ptr + b))
    tl.store(par_ptr + b * N, -1)
    tl.store(depth_ptr + b * N, 0)
    tl.store(rank_ptr + b * N, -1)
    tl.store(score_ptr + b * N, 0.0)
    tl.store(valid_ptr + b * N, 1)
    tl.store(num_ptr + b, tl.sum(v_sel.to(tl.int64), axis=0) + 1)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def build_from_topk_triton(logq, ids, root, limit, budget: int, chain_seed: bool,
                           row_budget: torch.Tensor | None = None,
                           row_top_k: torch.Tensor | None = None) -> DraftTree:
    B, L, K = logq.shape
    dev = logq.device
    # per-request shapes (validated by the caller); defaults: the batch's budget and top_k
    rbud = (torch.full((B,), budget, dtype=torch.long, device=dev) if row_budget is None
            else row_budget.to(dev, torch.long).contiguous())
    rtopk = (torch.full((B,), K, dtype=torch.long, device=dev) if row_top_k is None
             else row_top_k.to(dev, torch.long).contiguous())
    M, N = budget, budget + 1
    # >= 2: tl.topk with k = 1 collapses to a scalar
    MP, KP, LP, BP = max(2, _pow2(M)), _pow2(K), _pow2(L), max(2, _pow2(M))
    IB = max(MP * KP - 1, LP * MP - 1, 1).bit_length()
    beam_score = torch.empty((B, LP, MP), dtype=torch.float32, device=dev)
    beam_valid = torch.empty((B, LP, MP), dtype=torch.int8, device=dev)
    beam_parent = torch.empty((B, LP, MP), dtype=torch.int32, device=dev)
    beam_rank = torch.empty((B, LP, MP), dtype=torch.int32, device=dev)
    pos = torch.empty((B, LP * MP), dtype=torch.int64, device=dev)
    tok = torch.empty((B, N), dtype=torch.long, device=dev)
    par = torch.empty_like(tok)
    depth = torch.empty_like(tok)
    rank = torch.empty_like(tok)
    score = torch.empty((B, N), dtype=torch.float32, device=dev)
    valid = torch.empty((B, N), dtype=torch.int8, device=dev)
    num = torch.empty((B,), dtype=torch.long, device=dev)
    _ddtree_build_kernel[(B,)](
        logq, ids, limit, root, rbud, rtopk, beam_score, beam_valid, beam_parent, beam_rank, pos,
        tok, par, depth, rank, score, valid, num, L, K,
        M=M, CHAIN=bool(chain_seed), MP=MP, KP=KP, LP=LP, BP=BP, IB=IB,
        num_warps=4 if MP * KP <= 256 else 8,
    )
    return DraftTree(token_ids=tok, parents=par, depths=depth, ranks=rank, scores=score, num_nodes=num,
                     valid=valid.bool(), max_depth=L, top_k=K)
