"""Tree-aware causal depthwise conv1d update (the conv in front of a GDN layer) for tree verify.

A node's conv window is the last W inputs along its root-to-node path: its own input, its parent's,
its grandparent's, ..., and above the root the request's cached conv history. One program owns one
request and a block of channels and handles all its nodes at once as a [nodes, channels] tile: for
each of the W-1 window positions it follows ``parents`` one step for every node (a vector gather) and
loads the ancestors' inputs from ``x``, or the history column once the walk has left the tree.

Optionally the kernel stages the block's inputs into the request's conv-state line in vLLM's rolling
layout ([h1 .. h_{W-2}, x_0 .. x_{n-1}], see docs/tree-gdn.md), so that the commit can rebuild the
history along any accepted path after the forward pass without keeping ``x`` around.
"""

from __future__ import annotations

import triton
import triton.language as tl


TILE_ELEMENTS_DEFAULT = 1024


@triton.jit
def _tree_conv1d_kernel(
    x, weight, bias, conv_state, conv_state_indices, conv_state_offsets,
    parents, num_nodes, out,
    stride_x_tok, stride_w_dim, stride_w_col,
    stride_cs_line, stride_cs_dim, stride_cs_col, stride_out_tok,
    D,
    N: tl.constexpr, NP2_N: tl.constexpr, W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_OFFSETS: tl.constexpr, SILU: tl.constexpr,
    STAGE_INPUTS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_r = tl.program_id(0)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = o_d < D
    nodes = tl.arange(0, NP2_N)
    n_nodes = tl.load(num_nodes + i_r).to(tl.int32)
    real = nodes < n_nodes
    mask_real = real[:, None] & mask_d[None, :]
    tok0 = (i_r * N).to(tl.int64)

    if n_nodes > 0:
        line = tl.load(conv_state_indices + i_r).to(tl.int64)
        if HAS_OFFSETS:
            col0 = tl.load(conv_state_offsets + i_r).to(tl.int64)
        else:
            col0 = 0
        cs_line = conv_state + line * stride_cs_line + o_d[None, :] * stride_cs_dim

        # All nodes at once: window position j (j steps back from the node) is a [nodes, channels]
        # tile gathered from x along the ancestor vector, or from the cached history above the root.
        x_tile = tl.load(x + (tok0 + nodes)[:, None] * stride_x_tok + o_d[None, :],
                         mask=mask_real, other=0.0)
        w_last = tl.load(weight + o_d * stride_w_dim + (W - 1) * stride_w_col, mask=mask_d,
                         other=0.0).to(tl.float32)
        acc = x_tile.to(tl.float32) * w_last[None, :]
        if HAS_BIAS:
            acc += tl.load(bias + o_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        anc = nodes
        hist_row = tl.full([NP2_N], W - 1, tl.int32)
        for j in tl.static_range(1, W):
            anc = tl.load(parents + i_r * N + tl.maximum(anc, 0), mask=real & (anc >= 0),
                          other=-1).to(tl.int32)
            hist_row = tl.where(anc >= 0, hist_row, hist_row - 1)
            in_tree = anc >= 0
            from_x = tl.load(x + (tok0 + tl.maximum(anc, 0))[:, None] * stride_x_tok + o_d[None, :],
                             mask=mask_real & in_tree[:, None], other=0.0)
            from_h = tl.load(cs_line + (col0 + tl.maximum(hist_row, 0))[:, None] * stride_cs_col,
                             mask=mask_real & (~in_tree)[:, None], other=0.0)
            val = tl.where(in_tree[:, None], from_x.to(tl.float32), from_h.to(tl.float32))
            w_j = tl.load(weight + o_d * stride_w_dim + (W - 1 - j) * stride_w_col, mask=mask_d,
                          other=0.0).to(tl.float32)
            acc += val * w_j[None, :]
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        acc = tl.where(mask_real, acc, 0.0)
        tl.store(out + (tok0 + nodes)[:, None] * stride_out_tok + o_d[None, :],
                 acc.to(out.dtype.element_ty), mask=(nodes < N)[:, None] & mask_d[None, :])

        if STAGE_INPUTS:
            hrows = tl.arange(0, W)
            hist = tl.load(cs_line + (col0 + hrows + 1)[:, None] * stride_cs_col,
                           mask=(hrows < W - 2)[:, None] & mask_d[None, :], other=0.0)
            # every read of this line happened above; the barrier orders them before the overwrite
            tl.debug_barrier()
            tl.store(cs_line + hrows[:, None] * stride_cs_col, hist,
                     mask=(hrows < W - 2)[:, None] & mask_d[None, :])
            tl.store(cs_line + (W - 2 + nodes)[:, None] * stride_cs_col,
                     x_tile.to(conv_state.dtype.element_ty), mask=mask_real)
    else:
        zero = tl.zeros([NP2_N, BLOCK_D], dtype=tl.float32)
        tl.store(out + (tok0 + nodes)[:, None] * stride_out_tok + o_d[None, :],
                 zero.to(out.dtype.element_ty), mask=(nodes < N)[:, None] & mask_d[None, :])


def tree_conv1d_update_triton(x, weight, bias, conv_state, conv_state_indices, conv_state_offsets,
                              parents, num_nodes, out, silu, stage_inputs, block_d=None,
                              num_warps=4):
    """Launch the kernel; arguments are already validated by ``ddtree.ops.gdn.api``."""
    B, N = parents.shape
    D, W = weight.shape
    np2_n = triton.next_power_of_2(N)
    if block_d is None:  # about 1K elements per [nodes, channels] tile (no register spills)
        block_d = max(16, min(256, TILE_ELEMENTS_DEFAULT // np2_n))
    grid = (B, triton.cdiv(D, block_d))
    _tree_conv1d_kernel[grid](
        x, weight, bias if bias is not None else weight, conv_state, conv_state_indices,
        conv_state_offsets if conv_state_offsets is not None else conv_state_indices,
        parents, num_nodes, out,
        x.stride(0), weight.stride(0), weight.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), out.stride(0),
        D,
        N=N, NP2_N=np2_n, W=W,
        HAS_BIAS=bias is not None, HAS_OFFSETS=conv_state_offsets is not None,
        SILU=bool(silu), STAGE_INPUTS=bool(stage_inputs), BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out
