"""Tree-aware causal depthwise conv1d update (the conv in front of a GDN layer) for tree verify.

A node's conv window is the last W inputs along its root-to-node path: its own input, its parent's,
its grandparent's, ..., and above the root the request's cached conv history. One program owns one
request and a block of channels and walks the nodes in index order; ancestors are found by following
``parents`` (W - 1 scalar loads per node) and their inputs are read straight from ``x``.

Optionally the kernel stages the block's inputs into the request's conv-state line in vLLM's rolling
layout ([h1 .. h_{W-2}, x_0 .. x_{n-1}], see docs/tree-gdn.md), so that the commit can rebuild the
history along any accepted path after the forward pass without keeping ``x`` around.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tree_conv1d_kernel(
    x, weight, bias, conv_state, conv_state_indices, conv_state_offsets,
    parents, num_nodes, out,
    stride_x_tok, stride_w_dim, stride_w_col,
    stride_cs_line, stride_cs_dim, stride_cs_col, stride_out_tok,
    D,
    N: tl.constexpr, W: tl.constexpr, NP2_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_OFFSETS: tl.constexpr, SILU: tl.constexpr,
    STAGE_INPUTS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_r = tl.program_id(0)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = o_d < D
    n_nodes = tl.load(num_nodes + i_r).to(tl.int32)
    rows = tl.arange(0, NP2_W)

    if n_nodes > 0:
        line = tl.load(conv_state_indices + i_r).to(tl.int64)
        if HAS_OFFSETS:
            col0 = tl.load(conv_state_offsets + i_r).to(tl.int64)
        else:
            col0 = 0
        cs_base = conv_state + line * stride_cs_line + o_d[None, :] * stride_cs_dim
        # history rows 0 .. W-2, oldest first; row W-1 (and the pow2 padding) stays zero
        hist = tl.load(cs_base + (col0 + rows)[:, None] * stride_cs_col,
                       mask=(rows < W - 1)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        wts = tl.load(weight + o_d[None, :] * stride_w_dim + rows[:, None] * stride_w_col,
                      mask=(rows < W)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc0 = tl.load(bias + o_d, mask=mask_d, other=0.0).to(tl.float32)
        else:
            acc0 = tl.zeros([BLOCK_D], dtype=tl.float32)
        w_last = tl.sum(tl.where(rows[:, None] == W - 1, wts, 0.0), 0)

        for n in range(0, n_nodes):
            tok = (i_r * N + n).to(tl.int64)
            x_n = tl.load(x + tok * stride_x_tok + o_d, mask=mask_d, other=0.0).to(tl.float32)
            acc = acc0 + w_last * x_n
            cur = n
            hist_row = W - 1  # next history row to use once the walk leaves the tree
            for j in tl.static_range(1, W):
                # move one step up the ancestor path (stays at -1 above the root)
                cur = tl.load(parents + i_r * N + cur, mask=cur >= 0, other=-1).to(tl.int32)
                hist_row = tl.where(cur >= 0, hist_row, hist_row - 1)
                anc_tok = (i_r * N + tl.maximum(cur, 0)).to(tl.int64)
                x_anc = tl.load(x + anc_tok * stride_x_tok + o_d, mask=mask_d & (cur >= 0),
                                other=0.0).to(tl.float32)
                h_val = tl.sum(tl.where(rows[:, None] == hist_row, hist, 0.0), 0)
                val = tl.where(cur >= 0, x_anc, h_val)
                w_j = tl.sum(tl.where(rows[:, None] == W - 1 - j, wts, 0.0), 0)
                acc += w_j * val
            if SILU:
                acc = acc / (1.0 + tl.exp(-acc))
            tl.store(out + tok * stride_out_tok + o_d, acc.to(out.dtype.element_ty), mask=mask_d)

        if STAGE_INPUTS:
            # All reads of this line happened above; the barrier orders them before the overwrite.
            tl.debug_barrier()
            for j in tl.static_range(0, W - 2):
                h_val = tl.sum(tl.where(rows[:, None] == j + 1, hist, 0.0), 0)
                tl.store(conv_state + line * stride_cs_line + o_d * stride_cs_dim + j * stride_cs_col,
                         h_val.to(conv_state.dtype.element_ty), mask=mask_d)
            for n in range(0, n_nodes):
                tok = (i_r * N + n).to(tl.int64)
                x_n = tl.load(x + tok * stride_x_tok + o_d, mask=mask_d, other=0.0)
                tl.store(conv_state + line * stride_cs_line + o_d * stride_cs_dim
                         + (W - 2 + n) * stride_cs_col,
                         x_n.to(conv_state.dtype.element_ty), mask=mask_d)

    zero = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n in range(n_nodes, N):
        tok = (i_r * N + n).to(tl.int64)
        tl.store(out + tok * stride_out_tok + o_d, zero.to(out.dtype.element_ty), mask=mask_d)


def tree_conv1d_update_triton(x, weight, bias, conv_state, conv_state_indices, conv_state_offsets,
                              parents, num_nodes, out, silu, stage_inputs, block_d=256,
                              num_warps=4):
    """Launch the kernel; arguments are already validated by ``ddtree.ops.gdn.api``."""
    B, N = parents.shape
    D, W = weight.shape
    grid = (B, triton.cdiv(D, block_d))
    _tree_conv1d_kernel[grid](
        x, weight, bias if bias is not None else weight, conv_state, conv_state_indices,
        conv_state_offsets if conv_state_offsets is not None else conv_state_indices,
        parents, num_nodes, out,
        x.stride(0), weight.stride(0), weight.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), out.stride(0),
        D,
        N=N, W=W, NP2_W=triton.next_power_of_2(W),
        HAS_BIAS=bias is not None, HAS_OFFSETS=conv_state_offsets is not None,
        SILU=bool(silu), STAGE_INPUTS=bool(stage_inputs), BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out
