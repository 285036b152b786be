"""The batched tree-verify attention (one plan per step, one SDPA per layer) against the per-request
reference, on vLLM 0.26's GPU paged-cache layout (NHD and HND memory orders), on CPU tensors."""

import pytest
import torch

from ddtree.attention.batched import (move_paged_kv_rows, paged_kv_rows, plan_tree_attention,
                                      tree_attention_batched, write_tree_rows)
from ddtree.attention.tree_sdpa import tree_attention


def _random_tree(n, g):
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    vis = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        vis[i, i] = True
        if parents[i] >= 0:
            vis[i, :i] |= vis[parents[i], :i]
            depth[i] = depth[parents[i]] + 1
    return vis, depth


def _cache(nblocks, kvh, bs, D, order, g):
    """A bf16-free fp32 cache with vLLM's logical shape [blocks, kvh, bs, 2D] over NHD/HND memory."""
    if order == "NHD":
        phys = torch.randn(nblocks, bs, kvh, 2 * D, generator=g)
        return phys.transpose(1, 2)
    return torch.randn(nblocks, kvh, bs, 2 * D, generator=g)


def _setup(seed, order, prefixes, qlens, heads=4, kvh=2, D=16, bs=16, extra_rows=3):
    g = torch.Generator().manual_seed(seed)
    E, Q = len(prefixes), max(qlens)
    max_blocks = max((p + q + bs - 1) // bs for p, q in zip(prefixes, qlens)) + 1
    nblocks = E * max_blocks + 2
    cache = _cache(nblocks, kvh, bs, D, order, g)
    perm = torch.randperm(nblocks, generator=g)
    # batch rows: tree requests interleaved with non-tree rows (e.g. prefills)
    R = E + 1
    table = torch.zeros(R, max_blocks, dtype=torch.int32)
    rows = []
    for e in range(E):
        r = e + 1 if e % 2 else e
        rows.append(r)
    rows = torch.tensor(rows)
    for e in range(E):
        table[rows[e]] = perm[e * max_blocks:(e + 1) * max_blocks].int()
    vis = torch.zeros(E, Q, Q, dtype=torch.bool)
    depths = torch.zeros(E, Q, dtype=torch.long)
    starts, pos = [], extra_rows
    for e, q in enumerate(qlens):
        v, d = _random_tree(q, g)
        vis[e, :q, :q], depths[e, :q] = v, d
        starts.append(pos)
        pos += q + 2
    T = pos
    query = torch.randn(T, heads, D, generator=g)
    return cache, table, rows, torch.tensor(starts), vis, depths, query, D, bs


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("window", [None, 7])
def test_batched_equals_per_request_reference(order, window):
    prefixes, qlens = [0, 13, 40, 5], [5, 9, 17, 1]
    cache, table, rows, starts, vis, depths, query, D, bs = _setup(3, order, prefixes, qlens)
    plan = plan_tree_attention(table, bs, rows, starts, torch.tensor(prefixes), torch.tensor(qlens),
                               vis, depths)
    k, v = paged_kv_rows(cache, D, plan.slots)
    out = tree_attention_batched(query, k, v, plan, D ** -0.5, window, compute_dtype=torch.float32)
    output = torch.zeros_like(query)
    write_tree_rows(output, out, plan)
    for e, (p, q) in enumerate(zip(prefixes, qlens)):
        n = p + q
        pos = torch.arange(n)
        slots = table[rows[e]].long()[pos // bs] * bs + pos % bs
        ke, ve = paged_kv_rows(cache, D, slots)  # [n, kvh, D]
        ref = tree_attention(query[starts[e]:starts[e] + q], ke.transpose(0, 1), ve.transpose(0, 1),
                             p, vis[e, :q, :q], D ** -0.5, window)
        torch.testing.assert_close(output[starts[e]:starts[e] + q], ref, atol=1e-5, rtol=1e-5)
    # rows of no tree request are untouched
    written = torch.zeros(query.shape[0], dtype=torch.bool)
    for e, q in enumerate(qlens):
        written[starts[e]:starts[e] + q] = True
    assert bool((output[~written] == 0).all())


def test_plan_slots_and_positions():
    prefixes, qlens = [3, 20], [4, 6]
    cache, table, rows, starts, vis, depths, query, D, bs = _setup(5, "NHD", prefixes, qlens)
    plan = plan_tree_attention(table, bs, rows, starts, torch.tensor(prefixes), torch.tensor(qlens),
                               vis, depths)
    for e, (p, q) in enumerate(zip(prefixes, qlens)):
        for j in range(p + q):
            assert int(plan.slots[e, j]) == int(table[rows[e], j // bs]) * bs + j % bs
        assert plan.key_pos[e, :p].tolist() == list(range(p))
        assert plan.key_pos[e, p:p + q].tolist() == (p + depths[e, :q]).tolist()
        assert plan.query_rows[e, :q].tolist() == list(range(int(starts[e]), int(starts[e]) + q))


def test_causal_mask_would_differ():
    """The plan's mask is not the causal one: a bushy tree gives other rows than causal attention."""
    prefixes, qlens = [8], [9]
    cache, table, rows, starts, vis, depths, query, D, bs = _setup(11, "HND", prefixes, qlens)
    causal = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None]
    assert not torch.equal(vis, causal)
    outs = []
    for m in (vis, causal):
        plan = plan_tree_attention(table, bs, rows, starts, torch.tensor(prefixes), torch.tensor(qlens),
                                   m, depths)
        k, v = paged_kv_rows(cache, D, plan.slots)
        outs.append(tree_attention_batched(query, k, v, plan, D ** -0.5, compute_dtype=torch.float32))
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_move_rows_reads_all_before_writing(order):
    g = torch.Generator().manual_seed(2)
    cache = _cache(3, 2, 16, 8, order, g)
    before = cache.clone()
    # path [0, 2, 5]: slot 2 -> 1 and 5 -> 2 (slot 2 is both a source and a destination)
    src, dst = torch.tensor([2, 5, 20]), torch.tensor([1, 2, 17])
    move_paged_kv_rows(cache, src, dst)
    k0, v0 = paged_kv_rows(before, 8, src)
    k1, v1 = paged_kv_rows(cache, 8, dst)
    torch.testing.assert_close(k1, k0)
    torch.testing.assert_close(v1, v0)
    untouched = torch.tensor([0, 3, 4, 16, 40])
    torch.testing.assert_close(paged_kv_rows(cache, 8, untouched)[0], paged_kv_rows(before, 8, untouched)[0])


def test_bad_cache_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="kv_cache"):
        paged_kv_rows(torch.zeros(2, 2, 16, 10), 8, torch.tensor([0]))


def test_chunked_over_requests_equals_one_batch():
    from ddtree.attention.batched import paged_tree_attention_chunked

    prefixes, qlens = [0, 13, 40, 5, 70], [5, 9, 17, 1, 3]
    cache, table, rows, starts, vis, depths, query, D, bs = _setup(7, "NHD", prefixes, qlens)
    plan = plan_tree_attention(table, bs, rows, starts, torch.tensor(prefixes), torch.tensor(qlens),
                               vis, depths)
    k, v = paged_kv_rows(cache, D, plan.slots)
    whole = torch.zeros_like(query)
    write_tree_rows(whole, tree_attention_batched(query, k, v, plan, 0.25, 9,
                                                  compute_dtype=torch.float32), plan)
    for budget in (1, 3000, 1 << 30):  # one request per group, a few, all at once
        chunked = torch.zeros_like(query)
        paged_tree_attention_chunked(query, chunked, lambda s: paged_kv_rows(cache, D, s), plan, 0.25,
                                     9, compute_dtype=torch.float32, max_kv_elements=budget)
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
