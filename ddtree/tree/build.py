"""Batched DDTree build: best-first over the drafter's per-depth top-K, no per-node Python.

Ordering rule (shared with the heap reference in ``naive.py``). A node is a rank tuple
(r_1..r_d); its score is the float32 running sum of the per-depth log-probs along the path,
accumulated root to leaf. Nodes are ordered by the key

    (score descending, depth ascending, parent's output slot ascending, sibling rank ascending)

and the tree is the first ``budget`` nodes in that order. With ``chain_seed`` the top-1 chain
(min(L_eff, budget) nodes) comes first in depth order and the first ``budget - chain`` other nodes
in key order follow. The key grows strictly along parent->child and sibling->next-sibling edges,
so a heap that pops the best, then pushes the next sibling and the first child, emits exactly this
order (that is the reference); it is also parent-before-child.

Why the fast path is exact. Scores are sums of per-depth terms that do not depend on the prefix
(DFlash drafts every depth in one pass), and float addition is monotone, so if node q precedes p at
depth d-1 then q.r precedes p.r at depth d (on an exact float tie the parent's order decides, which is
why the tie rule uses the parent's slot and not the lexicographic rank tuple). Hence the best
``budget`` nodes at depth d are children of the best ``budget`` nodes at depth d-1: a beam of
``budget`` per depth holds every node the heap can pick. Candidates of one depth are laid out as
(parent beam slot, rank), so "parent slot, then rank" is just the flat candidate index; the final
pick over all depths is laid out as (depth, beam slot) the same way. Both selections use one int64
key per candidate -- (forced, valid, order-preserving score bits, inverted flat index) -- so a plain
``topk`` with unique keys reproduces the rule bit for bit on CPU and GPU.

Per-request shapes. ``row_budget`` / ``row_top_k`` give each request its own node budget b_r <= budget
and branching limit k_r <= top_k in the same batched build: candidates of rank >= k_r are invalid,
the chain seed is min(L_eff, b_r) long, and only the first b_r picks are kept (the rest is padding,
as when a budget cannot be filled). A beam of ``budget`` >= b_r per depth still holds every node the
per-request heap can pick (same argument as above), so row r equals a build with (b_r, k_r) alone,
padded to the batch's ``budget + 1`` slots.
"""

from __future__ import annotations

import torch

from .types import DraftTree


def _require(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


def draft_topk(draft_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-depth top-K of the drafter: log-softmax in float32, then the K best (sorted descending).

    draft_logits: [B, L, V] logits or log-probs. Returns (logprobs [B, L, K] float32, ids [B, L, K] long).
    """
    _require(isinstance(draft_logits, torch.Tensor) and draft_logits.dim() == 3, "draft_logits",
             "expected a [batch, depth, vocab] tensor")
    _require(draft_logits.is_floating_point(), "draft_logits", "expected a floating-point tensor")
    _require(isinstance(top_k, int) and top_k >= 1, "top_k", f"must be an int >= 1, got {top_k!r}")
    _require(top_k <= draft_logits.shape[-1], "top_k",
             f"{top_k} exceeds the vocabulary size {draft_logits.shape[-1]}")
    logprobs = torch.log_softmax(draft_logits.float(), dim=-1)
    vals, ids = torch.topk(logprobs, top_k, dim=-1, largest=True, sorted=True)
    return vals, ids


def prepare_build_inputs(
    *,
    root_token_ids: torch.Tensor,
    budget: int,
    top_k: int,
    draft_logits: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    depth_limit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and normalise build inputs (shared by the fast path and the reference).

    Returns (logq [B, L, K] float32 clamped to <= 0 with -0.0 turned into +0.0, ids [B, L, K] long,
    root ids [B] long, effective depth limit [B] long in [0, L]).
    """
    _require(isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1, "budget",
             f"must be an int >= 1, got {budget!r}")
    _require(isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1, "top_k",
             f"must be an int >= 1, got {top_k!r}")
    if draft_logits is not None:
        _require(topk_logprobs is None and topk_ids is None, "draft_logits",
                 "pass either draft_logits or (topk_logprobs, topk_ids), not both")
        logq, ids = draft_topk(draft_logits, top_k)
    else:
        _require(topk_logprobs is not None and topk_ids is not None, "topk_logprobs",
                 "pass draft_logits or both topk_logprobs and topk_ids")
        _require(topk_logprobs.dim() == 3, "topk_logprobs", f"expected [B, L, K], got {tuple(topk_logprobs.shape)}")
        _require(topk_logprobs.is_floating_point(), "topk_logprobs", "expected a floating-point tensor")
        _require(tuple(topk_ids.shape) == tuple(topk_logprobs.shape), "topk_ids",
                 f"shape {tuple(topk_ids.shape)} differs from topk_logprobs {tuple(topk_logprobs.shape)}")
        _require(not topk_ids.is_floating_point(), "topk_ids", "expected an integer tensor")
        _require(topk_ids.device == topk_logprobs.device, "topk_ids", "must be on the device of topk_logprobs")
        _require(top_k <= topk_logprobs.shape[-1], "top_k",
                 f"{top_k} exceeds the {topk_logprobs.shape[-1]} candidates given per depth")
        logq = topk_logprobs[..., :top_k].float()
        ids = topk_ids[..., :top_k].long()
    B, L, _ = logq.shape
    _require(B >= 1, "topk_logprobs" if draft_logits is None else "draft_logits", "batch is empty")
    _require(L >= 1, "topk_logprobs" if draft_logits is None else "draft_logits", "needs at least one draft depth")
    # Scores must not grow along a path (log-probs <= 0); +0.0 keeps -0.0 from splitting exact ties.
    logq = logq.clamp(max=0.0) + 0.0
    _require(isinstance(root_token_ids, torch.Tensor) and root_token_ids.dim() == 1
             and root_token_ids.shape[0] == B, "root_token_ids",
             f"expected a [{B}] tensor, got "
             f"{tuple(root_token_ids.shape) if isinstance(root_token_ids, torch.Tensor) else type(root_token_ids).__name__}")
    root = root_token_ids.to(device=logq.device, dtype=torch.long)
    if depth_limit is None:
        limit = torch.full((B,), L, dtype=torch.long, device=logq.device)
    else:
        _require(isinstance(depth_limit, torch.Tensor) and depth_limit.dim() == 1
                 and depth_limit.shape[0] == B and not depth_limit.is_floating_point(),
                 "depth_limit", f"expected an integer [{B}] tensor")
        limit = depth_limit.to(device=logq.device, dtype=torch.long).clamp(0, L)
    return logq.contiguous(), ids.contiguous(), root, limit


def prepare_row_shapes(batch: int, budget: int, top_k: int, row_budget, row_top_k,
                       device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate per-request budgets / top-k (host values: lists or CPU integer tensors, as the
    serving glue builds them from request settings) and move them to ``device``.

    Returns ([B] long or None, [B] long or None); None where not given."""
    out = []
    for name, values, hi in (("row_budget", row_budget, budget), ("row_top_k", row_top_k, top_k)):
        if values is None:
            out.append(None)
            continue
        if isinstance(values, torch.Tensor):
            _require(values.device.type == "cpu" and not values.is_floating_point() and values.dim() == 1,
                     name, "expected a 1-D integer CPU tensor (values are checked on the host)")
            t = values.to(torch.long)
        else:
            _require(all(isinstance(v, int) and not isinstance(v, bool) for v in values), name,
                     f"expected integers, got {list(values)!r}")
            t = torch.tensor(list(values), dtype=torch.long)
        _require(t.shape[0] == batch, name, f"expected {batch} values, got {t.shape[0]}")
        bad = (t < 1) | (t > hi)
        _require(not bool(bad.any()), name,
                 f"values must be in [1, {hi}] (the batch's {name[4:]}), got {t.tolist()}")
        out.append(t.to(device, non_blocking=True))
    return out[0], out[1]


def order_keys(score: torch.Tensor, valid: torch.Tensor, flat_index: torch.Tensor, index_bits: int,
               forced: torch.Tensor | None = None) -> torch.Tensor:
    """int64 keys whose descending order is (forced, valid, score desc, flat index asc); all unique."""
    bits = score.contiguous().view(torch.int32).to(torch.int64)
    # Map float32 bit patterns to [0, 2^32) so that integer order == float order (-inf lowest).
    ordered = torch.where(bits >= 0, bits + (1 << 31), -1 - bits)
    key = (ordered << index_bits) | (((1 << index_bits) - 1) - flat_index)
    key = key | (valid.to(torch.int64) << (32 + index_bits))
    if forced is not None:
        key = key | (forced.to(torch.int64) << (33 + index_bits))
    return key


def build_tree(
    *,
    root_token_ids: torch.Tensor,
    budget: int,
    top_k: int,
    draft_logits: torch.Tensor | None = None,
    topk_logprobs: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None,
    chain_seed: bool = True,
    depth_limit: torch.Tensor | None = None,
    row_budget=None,
    row_top_k=None,
    backend: str = "auto",
) -> DraftTree:
    """Build a batch of DDTree draft trees (see the module docstring for the exact rule).

    Give either ``draft_logits`` [B, L, V] (logits or log-probs; log-softmaxed here) or the drafter's
    precomputed ``topk_logprobs``/``topk_ids`` [B, L, K'] (log-softmax values sorted descending,
    K' >= top_k, distinct ids per depth). ``depth_limit`` [B] caps each request's depth (0 = root only).
    ``row_budget`` / ``row_top_k`` (lists or CPU integer tensors of B values in [1, budget] /
    [1, top_k]): per-request tree shape in the same build; row r is padded to ``budget + 1`` slots.
    No host synchronisation and static shapes: safe to capture in a CUDA graph (per-row shapes are
    host values copied to the device).
    backend: "torch" (batched torch ops, any device), "triton" (one kernel launch per build; CUDA, or
    CPU under TRITON_INTERPRET=1), "auto" (triton on CUDA when importable, else torch). Identical output.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    logq, ids, root, limit = prepare_build_inputs(
        root_token_ids=root_token_ids, budget=budget, top_k=top_k, draft_logits=draft_logits,
        topk_logprobs=topk_logprobs, topk_ids=topk_ids, depth_limit=depth_limit)
    row_b, row_k = prepare_row_shapes(logq.shape[0], budget, top_k, row_budget, row_top_k, logq.device)
    if backend == "auto":
        backend = "triton" if logq.is_cuda and _triton_available() else "torch"
    if backend == "triton":
        from .build_triton import build_from_topk_triton
        return build_from_topk_triton(logq, ids, root, limit, budget, bool(chain_seed), row_b, row_k)
    return _build_from_topk(logq, ids, root, limit, budget, bool(chain_seed), row_b, row_k)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _build_from_topk(logq, ids, root, limit, budget: int, chain_seed: bool,
                     row_budget: torch.Tensor | None = None,
                     row_top_k: torch.Tensor | None = None) -> DraftTree:
    B, L, K = logq.shape
    M = budget  # beam width per depth
    N = budget + 1
    dev = logq.device
    index_bits = max(M * K, L * M).bit_length()

    cand_index = torch.arange(M * K, device=dev)
    cand_parent = cand_index // K
    cand_rank = cand_index % K

    beam_score = torch.full((B, M), float("-inf"), device=dev)
    beam_score[:, 0] = 0.0
    beam_valid = torch.zeros((B, M), dtype=torch.bool, device=dev)
    beam_valid[:, 0] = True

    # per-request branching limit: ranks >= k_r are never candidates
    rank_ok = None if row_top_k is None else (cand_rank[None, :] < row_top_k[:, None])  # [B, M*K]
    scores, valids, parents, ranks = [], [], [], []
    for d in range(L):
        cand = (beam_score[:, :, None] + logq[:, d, None, :]).reshape(B, M * K)
        cvalid = (beam_valid[:, :, None] & (limit > d)[:, None, None]).expand(B, M, K).reshape(B, M * K)
        if rank_ok is not None:
            cvalid = cvalid & rank_ok
        keys = order_keys(cand, cvalid, cand_index, index_bits)
        pick = torch.topk(keys, M, dim=1, largest=True, sorted=True).indices
        beam_score = cand.gather(1, pick)
        beam_valid = cvalid.gather(1, pick)
        scores.append(beam_score)
        valids.append(beam_valid)
        parents.append(cand_parent[pick])
        ranks.append(cand_rank[pick])

    all_score = torch.stack(scores, 1).reshape(B, L * M)
    all_valid = torch.stack(valids, 1).reshape(B, L * M)
    all_parent = torch.stack(parents, 1).reshape(B, L * M)
    all_rank = torch.stack(ranks, 1).reshape(B, L * M)
    flat = torch.arange(L * M, device=dev)
    depth_of = flat // M + 1
    slot_of = flat % M
    forced = None
    if chain_seed:
        # Slot 0 of every depth is the top-1 chain node (it leads its depth under the key).
        chain_len = limit.clamp(max=budget) if row_budget is None else torch.minimum(limit, row_budget)
        forced = (slot_of == 0)[None, :] & (depth_of[None, :] <= chain_len[:, None])
    keys = order_keys(all_score, all_valid, flat, index_bits, forced)
    sel = torch.topk(keys, budget, dim=1, largest=True, sorted=True).indices  # [B, budget]

    sel_valid = all_valid.gather(1, sel)
    if row_budget is not None:  # keep the first b_r picks of row r (the order is the heap's)
        sel_valid = sel_valid & (torch.arange(budget, device=dev)[None, :] < row_budget[:, None])
    sel_depth = depth_of[sel]
    sel_rank = all_rank.gather(1, sel)
    sel_score = all_score.gather(1, sel)
    # Output slot of every (depth, beam slot); depth 0 slot 0 is the root, the last column is a sink.
    sink = (L + 1) * M
    slot_table = torch.full((B, sink + 1), -1, dtype=torch.long, device=dev)
    slot_table[:, 0] = 0
    out_slot = torch.arange(1, N, device=dev).expand(B, budget)
    slot_table.scatter_(1, torch.where(sel_valid, sel + M, sink), out_slot)
    parent_key = (sel // M) * M + all_parent.gather(1, sel)
    sel_parent = slot_table.gather(1, parent_key)
    sel_token = ids.reshape(B, L * K).gather(1, ((sel_depth - 1) * K + sel_rank).clamp(0, L * K - 1))

    neg1 = torch.full((B, 1), -1, dtype=torch.long, device=dev)
    token_ids = torch.cat([root[:, None], torch.where(sel_valid, sel_token, -1)], 1)
    parents_out = torch.cat([neg1, torch.where(sel_valid, sel_parent, -1)], 1)
    depths = torch.cat([torch.zeros_like(neg1), torch.where(sel_valid, sel_depth, 0)], 1)
    ranks_out = torch.cat([neg1, torch.where(sel_valid, sel_rank, -1)], 1)
    scores_out = torch.cat([torch.zeros((B, 1), device=dev),
                            torch.where(sel_valid, sel_score, float("-inf"))], 1)
    valid = torch.cat([torch.ones((B, 1), dtype=torch.bool, device=dev), sel_valid], 1)
    num_nodes = valid.sum(1)
    return DraftTree(token_ids=token_ids, parents=parents_out, depths=depths, ranks=ranks_out,
                     scores=scores_out, num_nodes=num_nodes, valid=valid, max_depth=L, top_k=K)
