"""Flattening a DraftTree for the verifier: positions, ancestor masks (dense, packed, FlashInfer's
custom-mask layout), the logits row that scores each node's children, and the node -> children map.

Everything except ``flashinfer_custom_mask`` has static shapes and no host synchronisation.
"""

from __future__ import annotations

import math

import torch

from .build import _triton_available
from .types import DraftTree, FlashInferMask, FlatTree


def node_positions(tree: DraftTree, root_positions: torch.Tensor) -> torch.Tensor:
    """[B, N] sequence positions: root position + depth (padding slots get the root's position)."""
    if not isinstance(root_positions, torch.Tensor) or root_positions.shape != (tree.batch_size,):
        raise ValueError(f"root_positions: expected a [{tree.batch_size}] tensor")
    return root_positions.to(tree.depths.device, torch.long)[:, None] + tree.depths


def ancestor_mask(tree: DraftTree) -> torch.Tensor:
    """[B, N, N] bool: [b, i, j] True iff j is an ancestor of i or j == i (padding rows: only i).

    Pointer doubling on the reachability matrix: start from self + parent edges, then square it;
    after s squarings every ancestor up to 2^s edges away is covered, and paths have <= L edges.
    0/1 products summed over <= N terms are exact in fp32 (and TF32).
    """
    return ancestor_mask_from_parents(tree.parents, tree.max_depth)


def ancestor_mask_from_parents(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """``ancestor_mask`` for bare parent arrays [B, N] (-1: no parent; nodes at most max_depth deep)."""
    B, N = parents.shape
    dev = parents.device
    eye = torch.eye(N, device=dev, dtype=torch.float32).expand(B, N, N)
    has_parent = parents >= 0
    parent_edge = torch.zeros((B, N, N), device=dev, dtype=torch.float32)
    parent_edge.scatter_(2, parents.long().clamp(min=0)[:, :, None], has_parent[:, :, None].float())
    reach = eye + parent_edge
    for _ in range(max(1, math.ceil(math.log2(max(max_depth, 1))))):
        reach = (torch.bmm(reach, reach) > 0).float()
    return reach > 0


def child_table(tree: DraftTree) -> torch.Tensor:
    """[B, N, K] long: the child of node n with sibling rank r, else -1.

    A node's children always have ranks 0..c-1 (the heap only pushes rank r+1 after popping r).
    """
    B, N = tree.parents.shape
    K = tree.top_k
    dev = tree.parents.device
    is_child = tree.valid & (tree.parents >= 0)
    sink = N * K
    table = torch.full((B, N * K + 1), -1, dtype=torch.long, device=dev)
    index = torch.where(is_child, tree.parents * K + tree.ranks, sink)
    table.scatter_(1, index, torch.arange(N, device=dev).expand(B, N))
    return table[:, :sink].reshape(B, N, K)


def logits_rows(tree: DraftTree, compact: bool = False) -> torch.Tensor:
    """[B, N] long: the row of the flattened verifier logits whose distribution is over node n's
    children (the verifier's output at node n predicts the token after n).

    compact=False: every request feeds all N slots, rows b*N + n (static, CUDA-graph friendly).
    compact=True: only valid nodes are fed, rows cumsum(num_nodes)[b-1] + n; padding gets -1.
    """
    B, N = tree.parents.shape
    dev = tree.parents.device
    slot = torch.arange(N, device=dev)
    if not compact:
        return (torch.arange(B, device=dev)[:, None] * N + slot).contiguous()
    start = torch.cumsum(tree.num_nodes, 0) - tree.num_nodes
    return torch.where(tree.valid, start[:, None] + slot, -1)


def pack_bits_rows(bits: torch.Tensor) -> torch.Tensor:
    """Pack each row of a [R, C] bool tensor like numpy.packbits(row, bitorder="little"):
    element 8*k + i goes to bit i (LSB first) of byte k; the row is zero-padded to a whole byte."""
    R, C = bits.shape
    pad = (-C) % 8
    if pad:
        bits = torch.cat([bits, torch.zeros((R, pad), dtype=torch.bool, device=bits.device)], 1)
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.int32))
    packed = (bits.reshape(R, -1, 8).to(torch.int32) * weights).sum(-1)
    return packed.to(torch.uint8)


def _host_ints(x, name: str, B: int) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.shape != (B,) or x.is_floating_point():
            raise ValueError(f"{name}: expected an integer [{B}] tensor")
        vals = x.tolist()
    else:
        vals = [int(v) for v in x]
        if len(vals) != B:
            raise ValueError(f"{name}: expected {B} values, got {len(vals)}")
    if any(v < 0 for v in vals):
        raise ValueError(f"{name}: values must be >= 0")
    return vals


def flashinfer_custom_mask(vis: torch.Tensor, prefix_lens, q_lens=None) -> FlashInferMask:
    """FlashInfer's custom-mask inputs: per request b a row-major [q_len, prefix_len + q_len] mask
    (the committed prefix is fully visible, then vis[b, :q_len, :q_len]), concatenated over requests,
    and its little-endian bit-packed form with every request's segment padded to a byte (the layout
    ``flashinfer.quantization.segment_packbits(mask, mask_indptr, bitorder="little")`` produces).

    prefix_lens / q_lens: [B] ints (CPU tensors or lists avoid a device sync; sizes are data
    dependent, so this is not CUDA-graph capturable -- use ``FlatTree.tree_mask_packed`` (prefix 0,
    q_len N) with a separate unmasked prefix pass for that). q_lens defaults to N for every request;
    pass tree.num_nodes to feed only valid nodes.
    """
    if vis.dim() != 3 or vis.shape[1] != vis.shape[2] or vis.dtype != torch.bool:
        raise ValueError("vis: expected a [B, N, N] bool tensor")
    B, N, _ = vis.shape
    dev = vis.device
    p = _host_ints(prefix_lens, "prefix_lens", B)
    q = [N] * B if q_lens is None else _host_ints(q_lens, "q_lens", B)
    if any(v > N for v in q):
        raise ValueError(f"q_lens: values must be <= N = {N}")
    kv = [a + b for a, b in zip(p, q)]
    seg = [a * b for a, b in zip(q, kv)]
    seg_bytes = [(s + 7) // 8 for s in seg]

    def indptr(sizes):
        out = [0]
        for s in sizes:
            out.append(out[-1] + s)
        return out

    mask_indptr_l, packed_indptr_l, qo_l = indptr(seg), indptr(seg_bytes), indptr(q)
    total, total_bytes = mask_indptr_l[-1], packed_indptr_l[-1]
    p_t = torch.tensor(p, device=dev)
    kv_t = torch.tensor(kv, device=dev)
    seg_t = torch.tensor(seg, device=dev)
    mask_indptr = torch.tensor(mask_indptr_l, device=dev)
    packed_indptr = torch.tensor(packed_indptr_l, device=dev)
    req_ids = torch.arange(B, device=dev)
    vis_flat = vis.reshape(-1)

    def values(req: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        kv_r = kv_t[req].clamp(min=1)
        row = local // kv_r
        col = local % kv_r
        tree_col = col - p_t[req]
        in_seg = local < seg_t[req]
        idx = (req * N + row.clamp(max=N - 1)) * N + tree_col.clamp(min=0, max=N - 1)
        return in_seg & ((tree_col < 0) | vis_flat[idx])

    req_of_elem = torch.repeat_interleave(req_ids, torch.tensor(seg, device=dev), output_size=total)
    local_elem = torch.arange(total, device=dev) - mask_indptr[req_of_elem]
    mask = values(req_of_elem, local_elem)

    req_of_byte = torch.repeat_interleave(req_ids, torch.tensor(seg_bytes, device=dev), output_size=total_bytes)
    local_byte = torch.arange(total_bytes, device=dev) - packed_indptr[req_of_byte]
    local_bits = local_byte[:, None] * 8 + torch.arange(8, device=dev)
    bits = values(req_of_byte[:, None].expand(-1, 8), local_bits)
    packed = pack_bits_rows(bits.reshape(total_bytes, 8)).reshape(total_bytes) if total_bytes else \
        torch.zeros(0, dtype=torch.uint8, device=dev)
    return FlashInferMask(
        qo_indptr=torch.tensor(qo_l, dtype=torch.int32, device=dev),
        kv_lens=kv_t.to(torch.int32),
        mask_indptr=mask_indptr,
        mask=mask,
        packed_indptr=packed_indptr,
        packed=packed,
    )


def flatten_tree(tree: DraftTree, root_positions: torch.Tensor, compact_logits: bool = False,
                 backend: str = "auto") -> FlatTree:
    """Static-shape verifier inputs for a batch of trees (see FlatTree).

    backend: "torch", "triton" (one launch; CUDA, or CPU under TRITON_INTERPRET=1) or "auto"
    (triton on CUDA). Identical output.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    positions = node_positions(tree, root_positions)  # also validates root_positions
    if backend == "auto":
        backend = "triton" if tree.parents.is_cuda and _triton_available() else "torch"
    if backend == "triton":
        from .triton_kernels import flatten_tree_triton
        flat = flatten_tree_triton(tree, root_positions)
        if compact_logits:
            flat.logits_rows = logits_rows(tree, compact=True)
        return flat
    vis = ancestor_mask(tree)
    B, N = tree.parents.shape
    return FlatTree(
        positions=positions,
        ancestor_mask=vis,
        child_table=child_table(tree),
        logits_rows=logits_rows(tree, compact=compact_logits),
        tree_mask_packed=pack_bits_rows(vis.reshape(B, N * N)),
    )
