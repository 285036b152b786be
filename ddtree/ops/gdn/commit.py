"""Commit the accepted path of a verified tree into the GDN caches, without replaying it.

Recurrent state: every node's state already sits in its slot (written by the tree recurrence), so
the new state is the slot of the last accepted node. Either point the next step at that slot
(``accepted_state_lines``: index only, no copy) or copy it into the request's cache line
(``commit_recurrent_state``).

Conv state: after a tree forward with ``stage_inputs=True`` the request's conv-state line holds
[h1 .. h_{W-2}, x_0 .. x_{n-1}] (column c). The new history is the last W-1 entries of
h ++ x_root ++ x_a1 ++ ... ++ x_ak along the accepted path, i.e. W-1 staged columns. When the path is
the flat chain 0, 1, .., k those columns are contiguous (k .. k+W-2) and already in place. Where the
history goes (``placement``):
- "front": columns 0 .. W-2 (next offset 0); a chain path is one contiguous copy.
- "chain_in_place": like "front", but a chain path is not copied; its offset k is returned.
- "last_node": columns a_k .. a_k+W-2, a_k = the last accepted node (next offset a_k); chain paths
  are already there. This matches vLLM's single ``num_accepted_tokens`` bookkeeping when the glue
  sets num_accepted_tokens = a_k + 1: the recurrent state is then read from slot column a_k
  (index-only commit) and the conv history from offset a_k, with no copy for chain paths.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - the torch path below is used then
    HAS_TRITON = False


PLACEMENTS = ("front", "chain_in_place", "last_node")


def conv_commit_plan(accepted_nodes: torch.Tensor, num_accepted: torch.Tensor, width: int,
                     placement: str = "front"):
    """Where the new conv history comes from and goes, per request; device index math, no sync.

    accepted_nodes [B, L] (node ids along the accepted path, root first; entries past num_accepted
    ignored), num_accepted [B] (path length including the root; 0 = request not committed).
    Returns (src_cols [B, W-1] int32, do_copy [B] bool, new_offsets [B] int32); a copy writes the
    history at columns new_offsets .. new_offsets+W-2.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement: must be one of {PLACEMENTS}, got {placement!r}")
    B, L = accepted_nodes.shape
    dev = accepted_nodes.device
    acc = accepted_nodes.long()
    nacc = num_accepted.long()
    hist_cols = torch.arange(width - 2, device=dev).expand(B, width - 2)
    seq = torch.cat([hist_cols, acc + (width - 2)], dim=1)  # staged column of each path entry
    start = (nacc - 1).clamp(min=0)
    pick = start[:, None] + torch.arange(width - 1, device=dev)[None, :]
    src_cols = seq.gather(1, pick.clamp(max=seq.shape[1] - 1))
    pos = torch.arange(L, device=dev)[None, :]
    in_path = pos < nacc[:, None]
    is_chain = ((acc == pos) | ~in_path).all(dim=1)
    active = nacc > 0
    zero = torch.zeros_like(nacc)
    if placement == "front":
        do_copy, new_offsets = active, zero
    elif placement == "chain_in_place":
        do_copy = active & ~is_chain
        new_offsets = torch.where(active & is_chain, nacc - 1, zero)
    else:
        last = acc.gather(1, start[:, None]).squeeze(1)
        do_copy = active & ~is_chain
        new_offsets = torch.where(active, last, zero)
    return src_cols.to(torch.int32), do_copy, new_offsets.to(torch.int32)


if HAS_TRITON:
    @triton.jit
    def _commit_conv_kernel(conv_state, conv_state_indices, src_cols, do_copy, dest_offsets,
                            stride_cs_line, stride_cs_dim, stride_cs_col, D,
                            W1: tl.constexpr, NP2_W1: tl.constexpr, BLOCK_D: tl.constexpr):
        i_r = tl.program_id(0)
        i_d = tl.program_id(1)
        if tl.load(do_copy + i_r) != 0:
            o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
            rows = tl.arange(0, NP2_W1)
            mask = (rows < W1)[:, None] & (o_d < D)[None, :]
            line = tl.load(conv_state_indices + i_r).to(tl.int64)
            cols = tl.load(src_cols + i_r * W1 + rows, mask=rows < W1, other=0).to(tl.int64)
            base = conv_state + line * stride_cs_line + o_d[None, :] * stride_cs_dim
            vals = tl.load(base + cols[:, None] * stride_cs_col, mask=mask, other=0.0)
            # source and destination columns overlap in the same line: read all, then write
            tl.debug_barrier()
            dest = tl.load(dest_offsets + i_r).to(tl.int64)
            tl.store(base + (dest + rows)[:, None] * stride_cs_col, vals, mask=mask)


def commit_conv_state_triton(conv_state, conv_state_indices, src_cols, do_copy, dest_offsets,
                             block_d=256):
    B = src_cols.shape[0]
    D = conv_state.shape[1]
    W1 = src_cols.shape[1]
    grid = (B, triton.cdiv(D, block_d))
    _commit_conv_kernel[grid](conv_state, conv_state_indices, src_cols, do_copy.to(torch.int8),
                              dest_offsets,
                              conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), D,
                              W1=W1, NP2_W1=triton.next_power_of_2(W1), BLOCK_D=block_d)


if HAS_TRITON:
    @triton.jit
    def _copy_lines_kernel(pool, src_lines, dst_lines, flags, stride_line, numel,
                           BLOCK: tl.constexpr):
        i_r = tl.program_id(0)
        i_c = tl.program_id(1)
        if tl.load(flags + i_r) != 0:
            src = tl.load(src_lines + i_r).to(tl.int64)
            dst = tl.load(dst_lines + i_r).to(tl.int64)
            offs = i_c * BLOCK + tl.arange(0, BLOCK)
            mask = offs < numel
            vals = tl.load(pool + src * stride_line + offs, mask=mask)
            tl.store(pool + dst * stride_line + offs, vals, mask=mask)


def copy_state_lines_triton(pool, src_lines, dst_lines, flags, block=2048):
    """pool[dst_lines[r]] = pool[src_lines[r]] where flags[r]; each line one contiguous block."""
    R = src_lines.shape[0]
    numel = pool[0].numel() if pool.shape[0] else 0
    if R == 0 or numel == 0:
        return
    grid = (R, triton.cdiv(numel, block))
    _copy_lines_kernel[grid](pool, src_lines, dst_lines, flags.to(torch.int8), pool.stride(0), numel,
                             BLOCK=block)


def copy_state_lines_torch(pool, src_lines, dst_lines, flags):
    """Reference: boolean selection of the flagged rows (a device->host sync on CUDA)."""
    sel = flags.bool()
    src, dst = src_lines.long()[sel], dst_lines.long()[sel]
    if src.numel():
        pool[dst] = pool[src]


def commit_conv_state_torch(conv_state, conv_state_indices, src_cols, do_copy, dest_offsets):
    rows = torch.nonzero(do_copy).squeeze(1)
    if rows.numel() == 0:
        return
    lines = conv_state_indices.long()[rows]
    D = conv_state.shape[1]
    cur = conv_state[lines]  # [R, D, S] (a copy, so overlapping columns are safe)
    cols = src_cols.long()[rows]
    new_hist = cur.gather(2, cols[:, None, :].expand(-1, D, -1))
    dest = dest_offsets.long()[rows][:, None] + torch.arange(cols.shape[1], device=cols.device)
    # duplicate lines are not allowed (validated), so the scatter is well defined
    cur.scatter_(2, dest[:, None, :].expand(-1, D, -1), new_hist)
    conv_state[lines] = cur


def accepted_state_lines(node_state_indices: torch.Tensor, last_accepted_node: torch.Tensor):
    """Index-only recurrent commit: the state-pool line that holds each request's new state.

    Pass the result as ``initial_state_indices`` of the next tree (or chain) step. Requests with
    last_accepted_node < 0 get -1.
    """
    last = last_accepted_node.long()
    lines = node_state_indices.long().gather(1, last.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(last >= 0, lines, torch.full_like(lines, -1))


def commit_recurrent_state(state_pool, cache_indices, node_state_indices, last_accepted_node,
                           slot_pool=None):
    """Copy path: state_pool[cache_indices[r]] = slot_pool[slot of last_accepted_node[r]].

    Requests with last_accepted_node < 0 keep their cache line. Works on any device (torch ops).
    """
    if slot_pool is None:
        slot_pool = state_pool
    if last_accepted_node.shape != cache_indices.shape or node_state_indices.dim() != 2:
        raise ValueError("last_accepted_node: must be [B] like cache_indices, with "
                         "node_state_indices [B, N]")
    last = last_accepted_node.long()
    src = accepted_state_lines(node_state_indices, last).clamp(min=0)
    dst = cache_indices.long()
    new = slot_pool.index_select(0, src).to(state_pool.dtype)
    old = state_pool.index_select(0, dst)
    new = torch.where((last >= 0).view(-1, *([1] * (new.dim() - 1))), new, old)
    state_pool.index_copy_(0, dst, new)
