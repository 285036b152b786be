"""Per-request tree shapes (row_budget / row_top_k) in one batched build.

The batched build (torch and Triton) must equal the heap reference extended the same way, and each
row must equal a build of that request alone with its own (budget, top_k), padded to the batch's
budget + 1 slots. budget = L, top_k = 1 is the flat DFlash chain."""

import pytest
import torch

from ddtree.tree import build_tree
from ddtree.tree.naive import build_tree_naive

from .helpers import random_topk, tree_fields_equal
from .test_build import check_invariants, triton_ok


def _pad_row(tree, row, slots):
    """Row ``row`` of ``tree`` with its node slots padded (as the build pads) to ``slots``."""
    n = tree.token_ids.shape[1]
    pad = slots - n
    out = {}
    for f, fill in (("token_ids", -1), ("parents", -1), ("depths", 0), ("ranks", -1),
                    ("scores", float("-inf")), ("valid", False)):
        t = getattr(tree, f)[row]
        out[f] = torch.cat([t, torch.full((pad,), fill, dtype=t.dtype)])
    out["num_nodes"] = tree.num_nodes[row]
    return out


def _random_shapes(B, budget, K, seed):
    g = torch.Generator().manual_seed(seed)
    rb = torch.randint(1, budget + 1, (B,), generator=g)
    rk = torch.randint(1, K + 1, (B,), generator=g)
    rb[0], rk[0] = budget, K  # the server's own shape is always in the batch
    return rb, rk


CASES = [  # (B, L, K, budget)
    (6, 15, 8, 32),
    (5, 6, 3, 12),
    (4, 3, 4, 30),   # budget larger than some rows' whole tree
    (4, 5, 2, 5),
]


@pytest.mark.parametrize("B,L,K,budget", CASES)
@pytest.mark.parametrize("chain_seed", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_row_shapes_match_reference_and_single_builds(B, L, K, budget, chain_seed, ties):
    for seed in range(3):
        lp, ids = random_topk(B, L, K, seed=seed * 13 + budget, ties=ties)
        rb, rk = _random_shapes(B, budget, K, seed)
        limit = torch.randint(0, L + 2, (B,), generator=torch.Generator().manual_seed(seed)) if seed == 2 else None
        kw = dict(root_token_ids=torch.arange(B) + 7, budget=budget, top_k=K, topk_logprobs=lp, topk_ids=ids,
                  chain_seed=chain_seed, depth_limit=limit)
        fast = build_tree(row_budget=rb, row_top_k=rk, backend="torch", **kw)
        ref = build_tree_naive(row_budget=rb.tolist(), row_top_k=rk.tolist(), **kw)
        assert tree_fields_equal(fast, ref) == []
        for r in range(B):
            alone = build_tree_naive(
                root_token_ids=kw["root_token_ids"][r:r + 1], budget=int(rb[r]), top_k=int(rk[r]),
                topk_logprobs=lp[r:r + 1], topk_ids=ids[r:r + 1], chain_seed=chain_seed,
                depth_limit=None if limit is None else limit[r:r + 1])
            want = _pad_row(alone, 0, budget + 1)
            for f, v in want.items():
                assert torch.equal(getattr(fast, f)[r], v), (r, f, int(rb[r]), int(rk[r]))
            # the row is a valid tree of its own shape: closed, parent first, ranks < k_r
            row_valid = fast.valid[r]
            assert int(row_valid.sum()) <= int(rb[r]) + 1
            assert (fast.ranks[r][row_valid][1:] < int(rk[r])).all()


def test_default_shapes_are_a_no_op():
    B, L, K, budget = 4, 6, 3, 10
    lp, ids = random_topk(B, L, K, seed=3)
    kw = dict(root_token_ids=torch.arange(B), budget=budget, top_k=K, topk_logprobs=lp, topk_ids=ids)
    plain = build_tree(**kw)
    full = build_tree(row_budget=[budget] * B, row_top_k=[K] * B, **kw)
    assert tree_fields_equal(plain, full) == []
    check_invariants(full, budget, K, L)


def test_budget_L_top_k_1_row_is_the_flat_dflash_chain():
    B, L, K, budget = 3, 7, 4, 16
    lp, ids = random_topk(B, L, K, seed=11)
    tree = build_tree(root_token_ids=torch.arange(B), budget=budget, top_k=K, topk_logprobs=lp, topk_ids=ids,
                      row_budget=[L, budget, 3], row_top_k=[1, K, 1])
    # row 0: the drafter's top-1 token at each of the L depths, in depth order, then padding
    assert int(tree.num_nodes[0]) == L + 1
    assert tree.token_ids[0, 1:L + 1].tolist() == ids[0, :, 0].tolist()
    assert tree.parents[0, 1:L + 1].tolist() == list(range(L))
    assert not tree.valid[0, L + 1:].any() and (tree.token_ids[0, L + 1:] == -1).all()
    # row 2: a 3-node chain
    assert tree.token_ids[2, 1:4].tolist() == ids[2, :3, 0].tolist() and int(tree.num_nodes[2]) == 4
    # row 1 branches (K = 4, budget 16 > L)
    assert int(tree.num_nodes[1]) == budget + 1 and (tree.ranks[1, 1:] > 0).any()


@pytest.mark.parametrize("kw,name", [
    (dict(row_budget=[0, 3]), "row_budget"),
    (dict(row_budget=[3, 9]), "row_budget"),        # above the batch budget 8
    (dict(row_top_k=[1, 4]), "row_top_k"),          # above the batch top_k 3
    (dict(row_top_k=[1.5, 2]), "row_top_k"),
    (dict(row_budget=[2, 2, 2]), "row_budget"),     # wrong length
    (dict(row_budget=torch.tensor([2.0, 2.0])), "row_budget"),
])
def test_invalid_row_shapes(kw, name):
    lp, ids = random_topk(2, 4, 3, seed=1)
    with pytest.raises(ValueError, match=name):
        build_tree(root_token_ids=torch.arange(2), budget=8, top_k=3, topk_logprobs=lp, topk_ids=ids, **kw)
    with pytest.raises(ValueError, match=name):
        build_tree_naive(root_token_ids=torch.arange(2), budget=8, top_k=3, topk_logprobs=lp, topk_ids=ids, **kw)


@pytest.mark.skipif(not triton_ok(), reason="needs triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("case", [  # (B, L, K, budget, chain_seed, ties) -- small: interpreter
    (3, 4, 3, 9, False, True),
    (4, 5, 2, 8, True, False),
])
def test_triton_row_shapes_match_reference(case):
    B, L, K, budget, chain_seed, ties = case
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lp, ids = random_topk(B, L, K, seed=B + L, ties=ties)
    rb, rk = _random_shapes(B, budget, K, seed=L)
    kw = dict(root_token_ids=torch.arange(B), budget=budget, top_k=K, topk_logprobs=lp, topk_ids=ids,
              chain_seed=chain_seed, row_budget=rb, row_top_k=rk)
    ref = build_tree_naive(**kw)
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) and k not in ("row_budget", "row_top_k") else v)
          for k, v in kw.items()}
    assert tree_fields_equal(build_tree(backend="triton", **kw), ref) == []
