"""Public entry points for the tree-aware GDN ops: validation + Triton/torch dispatch.

Contract (full text in docs/tree-gdn.md):
- A batch of B trees, each padded to N nodes. ``parents[r, n]`` is the parent of node n of request r
  (node 0 = root = the last committed token, processed as a token; its parent is -1). Real nodes are
  0..num_nodes[r]-1 and satisfy 0 <= parents[r, n] < n for n >= 1. Entries past num_nodes are ignored
  (use -1). num_nodes[r] == 0 marks a padding request: nothing is read or written for it except zero
  outputs.
- Token-major layout: row r * N + n of every per-token tensor belongs to node n of request r.
- Backend: Triton when the tensors are on CUDA, or when TRITON_INTERPRET=1 is set explicitly (the
  interpreter runs the kernels on CPU tensors); the vectorised torch implementation otherwise.
  ``backend="triton" | "torch"`` forces one.
"""

from __future__ import annotations

import os

import torch

from . import torch_impl
from .commit import (accepted_state_lines, commit_conv_state_torch, commit_recurrent_state,
                     conv_commit_plan, copy_state_lines_torch)

try:
    import triton  # noqa: F401

    from .commit import commit_conv_state_triton, copy_state_lines_triton
    from .tree_conv1d import tree_conv1d_update_triton
    from .tree_delta_rule import tree_gated_delta_rule_triton
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

__all__ = [
    "tree_conv1d_update", "tree_gated_delta_rule", "commit_conv_state", "make_conv_commit_plan",
    "commit_recurrent_state", "accepted_state_lines", "check_tree", "use_triton", "copy_state_lines",
]

_INT_DTYPES = (torch.int32, torch.int64)


def use_triton(t: torch.Tensor, backend: str | None = None) -> bool:
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise ValueError("backend='triton' requested but triton is not importable")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _require(cond: bool, field: str, msg):
    """Raise ValueError("field: msg") unless cond. msg may be a callable returning the text: the
    checks run on every call of a hot op (once per layer and step), so messages are built only
    when a check fails."""
    if not cond:
        raise ValueError(f"{field}: {msg() if callable(msg) else msg}")


def _check_index(t, name, shape, device):
    _require(isinstance(t, torch.Tensor), name, "must be a tensor")
    _require(t.dtype in _INT_DTYPES, name, lambda: f"must be int32/int64, got {t.dtype}")
    _require(tuple(t.shape) == tuple(shape), name,
             lambda: f"expected shape {tuple(shape)}, got {tuple(t.shape)}")
    _require(t.device == device, name, lambda: f"on {t.device}, expected {device}")


def _check_tree_shapes(parents, num_nodes, device):
    _require(isinstance(parents, torch.Tensor) and parents.dim() == 2, "parents", "must be [B, N]")
    _check_index(parents, "parents", parents.shape, device)
    _check_index(num_nodes, "num_nodes", (parents.shape[0],), device)
    _require(parents.shape[1] >= 1, "parents", "needs at least one node column")


def check_tree(parents: torch.Tensor, num_nodes: torch.Tensor) -> None:
    """Value checks of the tree arrays (one device sync): root first, parents before children."""
    B, N = parents.shape
    nn_ = num_nodes.long()
    _require(bool(((nn_ >= 0) & (nn_ <= N)).all()), "num_nodes", lambda: f"values must lie in [0, {N}]")
    par = parents.long()
    node = torch.arange(N, device=parents.device)[None, :]
    real = node < nn_[:, None]
    root_ok = (par[:, 0] == -1) | (nn_ == 0)
    _require(bool(root_ok.all()), "parents", "node 0 (the root) must have parent -1")
    later = real & (node >= 1)
    ok = (~later) | ((par >= 0) & (par < node))
    if not bool(ok.all()):
        r, n = torch.nonzero(~ok)[0].tolist()
        raise ValueError(f"parents: parents[{r}, {n}] = {int(par[r, n])} must lie in [0, {n}) "
                         "(nodes are numbered parent-before-child)")


def _check_unique_lines(idx: torch.Tensor, active: torch.Tensor, name: str):
    vals = idx.long()[active]
    _require(vals.numel() == torch.unique(vals).numel(), name, "lines of active requests must be distinct")


def _squeeze_batch(t):
    return t.squeeze(0) if t is not None and t.dim() >= 1 and t.dim() == 4 and t.shape[0] == 1 else t


def tree_conv1d_update(x, conv_state, weight, bias, parents, num_nodes, conv_state_indices,
                       conv_state_offsets=None, activation="silu", stage_inputs=False, out=None,
                       check_tree_values=True, backend=None, kernel_options=None):
    """Causal conv1d update over a batch of trees.

    x: [B*N, D] conv inputs (token-major). conv_state: [lines, D, S] (any strides; vLLM's SD layout
    passed as a transposed view works), S >= W-1 (+ offsets), and S >= W-2+N with stage_inputs.
    weight: [D, W] or [D, 1, W]. conv_state_indices [B]: the request's line; conv_state_offsets [B]
    (optional): the history is columns off..off+W-2 of that line (vLLM: num_accepted_tokens-1).
    Returns out [B*N, D] (dtype of x; zeros for padding nodes). With stage_inputs the line is rewritten
    to [h1..h_{W-2}, x_0..x_{n-1}] for commit_conv_state.
    """
    _require(isinstance(x, torch.Tensor) and x.dim() == 2, "x", "must be [B*N, D]")
    _check_tree_shapes(parents, num_nodes, x.device)
    B, N = parents.shape
    if weight.dim() == 3:
        _require(weight.shape[1] == 1, "weight", "3-D weight must be [D, 1, W]")
        weight = weight.view(weight.shape[0], weight.shape[2])
    _require(weight.dim() == 2, "weight", "must be [D, W]")
    D, W = weight.shape
    _require(W >= 2, "weight", "kernel width must be >= 2")
    _require(tuple(x.shape) == (B * N, D), "x", lambda: f"expected shape {(B * N, D)}, got {tuple(x.shape)}")
    _require(x.stride(1) == 1, "x", "channel dim must be contiguous")
    _require(bias is None or tuple(bias.shape) == (D,), "bias", lambda: f"expected shape ({D},)")
    _require(conv_state.dim() == 3 and conv_state.shape[1] == D, "conv_state",
             lambda: f"must be [lines, {D}, S], got {tuple(conv_state.shape)}")
    S = conv_state.shape[2]
    _require(S >= W - 1, "conv_state", lambda: f"needs at least W-1={W - 1} columns, has {S}")
    if stage_inputs:
        _require(S >= W - 2 + N, "conv_state",
                 lambda: f"stage_inputs needs W-2+N={W - 2 + N} columns, has {S}")
    _check_index(conv_state_indices, "conv_state_indices", (B,), x.device)
    if conv_state_offsets is not None:
        _check_index(conv_state_offsets, "conv_state_offsets", (B,), x.device)
    _require(activation in (None, "silu", "swish"), "activation", lambda: f"unsupported {activation!r}")
    if out is None:
        out = torch.empty_like(x)
    _require(tuple(out.shape) == (B * N, D) and out.stride(1) == 1, "out", "must be [B*N, D], contiguous channels")
    if check_tree_values:
        check_tree(parents, num_nodes)
        active = num_nodes.long() > 0
        lines = conv_state_indices.long()[active]
        _require(bool(((lines >= 0) & (lines < conv_state.shape[0])).all()), "conv_state_indices",
                 "out of range for active requests")
        if conv_state_offsets is not None:
            offs = conv_state_offsets.long()[active]
            _require(bool(((offs >= 0) & (offs + W - 1 <= S)).all()), "conv_state_offsets",
                     lambda: f"history columns off..off+{W - 2} must lie inside the {S} columns")
        if stage_inputs:
            _check_unique_lines(conv_state_indices, active, "conv_state_indices")
    silu = activation in ("silu", "swish")
    if use_triton(x, backend):
        return tree_conv1d_update_triton(x, weight, bias, conv_state, conv_state_indices,
                                         conv_state_offsets, parents, num_nodes, out, silu,
                                         stage_inputs, **(kernel_options or {}))
    return torch_impl.tree_conv1d_update_torch(x, weight, bias, conv_state, conv_state_indices,
                                               conv_state_offsets, parents, num_nodes, out, silu,
                                               stage_inputs)


def tree_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, parents, num_nodes, state_pool,
                          initial_state_indices, node_state_indices, slot_pool=None, scale=None,
                          use_qk_l2norm=True, softplus_beta=1.0, softplus_threshold=20.0, out=None,
                          check_tree_values=True, backend=None, kernel_options=None):
    """Sigmoid-gated delta rule over a batch of trees (vLLM Qwen3.5 decode math).

    q, k: [B*N, H, K] (or [1, B*N, H, K]); v: [B*N, HV, V]; a, b: [B*N, HV]; A_log, dt_bias: [HV].
    state_pool: [lines, HV, V, K]; initial_state_indices [B]: line holding the state before the root.
    node_state_indices [B, >=N]: line (in slot_pool, default state_pool) receiving node n's state.
    Slot dtype = slot_pool dtype (fp32, or bf16 to halve the bytes). Returns o [B*N, HV, V] (dtype of v).
    kernel_options: Triton launch knobs (block_v, num_warps, prefetch_parent); defaults are the
    ones measured best on an H100 (benchmarks/bench_tree_gdn.py).
    """
    q, k, v = _squeeze_batch(q), _squeeze_batch(k), _squeeze_batch(v)
    if a is not None and a.dim() == 3 and a.shape[0] == 1:
        a, b = a.squeeze(0), b.squeeze(0)
    _check_tree_shapes(parents, num_nodes, q.device)
    B, N = parents.shape
    _require(q.dim() == 3, "q", "must be [B*N, H, K]")
    T, H, K = q.shape
    _require(T == B * N, "q", lambda: f"expected {B * N} tokens (B*N), got {T}")
    _require(tuple(k.shape) == (T, H, K), "k", lambda: f"expected {(T, H, K)}, got {tuple(k.shape)}")
    _require(v.dim() == 3 and v.shape[0] == T, "v", "must be [B*N, HV, V]")
    HV, V = v.shape[1], v.shape[2]
    _require(HV % H == 0, "v", lambda: f"value heads ({HV}) must be a multiple of key heads ({H})")
    _require(tuple(a.shape) == (T, HV), "a", lambda: f"expected {(T, HV)}, got {tuple(a.shape)}")
    _require(tuple(b.shape) == (T, HV), "b", lambda: f"expected {(T, HV)}, got {tuple(b.shape)}")
    _require(tuple(A_log.shape) == (HV,), "A_log", lambda: f"expected ({HV},)")
    _require(tuple(dt_bias.shape) == (HV,), "dt_bias", lambda: f"expected ({HV},)")
    if slot_pool is None:
        slot_pool = state_pool
    for name, pool in (("state_pool", state_pool), ("slot_pool", slot_pool)):
        _require(pool.dim() == 4 and tuple(pool.shape[1:]) == (HV, V, K), name,
                 lambda: f"must be [lines, {HV}, {V}, {K}], got {tuple(pool.shape)}")
        _require(pool.dtype in (torch.float32, torch.bfloat16, torch.float16), name,
                 lambda: f"dtype {pool.dtype} not supported")
    _check_index(initial_state_indices, "initial_state_indices", (B,), q.device)
    _require(node_state_indices.dim() == 2 and node_state_indices.shape[0] == B
             and node_state_indices.shape[1] >= N and node_state_indices.stride(1) == 1,
             "node_state_indices",
             lambda: f"must be [B, >= N] with contiguous rows, got {tuple(node_state_indices.shape)}")
    _check_index(node_state_indices, "node_state_indices", node_state_indices.shape, q.device)
    if scale is None:
        scale = K ** -0.5
    _require(scale > 0, "scale", "must be positive")
    if out is None:
        out = torch.empty_like(v)
    _require(tuple(out.shape) == (T, HV, V) and out.is_contiguous(), "out", "must be contiguous [B*N, HV, V]")
    if check_tree_values:
        check_tree(parents, num_nodes)
        active = num_nodes.long() > 0
        init = initial_state_indices.long()[active]
        _require(bool(((init >= 0) & (init < state_pool.shape[0])).all()), "initial_state_indices",
                 "out of range for active requests")
        real = torch.arange(N, device=q.device)[None, :] < num_nodes.long()[:, None]
        used = node_state_indices[:, :N].long()[real]
        _require(bool(((used >= 0) & (used < slot_pool.shape[0])).all()), "node_state_indices",
                 "out of range for real nodes")
        _require(used.numel() == torch.unique(used).numel(), "node_state_indices",
                 "slots of real nodes must be distinct")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    a, b = a.contiguous(), b.contiguous()
    if use_triton(q, backend):
        for name, pool in (("state_pool", state_pool), ("slot_pool", slot_pool)):
            # The torch path takes any strides (e.g. vLLM-CPU's [HV, K, V] memory as a transposed
            # view); the kernel addresses a line as one contiguous [HV, V, K] block.
            _require(pool.stride(3) == 1 and pool.stride(2) == K and pool.stride(1) == V * K, name,
                     "each line must be contiguous [HV, V, K] for the Triton kernel")
        return tree_gated_delta_rule_triton(q, k, v, a, b, A_log, dt_bias, parents, num_nodes,
                                            state_pool, initial_state_indices, node_state_indices,
                                            slot_pool, out, scale, use_qk_l2norm, softplus_beta,
                                            softplus_threshold, **(kernel_options or {}))
    return torch_impl.tree_gated_delta_rule_torch(q, k, v, a, b, A_log, dt_bias, parents, num_nodes,
                                                  state_pool, initial_state_indices,
                                                  node_state_indices, slot_pool, out, scale,
                                                  use_qk_l2norm, softplus_beta, softplus_threshold)


def commit_conv_state(conv_state, conv_state_indices, accepted_nodes=None, num_accepted=None,
                      width=None, placement="front", check_values=True, backend=None, plan=None):
    """Rebuild each request's conv history along its accepted path (after a staged tree forward).

    accepted_nodes [B, L]: node ids on the accepted path, root (0) first; num_accepted [B]: path
    length incl. the root (0 = leave the request alone). Afterwards the history is columns
    new_offsets[r] .. new_offsets[r]+W-2 of the line (pass them as the next step's
    conv_state_offsets). placement: "front" (offset 0), "chain_in_place" (flat-chain paths stay
    where they are, offset num_accepted-1) or "last_node" (offset = last accepted node, vLLM's
    num_accepted_tokens-1 when num_accepted_tokens := last node + 1); see commit.py.
    plan: the result of ``make_conv_commit_plan`` (the same for every GDN layer of a step: compute it
    once per step and pass it to each layer's commit; accepted_nodes/num_accepted/width are then
    ignored). Returns new_offsets [B] int32.
    """
    _require(isinstance(conv_state, torch.Tensor) and conv_state.dim() == 3, "conv_state",
             "must be [lines, D, S]")
    if plan is None:
        plan = make_conv_commit_plan(accepted_nodes, num_accepted, width, conv_state.shape[2],
                                     placement, check_values)
    src_cols, do_copy, new_offsets = plan
    B = src_cols.shape[0]
    _check_index(conv_state_indices, "conv_state_indices", (B,), conv_state.device)
    _require(src_cols.device == conv_state.device, "plan", "must be on the conv_state's device")
    _require(conv_state.shape[2] >= src_cols.shape[1], "conv_state", "fewer columns than W-1")
    if check_values:
        active = do_copy
        lines = conv_state_indices.long()[active]
        _require(bool(((lines >= 0) & (lines < conv_state.shape[0])).all()), "conv_state_indices",
                 "out of range for committed requests")
        _check_unique_lines(conv_state_indices, active, "conv_state_indices")
    if check_values:
        _require(bool((new_offsets.long() + src_cols.shape[1] <= conv_state.shape[2]).all()),
                 "plan", "history would not fit in the line at the new offset")
    if use_triton(conv_state, backend):
        commit_conv_state_triton(conv_state, conv_state_indices, src_cols, do_copy, new_offsets)
    else:
        commit_conv_state_torch(conv_state, conv_state_indices, src_cols, do_copy, new_offsets)
    return new_offsets


def make_conv_commit_plan(accepted_nodes, num_accepted, width, state_len, placement="front",
                          check_values=True):
    """(src_cols [B, W-1] int32, do_copy [B] bool, new_offsets [B] int32) for commit_conv_state.

    state_len: the conv-state line's number of columns S (the staged node inputs are columns
    W-2 .. W-2+N-1). Pure index math on the device of accepted_nodes; no sync unless check_values.
    """
    _require(isinstance(accepted_nodes, torch.Tensor) and accepted_nodes.dim() == 2,
             "accepted_nodes", "must be [B, L]")
    B, L = accepted_nodes.shape
    _check_index(accepted_nodes, "accepted_nodes", (B, L), accepted_nodes.device)
    _check_index(num_accepted, "num_accepted", (B,), accepted_nodes.device)
    _require(isinstance(width, int) and width >= 2 and state_len >= width - 1, "width",
             lambda: f"must be an int >= 2 with W-1 <= state_len ({state_len})")
    if check_values:
        S = state_len
        nacc = num_accepted.long()
        _require(bool(((nacc >= 0) & (nacc <= L)).all()), "num_accepted",
                 lambda: f"values must lie in [0, {L}]")
        in_path = torch.arange(L, device=accepted_nodes.device)[None, :] < nacc[:, None]
        nodes = accepted_nodes.long()[in_path]
        _require(bool(((nodes >= 0) & (nodes + width - 2 < S)).all()), "accepted_nodes",
                 lambda: f"node ids must lie in [0, {S - width + 2}) (the staged columns of the line)")
        active = nacc > 0
        _require(bool((accepted_nodes[:, 0].long()[active] == 0).all()), "accepted_nodes",
                 "every accepted path starts at the root (node 0)")
    return conv_commit_plan(accepted_nodes, num_accepted, width, placement)


def copy_state_lines(pool, src_lines, dst_lines, flags, check_values=False, backend=None):
    """pool[dst_lines[r]] = pool[src_lines[r]] for the requests r with flags[r] (e.g. the recurrent
    state of the last accepted node -> the line vLLM reads next), with static shapes: the Triton
    kernel skips unflagged requests on the device, so the host never learns which ones copy (no
    sync). Lines read must not be written by another request (all reads of a request happen
    before its writes, not across requests). Triton needs each line to be one contiguous block;
    other layouts take the torch path (boolean selection: one sync on CUDA).
    """
    _require(isinstance(pool, torch.Tensor) and pool.dim() >= 2, "pool", "must be [lines, ...]")
    R = src_lines.shape[0] if isinstance(src_lines, torch.Tensor) else -1
    _check_index(src_lines, "src_lines", (R,), pool.device)
    _check_index(dst_lines, "dst_lines", (R,), pool.device)
    _require(isinstance(flags, torch.Tensor) and tuple(flags.shape) == (R,)
             and flags.device == pool.device, "flags", lambda: f"must be a [{R}] tensor on {pool.device}")
    if check_values:
        sel = flags.bool()
        for name, lines in (("src_lines", src_lines), ("dst_lines", dst_lines)):
            vals = lines.long()[sel]
            _require(bool(((vals >= 0) & (vals < pool.shape[0])).all()), name, "out of range")
        _check_unique_lines(dst_lines, sel, "dst_lines")
    if use_triton(pool, backend) and pool.shape[0] and pool[0].is_contiguous():
        copy_state_lines_triton(pool, src_lines, dst_lines, flags)
    else:
        copy_state_lines_torch(pool, src_lines, dst_lines, flags)
