"""One-launch Triton versions of the flatten step and the tree walk (one program per request).

Same outputs as the torch paths in flatten.py / sample.py (tests compare them); they exist because
at decode batch sizes the torch paths are bound by ~30 small kernel launches each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .types import DraftTree, FlatTree, WalkResult


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@triton.jit
def _flatten_kernel(par_ptr, depth_ptr, rank_ptr, valid_ptr, root_pos_ptr,
                    pos_ptr, vis_ptr, child_ptr, rows_ptr, packed_ptr,
                    N, K, L, NB,
                    NP: tl.constexpr, NKP: tl.constexpr, NBP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, NP)
    inb = slots < N
    par = tl.load(par_ptr + b * N + slots, mask=inb, other=-1)
    depth = tl.load(depth_ptr + b * N + slots, mask=inb, other=0)
    rank = tl.load(rank_ptr + b * N + slots, mask=inb, other=0)
    valid = tl.load(valid_ptr + b * N + slots, mask=inb, other=0) != 0
    tl.store(pos_ptr + b * N + slots, tl.load(root_pos_ptr + b) + depth, mask=inb)
    tl.store(rows_ptr + b * N + slots, b * N + slots, mask=inb)
    # ancestors: climb L times; padding has parent -1 so its row keeps only the diagonal
    vis = slots[:, None] == slots[None, :]
    anc = par
    for _ in range(0, L):
        vis = vis | ((anc[:, None] == slots[None, :]) & (anc >= 0)[:, None])
        anc = tl.load(par_ptr + b * N + anc, mask=anc >= 0, other=-1)
    both = inb[:, None] & inb[None, :]
    tl.store(vis_ptr + b * N * N + slots[:, None] * N + slots[None, :], vis, mask=both)
    # child table: clear, then scatter
    kk = tl.arange(0, NKP)
    tl.store(child_ptr + b * N * K + kk, tl.full([NKP], -1, tl.int64), mask=kk < N * K)
    tl.debug_barrier()
    is_child = valid & (par >= 0) & inb
    tl.store(child_ptr + b * N * K + par * K + rank, slots.to(tl.int64), mask=is_child)
    # packed tree mask: bits of the row-major [N, N] block, little-endian within each byte
    byte = tl.arange(0, NBP)
    bit = tl.arange(0, 8)
    idx = byte[:, None] * 8 + bit[None, :]
    v = tl.load(vis_ptr + b * N * N + idx, mask=idx < N * N, other=0).to(tl.int32)
    packed = tl.sum(v << bit[None, :], axis=1)
    tl.store(packed_ptr + b * NB + byte, packed.to(tl.uint8), mask=byte < NB)


def flatten_tree_triton(tree: DraftTree, root_positions: torch.Tensor) -> FlatTree:
    B, N = tree.parents.shape
    K, L = tree.top_k, tree.max_depth
    dev = tree.parents.device
    NB = (N * N + 7) // 8
    pos = torch.empty((B, N), dtype=torch.long, device=dev)
    vis = torch.empty((B, N, N), dtype=torch.bool, device=dev)
    child = torch.empty((B, N, K), dtype=torch.long, device=dev)
    rows = torch.empty((B, N), dtype=torch.long, device=dev)
    packed = torch.empty((B, NB), dtype=torch.uint8, device=dev)
    _flatten_kernel[(B,)](tree.parents, tree.depths, tree.ranks, tree.valid, root_positions.to(dev, torch.long),
                          pos, vis, child, rows, packed, N, K, L, NB,
                          NP=_pow2(N), NKP=_pow2(N * K), NBP=_pow2(NB), num_warps=4)
    return FlatTree(positions=pos, ancestor_mask=vis, child_table=child, logits_rows=rows, tree_mask_packed=packed)


@triton.jit
def _walk_kernel(tok_ptr, par_ptr, valid_ptr, tgt_ptr, acc_ptr, com_ptr, num_ptr, last_ptr,
                 N, L, NP: tl.constexpr, CP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, NP)
    inb = slots < N
    par = tl.load(par_ptr + b * N + slots, mask=inb, other=-2)
    tok = tl.load(tok_ptr + b * N + slots, mask=inb, other=-1)
    ok = (tl.load(valid_ptr + b * N + slots, mask=inb, other=0) != 0) & inb
    cols = tl.arange(0, CP)
    acc = tl.where(cols == 0, 0, -1).to(tl.int64)
    com = tl.full([CP], -1, tl.int64)
    node = b * 0
    done = b * 0
    for d in range(0, L):
        t = tl.load(tgt_ptr + b * N + node)
        hit = (par == node) & (tok == t) & ok
        child = tl.min(tl.where(hit, slots, NP), axis=0).to(tl.int64)
        live = done == 0
        found = (child < NP) & live
        com = tl.where((cols == d) & live, t, com)
        acc = tl.where((cols == d + 1) & found, child, acc)
        node = tl.where(found, child, node)
        done = tl.where(found, done, 1)
    # all L depths accepted: the bonus is the target's token at the last node
    t_end = tl.load(tgt_ptr + b * N + node)
    com = tl.where((cols == L) & (done == 0), t_end, com)
    num = tl.sum(((acc >= 0) & (cols > 0)).to(tl.int64), axis=0)
    tl.store(acc_ptr + b * (L + 1) + cols, acc, mask=cols < L + 1)
    tl.store(com_ptr + b * (L + 1) + cols, com, mask=cols < L + 1)
    tl.store(num_ptr + b, num)
    tl.store(last_ptr + b, node)


def tree_walk_triton(tree: DraftTree, target_token_ids: torch.Tensor) -> WalkResult:
    B, N = tree.token_ids.shape
    L = tree.max_depth
    dev = tree.token_ids.device
    t = target_token_ids.to(dev, torch.long).contiguous()
    acc = torch.empty((B, L + 1), dtype=torch.long, device=dev)
    com = torch.empty((B, L + 1), dtype=torch.long, device=dev)
    num = torch.empty((B,), dtype=torch.long, device=dev)
    last = torch.empty((B,), dtype=torch.long, device=dev)
    _walk_kernel[(B,)](tree.token_ids, tree.parents, tree.valid, t, acc, com, num, last, N, L,
                       NP=_pow2(N), CP=_pow2(L + 1), num_warps=1)
    return WalkResult(accepted_nodes=acc, committed_token_ids=com, num_accepted=num, last_accepted_node=last,
                      target_token_ids=t)
