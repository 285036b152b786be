"""Tree-aware sigmoid-gated delta rule (the GDN recurrence) for tree verify.

One program owns one (request, value head, block of BV value rows) and walks the request's nodes
in index order (parents come before children). The recurrent state lives in registers; when a
node's parent is not the node processed just before it, the parent's state is reloaded from the
parent's slot, which this same program wrote earlier. The next node's inputs are loaded one node
ahead so their latency overlaps the current node's arithmetic. Every node's state is written to its slot,
so any node can later become the committed state without replaying the recurrence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Two ways to reload a parent's state (both correct, timed in benchmarks/bench_tree_gdn.py):
# prefetch it one node ahead (masked load + select; more registers), or branch and load it when the
# node starts. On an H100 they tied (the kernel is HBM-bound at batch >= 8 and the reloads mostly
# come from HBM either way), so the simpler branch is the default; BV 32 / 4 warps measured best.
PREFETCH_PARENT_DEFAULT = False
BLOCK_V_DEFAULT = 32


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
    PREFETCH_PARENT: tl.constexpr,
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

    # Software pipelining: node n+1's inputs (and, with PREFETCH_PARENT, its parent's saved state
    # when that parent is not node n) are loaded at the top of iteration n, so the loads overlap
    # node n's arithmetic instead of stalling the next iteration.
    tok = (i_r * N).to(tl.int64)
    b_q = tl.load(q + (tok * H + i_h) * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + (tok * H + i_h) * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + (tok * HV + i_hv) * V + o_v, mask=mask_v, other=0.0).to(tl.float32)
    b_a = tl.load(a + tok * HV + i_hv).to(tl.float32)
    b_b = tl.load(b + tok * HV + i_hv).to(tl.float32)
    for n in range(0, n_nodes):
        tok = (i_r * N + n).to(tl.int64)
        has_nx = n + 1 < n_nodes
        nx_tok = tok + 1
        if PREFETCH_PARENT:
            # node n+1's parent state, if it is not node n: its slot was written in an earlier
            # iteration (parent <= n-1). The root's parent (-1) never shows up here.
            par_nx = tl.load(parents + i_r * N + n + 1, mask=has_nx, other=n).to(tl.int32)
            reload = par_nx != n
            par_line = tl.load(node_state_indices + i_r * stride_node_idx_req
                               + tl.maximum(par_nx, 0), mask=reload, other=0).to(tl.int64)
            h_par = tl.load(slot_pool + par_line * stride_slot_line + h_offsets,
                            mask=mask_h & reload, other=0.0).to(tl.float32)
        else:
            # reload node n's parent now if it is not node n-1 (the root's parent -1 == n-1)
            par = tl.load(parents + i_r * N + n).to(tl.int32)
            if par != n - 1:
                par_line = tl.load(node_state_indices + i_r * stride_node_idx_req + par).to(tl.int64)
                b_h = tl.load(slot_pool + par_line * stride_slot_line + h_offsets,
                              mask=mask_h, other=0.0).to(tl.float32)
        nq = tl.load(q + (nx_tok * H + i_h) * K + o_k, mask=mask_k & has_nx, other=0.0)
        nk = tl.load(k + (nx_tok * H + i_h) * K + o_k, mask=mask_k & has_nx, other=0.0)
        nv = tl.load(v + (nx_tok * HV + i_hv) * V + o_v, mask=mask_v & has_nx, other=0.0)
        na = tl.load(a + nx_tok * HV + i_hv, mask=has_nx, other=0.0)
        nb = tl.load(b + nx_tok * HV + i_hv, mask=has_nx, other=0.0)
        slot_line = tl.load(node_state_indices + i_r * stride_node_idx_req + n).to(tl.int64)

        x = b_a + dtb
        bx = softplus_beta * x
        softplus_x = tl.where(bx <= softplus_threshold,
                              tl.log(1.0 + tl.exp(tl.minimum(bx, softplus_threshold))) / softplus_beta,
                              x)
        b_g = neg_A * softplus_x
        b_beta = tl.sigmoid(b_b)
        if USE_QK_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)
        b_q = b_q * scale

        b_h *= tl.exp(b_g)
        b_v = (b_v - tl.sum(b_h * b_k[None, :], 1)) * b_beta
        b_h += b_v[:, None] * b_k[None, :]
        b_o = tl.sum(b_h * b_q[None, :], 1)
        tl.store(o + (tok * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=mask_v)
        tl.store(slot_pool + slot_line * stride_slot_line + h_offsets,
                 b_h.to(slot_pool.dtype.element_ty), mask=mask_h)
        # Later iterations may reload this slot; the barrier makes the stores of all threads
        # visible whatever register layout the compiler picked for the load.
        tl.debug_barrier()

        if PREFETCH_PARENT:
            b_h = tl.where(reload, h_par, b_h)
        b_q, b_k, b_v = nq.to(tl.float32), nk.to(tl.float32), nv.to(tl.float32)
        b_a, b_b = na.to(tl.float32), nb.to(tl.float32)

    # Padding nodes get zero outputs so the token-major output holds no stale values.
    zero_o = tl.zeros([BV], dtype=tl.float32)
    for n in range(n_nodes, N):
        tok = (i_r * N + n).to(tl.int64)
        tl.store(o + (tok * HV + i_hv) * V + o_v, zero_o.to(o.dtype.element_ty), mask=mask_v)


def tree_gated_delta_rule_triton(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, state_pool,
                                 initial_state_indices, node_state_indices, slot_pool, out, scale,
                                 use_qk_l2norm, softplus_beta, softplus_threshold, block_v=None,
                                 num_warps=4, prefetch_parent=PREFETCH_PARENT_DEFAULT):
    """Launch the kernel; arguments are already validated by ``ddtree.ops.gdn.api``."""
    B, N = parents.shape
    T, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    BK = triton.next_power_of_2(K)
    BV = block_v or min(triton.next_power_of_2(V), BLOCK_V_DEFAULT)
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
        PREFETCH_PARENT=bool(prefetch_parent),
        num_warps=num_warps,
    )
    return out
