"""Index math of a tree-verify step (ddtree.tree.verify_index) against naive per-request loops.

Used by the V2 model runner glue (vllm/v1/spec_decode/ddtree_v2.py): the accepted path laid out
first in each block (drafter context, logprobs), node / chain positions, and the walk's arrays.
"""

import pytest
import torch

from ddtree.tree import build_tree, tree_walk
from ddtree.tree.verify_index import (chain_positions, moved_rows, path_gather_index,
                                      tree_positions, verify_walk_arrays)

from .helpers import random_topk


def random_batch(seed: int, R: int = 6, width: int = 9):
    """Blocks of random sizes in a flattened batch with gaps (other requests' rows) between them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(1, width + 1, (R,), generator=g)
    gaps = torch.randint(0, 3, (R,), generator=g)
    starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), (q + gaps)[:-1]]), 0) + gaps[0]
    num_rows = int(starts[-1] + q[-1]) + int(torch.randint(0, 3, (1,), generator=g))
    acc = torch.full((R, width), -1, dtype=torch.long)
    m = torch.zeros(R, dtype=torch.long)
    for e in range(R):
        m[e] = int(torch.randint(0, int(q[e]), (1,), generator=g))
        # a path of increasing node ids inside the block, root first
        nodes = torch.randperm(int(q[e]) - 1, generator=g)[: int(m[e])] + 1
        acc[e, : int(m[e]) + 1] = torch.cat([torch.zeros(1, dtype=torch.long), nodes.sort().values])
    return starts, q, acc, m, num_rows


def path_gather_naive(num_rows, starts, acc, m):
    out = list(range(num_rows))
    for e in range(starts.shape[0]):
        for j in range(int(m[e]) + 1):
            out[int(starts[e]) + j] = int(starts[e]) + int(acc[e, j])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(6))
def test_path_gather_matches_naive(seed):
    starts, q, acc, m, num_rows = random_batch(seed)
    idx = path_gather_index(num_rows, starts, acc, m)
    assert torch.equal(idx, path_gather_naive(num_rows, starts, acc, m))
    # applying the moves in place gives the gathered copy (overlapping src/dst included)
    x = torch.randn(num_rows, 3)
    want = x[idx]
    src, dst = moved_rows(idx)
    x[dst] = x[src]
    assert torch.equal(x, want)


def test_path_gather_rejects_bad_input():
    starts, q, acc, m, num_rows = random_batch(0)
    with pytest.raises(ValueError, match="num_accepted"):
        path_gather_index(num_rows, starts, acc, m + acc.shape[1])
    with pytest.raises(ValueError, match="num_rows"):
        path_gather_index(int(starts[-1]), starts, acc, torch.full_like(m, 0) + (q - 1))
    with pytest.raises(ValueError, match="accepted"):
        path_gather_index(num_rows, starts, acc[:-1], m)


def test_path_gather_detects_wrong_layout():
    """A gather that ignores the path (identity) is caught by the naive reference."""
    for seed in range(50):  # a batch whose paths leave the chain somewhere
        starts, q, acc, m, num_rows = random_batch(seed)
        if bool((acc[:, 1:] > torch.arange(1, acc.shape[1])).any()):
            break
    else:
        raise AssertionError("no branching fixture")
    assert not torch.equal(torch.arange(num_rows), path_gather_naive(num_rows, starts, acc, m))


@pytest.mark.parametrize("seed", range(4))
def test_positions_match_naive(seed):
    starts, q, _, _, _ = random_batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    prefix = torch.randint(0, 50, q.shape, generator=g)
    depths = torch.randint(0, 5, (q.shape[0], 9), generator=g)
    rows, pos = tree_positions(starts, q, prefix, depths)
    want_rows, want_pos, chain_r, chain_p = [], [], [], []
    for e in range(q.shape[0]):
        for j in range(int(q[e])):
            want_rows.append(int(starts[e]) + j)
            want_pos.append(int(prefix[e]) + int(depths[e, j]))
            chain_r.append(int(starts[e]) + j)
            chain_p.append(int(prefix[e]) + j)
    assert rows.tolist() == want_rows and pos.tolist() == want_pos
    rows, pos = chain_positions(starts, q, prefix)
    assert rows.tolist() == chain_r and pos.tolist() == chain_p


def walk_arrays_naive(num_draft, cu, width, drafts, trees):
    R = len(num_draft)
    out = {k: torch.full((R, width), -1 if k in ("token_ids", "parents") else 0, dtype=torch.long)
           for k in ("token_ids", "parents", "depths", "rows")}
    valid = torch.zeros((R, width), dtype=torch.bool)
    row_valid = torch.zeros((R, width), dtype=torch.bool)
    k = 0
    for i in range(R):
        q = num_draft[i] + 1
        for j in range(q):
            out["rows"][i, j] = cu[i] + j
            row_valid[i, j] = True
            if j:
                out["token_ids"][i, j] = drafts[k]
                k += 1
        if i in trees:
            par, dep, n = trees[i]
            for j in range(q):
                out["parents"][i, j] = par[j]
                out["depths"][i, j] = dep[j]
                valid[i, j] = j < n
        else:
            for j in range(q):
                out["parents"][i, j] = j - 1
                out["depths"][i, j] = j
                valid[i, j] = True
    out["valid"], out["row_valid"] = valid, row_valid
    return out


@pytest.mark.parametrize("seed", range(4))
def test_walk_arrays_match_naive(seed):
    g = torch.Generator().manual_seed(seed)
    R, width, budget = 5, 9, 8
    lp, ids = random_topk(R, 4, 3, seed=seed)
    trees_full = build_tree(root_token_ids=torch.arange(R), budget=budget, top_k=3, topk_logprobs=lp,
                            topk_ids=ids, chain_seed=seed % 2 == 0)
    num_draft = torch.randint(0, width, (R,), generator=g)
    tree_rows = [i for i in range(R) if i % 2 == 0]
    for i in tree_rows:  # a tree block schedules its whole budget (padding nodes included)
        num_draft[i] = budget
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(num_draft + 1, 0)])
    drafts = torch.randint(0, 100, (int(num_draft.sum()),), generator=g)
    tr = torch.tensor(tree_rows)
    got = verify_walk_arrays(num_draft, cu, width, drafts, tr, trees_full.parents[tr],
                             trees_full.depths[tr], trees_full.num_nodes[tr])
    trees = {i: (trees_full.parents[i].tolist(), trees_full.depths[i].tolist(),
                 int(trees_full.num_nodes[i])) for i in tree_rows}
    want = walk_arrays_naive(num_draft.tolist(), cu.tolist(), width, drafts.tolist(), trees)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_walk_arrays_reject_bad_input():
    with pytest.raises(ValueError, match="num_draft"):
        verify_walk_arrays(torch.tensor([9]), torch.tensor([0, 10]), 9, torch.zeros(9),
                           torch.zeros(0), torch.zeros(0, 9), torch.zeros(0, 9), torch.zeros(0))
    with pytest.raises(ValueError, match="draft_token_ids"):
        verify_walk_arrays(torch.tensor([2]), torch.tensor([0, 3]), 9, torch.zeros(1),
                           torch.zeros(0), torch.zeros(0, 9), torch.zeros(0, 9), torch.zeros(0))


@pytest.mark.parametrize("seed", range(3))
def test_laid_out_tree_reads_like_the_chain(seed):
    """End to end: after the walk, gathering a block's per-node rows with path_gather_index gives
    the accepted path's rows first, so that vLLM's chain bookkeeping (keep the first m + 1 rows) sees
    exactly the path: here rows carry the node's token and the laid-out rows must spell the
    committed tokens (minus the bonus)."""
    B, L, K, budget = 4, 5, 3, 12
    lp, ids = random_topk(B, L, K, seed=seed)
    tree = build_tree(root_token_ids=torch.arange(B) + 500, budget=budget, top_k=K, topk_logprobs=lp,
                      topk_ids=ids, chain_seed=False)
    g = torch.Generator().manual_seed(seed)
    # target: follow a random existing child at each node (siblings taken), else a fresh token
    target = torch.full_like(tree.token_ids, 999)
    for b in range(B):
        for n in range(int(tree.num_nodes[b])):
            kids = [c for c in range(int(tree.num_nodes[b])) if int(tree.parents[b, c]) == n]
            if kids and torch.rand(1, generator=g) < 0.8:
                target[b, n] = tree.token_ids[b, kids[int(torch.randint(len(kids), (1,), generator=g))]]
    walk = tree_walk(tree, target, backend="torch")
    n = budget + 1
    starts = torch.arange(B) * n
    rows_tokens = tree.token_ids.flatten()
    idx = path_gather_index(B * n, starts, walk.accepted_nodes, walk.num_accepted)
    laid = rows_tokens[idx].view(B, n)
    for b in range(B):
        m = int(walk.num_accepted[b])
        assert laid[b, : m + 1].tolist() == [500 + b] + walk.committed_token_ids[b, :m].tolist()
    assert int(walk.num_accepted.sum()) > 0
