"""Tree-aware sigmoid-gated delta rule (the GDN recurrence) for tree verify.

One program owns one (request, value head, block of BV value rows) and walks the request's nodes
in index order (parents come before children). The recurrent state lives in registers; when a
node's parent is not the node processed just before it, the parent's state is reloaded from the
parent's slot, which this same program wrote earlier. Every node's state is written to its slot,
so any node can later become the committed state without replaying the recurrence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tree_gdn_fwd_kernel(
    q, k, v, a, b, A_log, dt_bias,
    parents, num_nodes,
    state_pool, initial_state_indices,
    slot_pool, node_state_indices,
    o,
    scale, softplus_beta, softplus_threshold,
    stride_state_line, stride_slot_line, stride_node_idx_req,
    N: tl.constexpr, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, USE_QK_L2NORM: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_rh = tl.program_id(1)
    i_r = i_rh // HV
    i_hv = i_rh % HV
    i_h = i_hv // (HV // H)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_h = mask_v[:, None] & mask_k[None, :]
    h_offsets = i_hv * V * K + o_v[:, None] * K + o_k[None, :]

    n_nodes = tl.load(num_nodes + i_r).to(tl.int32)
    neg_A = -tl.exp(tl.load(A_log + i_hv).to(tl.float32))
    dtb = tl.load(dt_bias + i_hv).to(tl.float32)

    b_h = tl.zeros([BV, BK], dtype=tl.float32)
    if n_nodes > 0:
        init_line = tl.load(initial_state_indices + i_r).to(tl.int64)
        b_h = tl.load(state_pool + init_line * stride_state_line + h_offsets,
                      mask=mask_h, other=0.0).to(tl.float32)

    for n in range(0, n_nodes):
        par = tl.load(parents + i_r * N + n).to(tl.int32)
        # The root's parent is -1 == n - 1, so the root also keeps the registers (initial state).
        if par != n - 1:
            # The parent's slot was stored by this program; the barrier makes the stores of all
            # its threads visible before the reload, whatever layout the compiler picked.
            tl.debug_barrier()
            par_line = tl.load(node_state_indices + i_r * stride_node_idx_req + par).to(tl.int64)
            b_h = tl.load(slot_pool + par_line * stride_slot_line + h_offsets,
                          mask=mask_h, other=0.0).to(tl.float32)

        tok = (i_r * N + n).to(tl.int64)
        b_q = tl.load(q + (tok * H + i_h) * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (tok * H + i_h) * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (tok * HV + i_hv) * V + o_v, mask=mask_v, other=0.0).to(tl.float32)
        x = tl.load(a + tok * HV + i_hv).to(tl.float32) + dtb
        bx = softplus_beta * x
        softplus_x = tl.where(bx <= softplus_threshold,
                              tl.log(1.0 + tl.exp(tl.minimum(bx, softplus_threshold))) / softplus_beta,
                              x)
        b_g = neg_A * softplus_x
        b_beta = tl.sigmoid(tl.load(b + tok * HV + i_hv).to(tl.float32))
        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        b_q = b_q * scale

        b_h *= tl.exp(b_g)
        b_v = (b_v - tl.sum(b_h * b_k[None, :], 1)) * b_beta
        b_h += b_v[:, None] * b_k[None, :]
        b_o = tl.sum(b_h * b_q[None, :], 1)
        tl.store(o + (tok * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=mask_v)

        slot_line = tl.load(node_state_indices + i_r * stride_node_idx_req + n).to(tl.int64)
        tl.store(slot_pool + slot_line * stride_slot_line + h_offsets,
                 b_h.to(slot_pool.dtype.element_ty), mask=mask_h)

    # Padding nodes get zero outputs so the token-major output holds no stale values.
    zero_o = tl.zeros([BV], dtype=tl.float32)
    for n in range(n_nodes, N):
        tok = (i_r * N + n).to(tl.int64)
        tl.store(o + (tok * HV + i_hv) * V + o_v, zero_o.to(o.dtype.element_ty), mask=mask_v)


def tree_gated_delta_rule_triton(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, state_pool,
                                 initial_state_indices, node_state_indices, slot_pool, out, scale,
                                 use_qk_l2norm, softplus_beta, softplus_threshold, block_v=None,
                                 num_warps=4):
    """Launch the kernel; arguments are already validated by ``ddtree.ops.gdn.api``."""
    B, N = parents.shape
    T, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    BK = triton.next_power_of_2(K)
    BV = block_v or min(triton.next_power_of_2(V), 32)
    grid = (triton.cdiv(V, BV), B * HV)
    _tree_gdn_fwd_kernel[grid](
        q, k, v, a, b, A_log, dt_bias,
        parents, num_nodes,
        state_pool, initial_state_indices,
        slot_pool, node_state_indices,
        out,
        float(scale), float(softplus_beta), float(softplus_threshold),
        state_pool.stride(0), slot_pool.stride(0), node_state_indices.stride(0),
        N=N, H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, USE_QK_L2NORM=bool(use_qk_l2norm),
        num_warps=num_warps,
    )
    return out
