import torch

from ddtree.tree import DraftTree


def random_topk(B, L, K, *, seed, vocab=64, ties=False, scale=2.0, device="cpu"):
    """Random per-depth top-K (log-probs sorted descending, distinct ids)."""
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, L, max(K, 2) + 3, generator=g) * scale).log_softmax(-1)
    lp = lp.sort(-1, descending=True).values[..., :K]
    if ties:
        # Coarse values make many exact sibling / cross-branch ties.
        lp = (lp * 2).floor() / 2
    ids = torch.stack([torch.randperm(vocab, generator=g)[:K] for _ in range(B * L)]).view(B, L, K)
    return lp.to(device), ids.to(device)


def tree_fields_equal(a: DraftTree, b: DraftTree) -> list[str]:
    bad = []
    for f in ("token_ids", "parents", "depths", "ranks", "num_nodes", "valid", "scores"):
        if not torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()):
            bad.append(f)
    return bad
