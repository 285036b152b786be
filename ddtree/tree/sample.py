"""Tree verification walks, batched: no Python loop over requests or nodes.

Both walks first pick the target's token at every node slot in parallel (argmax, or one independent
sample from that node's target distribution), then follow the tree: from the root, move to the child
carrying the target's token, else emit it as the bonus token and stop. Only tokens at visited nodes
matter; each of them is a fresh draw from the target's conditional given the accepted prefix, so the
committed sequence is distributed exactly as autoregressive sampling from the target (lossless) for
any temperature / top-k / top-p.

Randomness follows vLLM's V1 sampler convention (vllm/v1/sample/ops/topk_topp_sampler.py): the
sample is argmax(probs / E) with E ~ Exp(1) noise; rows of unseeded requests draw their noise from
the global RNG in one call, and every request listed in ``generators`` ({request index:
torch.Generator}) redraws its own [N, V] noise block from its generator, so a seeded request's
result does not depend on the rest of the batch.
"""

from __future__ import annotations

import torch

from .types import DraftTree, WalkResult

SAMPLING_EPS = 1e-5  # temperature below this means greedy (vLLM's _SAMPLING_EPS)


def tree_walk(tree: DraftTree, target_token_ids: torch.Tensor) -> WalkResult:
    """Follow each tree with the target's token per node slot ([B, N], any integer dtype).

    If two siblings carry the same token (only possible with duplicate draft ids) the lower slot wins.
    """
    B, N = tree.token_ids.shape
    L = tree.max_depth
    if target_token_ids.shape != (B, N):
        raise ValueError(f"target_token_ids: expected shape {(B, N)}, got {tuple(target_token_ids.shape)}")
    dev = tree.token_ids.device
    t = target_token_ids.to(dev, torch.long)
    slot = torch.arange(N, device=dev).expand(B, N)
    has_parent = tree.parents >= 0
    par = tree.parents.clamp(min=0)
    match = tree.valid & has_parent & (tree.token_ids == t.gather(1, par))
    # First matching child per parent (scatter-min over slots; column N is a sink).
    first = torch.full((B, N + 1), N, dtype=torch.long, device=dev)
    first.scatter_reduce_(1, torch.where(match, par, N), torch.where(match, slot, N), reduce="amin")
    edge_ok = match & (first.gather(1, par) == slot)
    edge_ok = edge_ok | ~has_parent  # the root (and padding, masked below) is trivially fine
    # Pointer doubling: ok[i] = AND of edge_ok over i and its ancestors; 2^steps > L covers every path.
    ok, jump = edge_ok, tree.parents
    for _ in range(max(L, 1).bit_length()):
        up = jump >= 0
        j = jump.clamp(min=0)
        ok = ok & (~up | ok.gather(1, j))
        jump = torch.where(up, jump.gather(1, j), -1)
    reachable = ok & tree.valid
    last = torch.where(reachable, tree.depths, -1).argmax(1)
    num_accepted = tree.depths.gather(1, last[:, None]).squeeze(1)

    accepted = torch.full((B, L + 2), -1, dtype=torch.long, device=dev)
    accepted.scatter_(1, torch.where(reachable, tree.depths, L + 1), slot)
    accepted = accepted[:, : L + 1].contiguous()
    col = torch.arange(L + 1, device=dev)[None, :]
    draft_tok = tree.token_ids.gather(1, accepted.clamp(min=0))  # column k+1 is the k-th committed token
    draft_tok = torch.cat([draft_tok[:, 1:], torch.full((B, 1), -1, dtype=torch.long, device=dev)], 1)
    bonus = t.gather(1, last[:, None])
    committed = torch.where(col < num_accepted[:, None], draft_tok,
                            torch.where(col == num_accepted[:, None], bonus, -1))
    return WalkResult(accepted_nodes=accepted, committed_token_ids=committed, num_accepted=num_accepted,
                      last_accepted_node=last, target_token_ids=t)


def _logits_3d(tree: DraftTree, target_logits: torch.Tensor) -> torch.Tensor:
    B, N = tree.token_ids.shape
    if target_logits.dim() == 2 and target_logits.shape[0] == B * N:
        return target_logits.view(B, N, -1)
    if target_logits.dim() == 3 and target_logits.shape[:2] == (B, N):
        return target_logits
    raise ValueError(f"target_logits: expected [{B}*{N}, V] or [{B}, {N}, V] (padded slot layout), "
                     f"got {tuple(target_logits.shape)}")


def greedy_tree_walk(tree: DraftTree, target_logits: torch.Tensor) -> WalkResult:
    """Greedy verification: the target's argmax at every node. target_logits: [B*N, V] or [B, N, V]."""
    return tree_walk(tree, _logits_3d(tree, target_logits).argmax(-1))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask [R, V] logits to each row's top-k (all ties of the k-th value kept; k <= 0 or >= V: off)
    and then to the smallest top set whose probability reaches top_p (the best token always stays;
    p >= 1: off). Same semantics as vLLM's torch path."""
    if top_k is None and top_p is None:
        return logits
    R, V = logits.shape
    sorted_logits, order = logits.sort(-1, descending=True)
    if top_k is not None:
        k = top_k.to(logits.device, torch.long)
        k = torch.where((k <= 0) | (k > V), V, k)
        kth = sorted_logits.gather(1, (k - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        p = top_p.to(logits.device, torch.float32)
        probs = sorted_logits.softmax(-1, dtype=torch.float32)
        before = torch.cumsum(probs, -1) - probs
        drop = before >= p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_target_tokens(
    target_logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    generators: dict[int, torch.Generator] | None = None,
) -> torch.Tensor:
    """One token per node slot from the target: [B, N, V] logits -> [B, N] long.

    temperature [B] (< 1e-5 means greedy: argmax), optional top_k [B] long, top_p [B] float,
    generators {request index: torch.Generator} for seeded requests.
    """
    if target_logits.dim() != 3:
        raise ValueError("target_logits: expected [B, N, V]")
    B, N, V = target_logits.shape
    generators = generators or {}
    if not isinstance(temperature, torch.Tensor) or temperature.shape != (B,):
        raise ValueError(f"temperature: expected a [{B}] tensor")
    for name, x in (("top_k", top_k), ("top_p", top_p)):
        if x is not None and (not isinstance(x, torch.Tensor) or x.shape != (B,)):
            raise ValueError(f"{name}: expected a [{B}] tensor or None")
    if any((not isinstance(i, int)) or i < 0 or i >= B for i in generators):
        raise ValueError(f"generators: keys must be request indices in [0, {B})")
    dev = target_logits.device
    temp = temperature.to(dev, torch.float32)
    greedy = temp < SAMPLING_EPS
    greedy_tok = target_logits.argmax(-1)
    x = target_logits.float() / torch.where(greedy, 1.0, temp)[:, None, None]
    if top_k is not None or top_p is not None:
        k = None if top_k is None else top_k.to(dev).repeat_interleave(N)
        p = None if top_p is None else top_p.to(dev).repeat_interleave(N)
        x = apply_top_k_top_p(x.reshape(B * N, V), k, p).view(B, N, V)
    probs = x.softmax(-1)
    noise = torch.empty_like(probs)
    if len(generators) != B:
        noise.exponential_()
    for i, gen in generators.items():
        noise[i].exponential_(generator=gen)
    sampled = (probs / noise).argmax(-1)
    return torch.where(greedy[:, None], greedy_tok, sampled)


def sample_tree_walk(
    tree: DraftTree,
    target_logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    generators: dict[int, torch.Generator] | None = None,
) -> WalkResult:
    """Sampling verification (lossless at any temperature). target_logits: [B*N, V] or [B, N, V]."""
    logits = _logits_3d(tree, target_logits)
    tokens = sample_target_tokens(logits, temperature, top_k, top_p, generators)
    return tree_walk(tree, tokens)
