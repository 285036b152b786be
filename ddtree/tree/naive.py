"""Slow, obviously-correct references for the tree core: per-request Python loops over nodes.

Used only by tests and as documentation of the semantics; the batched versions live in build.py,
flatten.py and sample.py and must agree with these exactly.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from .build import prepare_build_inputs, prepare_row_shapes
from .types import DraftTree, WalkResult


def build_tree_naive(
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
) -> DraftTree:
    """Reference heap best-first build (same arguments and ordering rule as ``build.build_tree``).

    Heap entries are (-score, depth, parent slot, rank): pop the best, append it, push its next
    sibling and its first child. Scores are float32 running sums, as in the fast path.
    Per-request shapes: request r stops at ``row_budget[r]`` nodes and never pushes a rank
    >= ``row_top_k[r]``; its remaining slots up to ``budget + 1`` are padding.
    """
    logq_t, ids_t, root_t, limit_t = prepare_build_inputs(
        root_token_ids=root_token_ids, budget=budget, top_k=top_k, draft_logits=draft_logits,
        topk_logprobs=topk_logprobs, topk_ids=topk_ids, depth_limit=depth_limit)
    logq = logq_t.cpu().numpy().astype(np.float32)
    ids = ids_t.cpu().numpy()
    roots = root_t.cpu().tolist()
    limits = limit_t.cpu().tolist()
    B, L, K = logq.shape
    N = budget + 1
    row_b, row_k = prepare_row_shapes(B, budget, top_k, row_budget, row_top_k, "cpu")
    budgets = [budget] * B if row_b is None else row_b.tolist()
    top_ks = [K] * B if row_k is None else row_k.tolist()
    out = {name: np.full((B, N), -1, dtype=np.int64) for name in ("token_ids", "parents", "ranks")}
    depths = np.zeros((B, N), dtype=np.int64)
    scores = np.full((B, N), -np.inf, dtype=np.float32)
    num_nodes = np.zeros(B, dtype=np.int64)

    for b in range(B):
        lim = limits[b]
        n_max, k_max = budgets[b] + 1, top_ks[b]
        # node: (parent slot, depth, rank, score)
        nodes = [(-1, 0, -1, np.float32(0.0))]
        heap: list = []

        def push(parent: int, rank: int) -> None:
            depth = nodes[parent][1] + 1
            if depth > lim or rank >= k_max:
                return
            score = np.float32(nodes[parent][3] + logq[b, depth - 1, rank])
            heapq.heappush(heap, (-float(score), depth, parent, rank, score))

        if chain_seed:
            chain = min(lim, n_max - 1)
            for d in range(1, chain + 1):
                parent = d - 1
                nodes.append((parent, d, 0, np.float32(nodes[parent][3] + logq[b, d - 1, 0])))
            for d in range(1, chain + 1):
                push(d - 1, 1)  # the chain node's next sibling
            push(chain, 0)  # first child of the chain's end (only reachable if chain < budget)
        else:
            push(0, 0)
        while len(nodes) < n_max and heap:
            _, depth, parent, rank, score = heapq.heappop(heap)
            nodes.append((parent, depth, rank, score))
            push(parent, rank + 1)
            push(len(nodes) - 1, 0)

        num_nodes[b] = len(nodes)
        for i, (parent, depth, rank, score) in enumerate(nodes):
            out["parents"][b, i] = parent
            out["ranks"][b, i] = rank
            depths[b, i] = depth
            scores[b, i] = score
            out["token_ids"][b, i] = roots[b] if i == 0 else ids[b, depth - 1, rank]

    def t(x):
        return torch.from_numpy(x)

    valid = np.arange(N)[None, :] < num_nodes[:, None]
    return DraftTree(token_ids=t(out["token_ids"]), parents=t(out["parents"]), depths=t(depths),
                     ranks=t(out["ranks"]), scores=t(scores), num_nodes=t(num_nodes), valid=t(valid),
                     max_depth=L, top_k=K)


def tree_paths_naive(tree: DraftTree) -> list[list[tuple[int, ...]]]:
    """Per request, the rank tuple of every valid node in slot order (root = ())."""
    out = []
    parents = tree.parents.cpu().tolist()
    ranks = tree.ranks.cpu().tolist()
    for b, n in enumerate(tree.num_nodes.cpu().tolist()):
        paths: list[tuple[int, ...]] = [()]
        for i in range(1, n):
            paths.append(paths[parents[b][i]] + (ranks[b][i],))
        out.append(paths)
    return out


def ancestor_mask_naive(tree: DraftTree) -> torch.Tensor:
    """vis[b, i, j] = j is an ancestor of i or j == i; padding rows see only themselves."""
    B, N = tree.token_ids.shape
    vis = np.zeros((B, N, N), dtype=bool)
    parents = tree.parents.cpu().tolist()
    for b, n in enumerate(tree.num_nodes.cpu().tolist()):
        for i in range(N):
            if i < n and i > 0:
                vis[b, i] = vis[b, parents[b][i]]
            vis[b, i, i] = True
    return torch.from_numpy(vis)


def child_table_naive(tree: DraftTree) -> torch.Tensor:
    B, N = tree.token_ids.shape
    table = np.full((B, N, tree.top_k), -1, dtype=np.int64)
    parents = tree.parents.cpu().tolist()
    ranks = tree.ranks.cpu().tolist()
    for b, n in enumerate(tree.num_nodes.cpu().tolist()):
        for i in range(1, n):
            table[b, parents[b][i], ranks[b][i]] = i
    return torch.from_numpy(table)


def flashinfer_mask_naive(vis: torch.Tensor, prefix_lens: list[int], q_lens: list[int]):
    """Per request a q_len x (prefix + q_len) row-major mask (prefix all visible, then vis[:q, :q]);
    returns (flat bool mask, packed uint8, mask_indptr, packed_indptr) as numpy arrays."""
    masks, packed = [], []
    mask_indptr, packed_indptr = [0], [0]
    for b, (p, q) in enumerate(zip(prefix_lens, q_lens)):
        m = np.zeros((q, p + q), dtype=bool)
        m[:, :p] = True
        m[:, p:] = vis[b, :q, :q].numpy()
        flat = m.reshape(-1)
        masks.append(flat)
        pk = np.packbits(flat, bitorder="little")
        packed.append(pk)
        mask_indptr.append(mask_indptr[-1] + flat.size)
        packed_indptr.append(packed_indptr[-1] + pk.size)
    return (np.concatenate(masks), np.concatenate(packed), np.array(mask_indptr), np.array(packed_indptr))


def tree_walk_naive(tree: DraftTree, target_token_ids: torch.Tensor) -> WalkResult:
    """Walk each tree from the root: take the target's token at the node; move to the (lowest-slot)
    child carrying it, else emit it as the bonus token and stop."""
    B, N = tree.token_ids.shape
    L = tree.max_depth
    tok = tree.token_ids.cpu().tolist()
    par = tree.parents.cpu().tolist()
    tgt = target_token_ids.cpu().tolist()
    acc = torch.full((B, L + 1), -1, dtype=torch.long)
    com = torch.full((B, L + 1), -1, dtype=torch.long)
    num = torch.zeros(B, dtype=torch.long)
    last = torch.zeros(B, dtype=torch.long)
    for b, n in enumerate(tree.num_nodes.cpu().tolist()):
        node, path, emitted = 0, [0], []
        while True:
            t = tgt[b][node]
            emitted.append(t)
            child = next((c for c in range(1, n) if par[b][c] == node and tok[b][c] == t), None)
            if child is None:
                break
            path.append(child)
            node = child
        acc[b, : len(path)] = torch.tensor(path)
        com[b, : len(emitted)] = torch.tensor(emitted)
        num[b] = len(path) - 1
        last[b] = node
    return WalkResult(accepted_nodes=acc, committed_token_ids=com, num_accepted=num,
                      last_accepted_node=last, target_token_ids=target_token_ids.cpu().long())
