"""Tree walks: batched vs naive, greedy == argmax chain, seeded reproducibility, and losslessness
(chi-square against the exact autoregressive law of a synthetic target)."""

from collections import Counter

import numpy as np
import pytest
import torch

from ddtree.tree import (build_tree, greedy_tree_walk, sample_target_tokens, sample_tree_walk,
                         tree_walk)
from ddtree.tree.naive import tree_walk_naive

from .helpers import random_topk
from .synthetic import SyntheticTarget

P_THRESHOLD = 1e-3  # fixed: a correct sampler passes, the biased variant below fails far beyond it


def walk_fields_equal(a, b):
    return [f for f in ("accepted_nodes", "committed_token_ids", "num_accepted", "last_accepted_node")
            if not torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu())]


def test_walk_matches_naive_random():
    g = torch.Generator().manual_seed(0)
    for trial in range(80):
        B, V = 5, 4
        L = int(torch.randint(1, 7, (), generator=g))
        K = int(torch.randint(1, 4, (), generator=g))
        budget = int(torch.randint(1, 25, (), generator=g))
        tree = build_tree(root_token_ids=torch.randint(0, V, (B,), generator=g), budget=budget, top_k=K,
                          draft_logits=torch.randn(B, L, V, generator=g), chain_seed=trial % 2 == 0,
                          depth_limit=torch.randint(0, L + 1, (B,), generator=g))
        # target tokens agree with the draft often, so long paths are exercised
        t = torch.where(torch.rand(B, budget + 1, generator=g) < 0.6,
                        tree.token_ids.roll(-1, 1).clamp(min=0), torch.randint(0, V, (B, budget + 1), generator=g))
        a, ref = tree_walk(tree, t), tree_walk_naive(tree, t)
        assert walk_fields_equal(a, ref) == [], trial
        n = a.num_accepted
        assert (a.accepted_nodes[:, 0] == 0).all()
        assert torch.equal(a.accepted_nodes.gather(1, n[:, None]).squeeze(1), a.last_accepted_node)
        assert ((a.committed_token_ids >= 0).sum(1) == n + 1).all()


def test_walk_duplicate_sibling_tokens_take_lowest_slot():
    lp = torch.tensor([[[-0.1, -0.2], [-0.3, -0.4]]])
    ids = torch.tensor([[[5, 5], [6, 7]]])  # duplicate ids at depth 1
    tree = build_tree(root_token_ids=torch.tensor([0]), budget=6, top_k=2, topk_logprobs=lp, topk_ids=ids,
                      chain_seed=False)
    t = torch.full((1, 7), 6)
    t[0, 0] = 5
    a, ref = tree_walk(tree, t), tree_walk_naive(tree, t)
    assert walk_fields_equal(a, ref) == []
    assert int(a.accepted_nodes[0, 1]) == 1


def argmax_chain(target, length):
    prefix = ()
    for _ in range(length):
        prefix += (int(np.argmax(target.logits(prefix))),)
    return prefix


@pytest.mark.parametrize("seed", range(6))
def test_greedy_equals_argmax_chain(seed):
    V, L, K = 6, 4, 3
    target = SyntheticTarget(V, seed=seed, concentration=0.3)
    g = torch.Generator().manual_seed(seed)
    chain = argmax_chain(target, L + 1)
    B = 4
    draft = torch.randn(B, L, V, generator=g)
    # make the drafter agree with the target's chain for a random number of depths per request
    for b in range(B):
        for d in range(int(torch.randint(0, L + 1, (), generator=g))):
            draft[b, d, chain[d]] += 5.0
    tree = build_tree(root_token_ids=torch.zeros(B, dtype=torch.long), budget=9, top_k=K,
                      draft_logits=draft, chain_seed=seed % 2 == 0)
    res = greedy_tree_walk(tree, target.tree_logits(tree))
    for b in range(B):
        n = int(res.num_accepted[b])
        assert res.committed_token_ids[b, : n + 1].tolist() == list(chain[: n + 1])
        paths = set(target.node_paths(tree, b)[: int(tree.num_nodes[b])])
        assert chain[:n] in paths and chain[: n + 1] not in paths  # stopped exactly where the tree ends


def run_trials(tree, logits, trials, temperature, seed, top_k=None, top_p=None, bias=0.0):
    """Repeat one tree `trials` times in a batch; returns Counter of committed sequences."""
    B = trials
    big = tree.__class__(**{f: (getattr(tree, f).expand(B, *getattr(tree, f).shape[1:])
                                if isinstance(getattr(tree, f), torch.Tensor) else getattr(tree, f))
                            for f in tree.__dataclass_fields__})
    big_logits = logits.expand(B, -1, -1).clone()
    if bias:
        # the deliberately wrong sampler: boost each node's draft children by log(1 + bias)
        children = torch.zeros_like(logits[0], dtype=torch.bool)
        for c in range(1, int(tree.num_nodes[0])):
            children[int(tree.parents[0, c]), int(tree.token_ids[0, c])] = True
        big_logits = big_logits + np.log1p(bias) * children.float()
    torch.manual_seed(seed)
    kw = {}
    if top_k is not None:
        kw["top_k"] = torch.full((B,), top_k)
    if top_p is not None:
        kw["top_p"] = torch.full((B,), top_p)
    res = sample_tree_walk(big, big_logits, torch.full((B,), temperature), **kw)
    seqs = Counter()
    com, num = res.committed_token_ids.tolist(), res.num_accepted.tolist()
    for row, n in zip(com, num):
        seqs[tuple(row[: n + 1])] += 1
    return seqs


def chi_square_p(counts: Counter, expected: dict, trials: int) -> float:
    from scipy.stats import chisquare  # imported here so the GPU-only tests run where scipy is absent

    assert set(counts) <= set(expected), "emitted a sequence the target cannot produce"
    keys = sorted(expected, key=lambda k: -expected[k])
    obs, exp, rest_o, rest_e = [], [], 0, 0.0
    for k in keys:
        e = expected[k] * trials
        if e >= 5:
            obs.append(counts.get(k, 0))
            exp.append(e)
        else:
            rest_o += counts.get(k, 0)
            rest_e += e
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    exp = np.array(exp) * (trials / np.sum(exp))
    return float(chisquare(obs, exp).pvalue)


def lossless_setup(seed=0):
    V, L, K = 5, 3, 3
    target = SyntheticTarget(V, seed=100 + seed, concentration=1.0)
    g = torch.Generator().manual_seed(seed)
    # drafter: the target's first-depth preferences plus noise, so deep paths and siblings both occur
    draft = torch.randn(1, L, V, generator=g)
    chain = argmax_chain(target, L)
    for d in range(L):
        draft[0, d, chain[d]] += 1.5
    tree = build_tree(root_token_ids=torch.tensor([0]), budget=10, top_k=K, draft_logits=draft, chain_seed=True)
    assert int(tree.num_nodes[0]) == 11 and int(tree.depths[0].max()) == L
    assert (torch.bincount(tree.parents[0, 1:]) >= 2).any(), "tree has no siblings"
    return target, tree, target.tree_logits(tree)


TRIALS = 100_000  # 5% tilt -> p ~ 1e-7 at T=1 (seeds 1-3); correct sampler p in 0.1-1


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, None, None), (0.7, 3, 0.9)])
def test_sampling_walk_is_lossless(temperature, top_k, top_p):
    target, tree, logits = lossless_setup()
    expected = target.emitted_distribution(tree, temperature=temperature, top_k=top_k or 0,
                                           top_p=top_p if top_p is not None else 1.0)
    assert abs(sum(expected.values()) - 1.0) < 1e-9
    counts = run_trials(tree, logits, TRIALS, temperature, seed=1, top_k=top_k, top_p=top_p)
    p = chi_square_p(counts, expected, TRIALS)
    assert p > P_THRESHOLD, p
    # sanity: the walk did accept draft tokens, including off the top-1 chain
    assert sum(c for s, c in counts.items() if len(s) > 1) > TRIALS * 0.2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_biased_sampler_fails_chi_square(temperature):
    target, tree, logits = lossless_setup()
    expected = target.emitted_distribution(tree, temperature=temperature)
    counts = run_trials(tree, logits, TRIALS, temperature, seed=1, bias=0.05)
    assert chi_square_p(counts, expected, TRIALS) < P_THRESHOLD


def test_seeded_requests_reproducible_regardless_of_batch():
    V, L, K = 50, 4, 4
    g = torch.Generator().manual_seed(0)
    draft = torch.randn(4, L, V, generator=g)
    tree = build_tree(root_token_ids=torch.zeros(4, dtype=torch.long), budget=12, top_k=K, draft_logits=draft)
    logits = torch.randn(4, 13, V, generator=g)
    temp = torch.tensor([1.0, 0.8, 0.0, 1.2])

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    a = sample_target_tokens(logits, temp, generators={1: gen(42), 3: gen(7)})
    torch.manual_seed(123)  # unseeded rows change, seeded rows must not
    b = sample_target_tokens(logits, temp, generators={1: gen(42), 3: gen(7)})
    assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
    assert torch.equal(a[2], logits[2].argmax(-1))  # temperature 0 -> greedy
    # the same request alone, at a different batch index, with different neighbours
    sub = torch.stack([torch.randn(13, V, generator=g), logits[1]])
    c = sample_target_tokens(sub, torch.tensor([0.5, 0.8]), generators={1: gen(42)})
    assert torch.equal(c[1], a[1])
    # all rows seeded: no global RNG use
    d1 = sample_target_tokens(logits, temp, generators={i: gen(i) for i in range(4)})
    d2 = sample_target_tokens(logits, temp, generators={i: gen(i) for i in range(4)})
    assert torch.equal(d1, d2)
    res = sample_tree_walk(tree, logits.reshape(4 * 13, V), temp, generators={1: gen(42), 3: gen(7)})
    assert torch.equal(res.target_token_ids[1], a[1])


def test_sampler_bad_arguments():
    tree = build_tree(root_token_ids=torch.zeros(2, dtype=torch.long), budget=3, top_k=2,
                      draft_logits=torch.randn(2, 2, 5))
    logits = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="target_logits"):
        greedy_tree_walk(tree, torch.randn(3, 5))
    with pytest.raises(ValueError, match="temperature"):
        sample_tree_walk(tree, logits, torch.ones(3))
    with pytest.raises(ValueError, match="top_p"):
        sample_tree_walk(tree, logits, torch.ones(2), top_p=torch.ones(1))
    with pytest.raises(ValueError, match="generators"):
        sample_tree_walk(tree, logits, torch.ones(2), generators={5: torch.Generator()})
    with pytest.raises(ValueError, match="target_token_ids"):
        tree_walk(tree, torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_walk_matches_cpu():
    lp, ids = random_topk(16, 15, 8, seed=3)
    tree = build_tree(root_token_ids=torch.arange(16), budget=32, top_k=8, topk_logprobs=lp, topk_ids=ids)
    gtree = build_tree(root_token_ids=torch.arange(16).cuda(), budget=32, top_k=8, topk_logprobs=lp.cuda(),
                       topk_ids=ids.cuda())
    t = torch.where(torch.rand(16, 33) < 0.8, tree.token_ids.roll(-1, 1).clamp(min=0), 0)
    assert walk_fields_equal(tree_walk(tree, t), tree_walk(gtree, t.cuda())) == []
