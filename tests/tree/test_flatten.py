"""Flattening vs naive references: ancestor masks, FlashInfer layout + packing, child table, rows."""

import numpy as np
import pytest
import torch

from ddtree.tree import (ancestor_mask, build_tree, child_table, flashinfer_custom_mask, flatten_tree,
                         logits_rows, pack_bits_rows)
from ddtree.tree.naive import ancestor_mask_naive, child_table_naive, flashinfer_mask_naive

from .helpers import random_topk


def make_tree(B=5, L=6, K=3, budget=14, seed=0, chain_seed=True, limit=None):
    lp, ids = random_topk(B, L, K, seed=seed, ties=seed % 2 == 1)
    return build_tree(root_token_ids=torch.arange(B), budget=budget, top_k=K, topk_logprobs=lp,
                      topk_ids=ids, chain_seed=chain_seed, depth_limit=limit)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(5, 6, 3, 14), (3, 15, 8, 32), (4, 4, 1, 4), (2, 2, 2, 40), (3, 1, 4, 3)])
def test_masks_and_children_match_naive(seed, shape):
    B, L, K, budget = shape
    limit = torch.randint(0, L + 1, (B,), generator=torch.Generator().manual_seed(seed)) if seed % 2 else None
    tree = make_tree(B, L, K, budget, seed, chain_seed=seed < 2, limit=limit)
    vis = ancestor_mask(tree)
    assert torch.equal(vis, ancestor_mask_naive(tree))
    table = child_table(tree)
    assert torch.equal(table, child_table_naive(tree))
    # every valid non-root node appears exactly once, under its parent
    for b in range(B):
        n = int(tree.num_nodes[b])
        kids = table[b][table[b] >= 0].tolist()
        assert sorted(kids) == list(range(1, n))
    # vis semantics spelled out: row i sees exactly its depth + 1 nodes, all with smaller slots
    N = budget + 1
    assert torch.equal(vis.sum(-1), torch.where(tree.valid, tree.depths + 1, 1))
    assert not torch.triu(vis, diagonal=1).any()
    # positions and packed tree mask
    root_pos = torch.tensor([5 * b + 3 for b in range(B)])
    flat = flatten_tree(tree, root_pos)
    assert torch.equal(flat.positions, root_pos[:, None] + tree.depths)
    packed_np = np.stack([np.packbits(vis[b].reshape(-1).numpy(), bitorder="little") for b in range(B)])
    assert np.array_equal(flat.tree_mask_packed.numpy(), packed_np)
    assert flat.tree_mask_packed.shape == (B, (N * N + 7) // 8)


@pytest.mark.parametrize("compact", [False, True])
def test_flashinfer_layout(compact):
    tree = make_tree(B=5, L=5, K=3, budget=11, seed=2, limit=torch.tensor([5, 0, 2, 5, 1]))
    vis = ancestor_mask(tree)
    prefix = [0, 7, 3, 12, 1]
    q_lens = tree.num_nodes.tolist() if compact else [12] * 5
    fm = flashinfer_custom_mask(vis, torch.tensor(prefix), tree.num_nodes if compact else None)
    m, pk, mi, pi = flashinfer_mask_naive(vis, prefix, q_lens)
    assert np.array_equal(fm.mask.numpy(), m)
    assert np.array_equal(fm.packed.numpy(), pk)
    assert np.array_equal(fm.mask_indptr.numpy(), mi)
    assert np.array_equal(fm.packed_indptr.numpy(), pi)
    assert fm.qo_indptr.tolist() == np.concatenate([[0], np.cumsum(q_lens)]).tolist()
    assert fm.kv_lens.tolist() == [p + q for p, q in zip(prefix, q_lens)]
    # unpacking each segment (like FlashInfer's kernels do) gives the mask back
    for b in range(5):
        seg = fm.mask[fm.mask_indptr[b]:fm.mask_indptr[b + 1]].numpy()
        un = np.unpackbits(fm.packed[fm.packed_indptr[b]:fm.packed_indptr[b + 1]].numpy(), bitorder="little")
        assert np.array_equal(un[: seg.size], seg) and not un[seg.size:].any()
    # spot-check a bit: request 3, tree row 4 sees the whole prefix and its own slot
    kv = prefix[3] + q_lens[3]
    row = fm.mask[fm.mask_indptr[3] + 4 * kv: fm.mask_indptr[3] + 5 * kv]
    assert row[: prefix[3]].all() and bool(row[prefix[3] + 4])


def test_pack_bits_rows_matches_numpy():
    g = torch.Generator().manual_seed(0)
    for C in (1, 7, 8, 9, 33 * 33):
        bits = torch.rand(4, C, generator=g) > 0.5
        ref = np.stack([np.packbits(r, bitorder="little") for r in bits.numpy()])
        assert np.array_equal(pack_bits_rows(bits).numpy(), ref)


def test_logits_rows():
    tree = make_tree(B=3, L=4, K=2, budget=5, seed=0, limit=torch.tensor([4, 0, 1]))
    assert logits_rows(tree).tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]]
    n = tree.num_nodes.tolist()
    assert n == [6, 1, 3]
    assert logits_rows(tree, compact=True).tolist() == [
        [0, 1, 2, 3, 4, 5], [6, -1, -1, -1, -1, -1], [7, 8, 9, -1, -1, -1]]


def test_bad_arguments():
    tree = make_tree()
    vis = ancestor_mask(tree)
    with pytest.raises(ValueError, match="prefix_lens"):
        flashinfer_custom_mask(vis, [1, 2])
    with pytest.raises(ValueError, match="prefix_lens"):
        flashinfer_custom_mask(vis, [1, 2, 3, 4, -1])
    with pytest.raises(ValueError, match="vis"):
        flashinfer_custom_mask(vis.float(), [0] * 5)
    with pytest.raises(ValueError, match="q_lens"):
        flashinfer_custom_mask(vis, [0] * 5, [99] * 5)
    with pytest.raises(ValueError, match="root_positions"):
        flatten_tree(tree, torch.zeros(3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu():
    tree = make_tree(B=6, L=15, K=8, budget=32, seed=1)
    gtree = build_tree(root_token_ids=torch.arange(6).cuda(), budget=32, top_k=8,
                       topk_logprobs=random_topk(6, 15, 8, seed=1, ties=True)[0].cuda(),
                       topk_ids=random_topk(6, 15, 8, seed=1, ties=True)[1].cuda())
    a, b = flatten_tree(tree, torch.arange(6)), flatten_tree(gtree, torch.arange(6).cuda())
    for f in ("positions", "ancestor_mask", "child_table", "logits_rows", "tree_mask_packed"):
        assert torch.equal(getattr(a, f), getattr(b, f).cpu()), f
    fa = flashinfer_custom_mask(a.ancestor_mask, [10] * 6)
    fb = flashinfer_custom_mask(b.ancestor_mask, [10] * 6)
    assert torch.equal(fa.packed, fb.packed.cpu()) and torch.equal(fa.mask, fb.mask.cpu())
