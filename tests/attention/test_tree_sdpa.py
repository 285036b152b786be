import pytest
import torch

from ddtree.attention.tree_sdpa import paged_tree_attention, paged_tree_attention_naive


def _random_tree_vis(n, g):
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    vis = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        vis[i, i] = True
        if parents[i] >= 0:
            vis[i, :i] |= vis[parents[i], :i]
    return vis


@pytest.mark.parametrize("prefix,q,heads,kvh", [(0, 5, 4, 2), (13, 9, 4, 4), (40, 17, 8, 2)])
def test_matches_naive(prefix, q, heads, kvh):
    g = torch.Generator().manual_seed(prefix * 31 + q)
    bs, D = 16, 32
    nblocks = (prefix + q + bs - 1) // bs + 3
    kc = torch.randn(nblocks, kvh, bs, D, generator=g)
    vc = torch.randn(nblocks, kvh, bs, D, generator=g)
    table = torch.randperm(nblocks, generator=g)
    query = torch.randn(q, heads, D, generator=g)
    vis = _random_tree_vis(q, g)
    out = paged_tree_attention(query, kc, vc, table, prefix, vis, D ** -0.5)
    ref = paged_tree_attention_naive(query, kc, vc, table, prefix, vis, D ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_chain_equals_causal_attention():
    g = torch.Generator().manual_seed(0)
    q, prefix, D = 6, 10, 16
    kc = torch.randn(2, 2, 16, D, generator=g)
    vc = torch.randn(2, 2, 16, D, generator=g)
    table = torch.tensor([1, 0])
    query = torch.randn(q, 2, D, generator=g)
    chain = torch.tril(torch.ones(q, q, dtype=torch.bool))
    out = paged_tree_attention(query, kc, vc, table, prefix, chain, D ** -0.5)
    # causal over the whole sequence, last q rows
    k = torch.cat([kc[1, :, :16], kc[0, :, :0]], dim=1)[:, :prefix + q]
    v = torch.cat([vc[1, :, :16], vc[0, :, :0]], dim=1)[:, :prefix + q]
    mask = torch.ones(q, prefix + q, dtype=torch.bool)
    mask[:, prefix:] = chain
    ref = torch.nn.functional.scaled_dot_product_attention(query.transpose(0, 1), k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_wrong_mask_is_detected():
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(2, 1, 16, 8, generator=g)
    vc = torch.randn(2, 1, 16, 8, generator=g)
    query = torch.randn(4, 1, 8, generator=g)
    vis = _random_tree_vis(4, g)
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    if torch.equal(vis, causal):
        vis = torch.eye(4, dtype=torch.bool)
    a = paged_tree_attention(query, kc, vc, torch.tensor([0, 1]), 3, vis, 0.3)
    b = paged_tree_attention(query, kc, vc, torch.tensor([0, 1]), 3, causal, 0.3)
    assert not torch.allclose(a, b)
