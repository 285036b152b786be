"""Index math of one tree-verify step in a model runner whose batch is flattened per request.

A verify block of request ``e`` occupies rows ``starts[e] .. starts[e] + q_lens[e] - 1`` of the
flattened batch (tokens, hidden states or logits): node ``j`` of the draft tree sits in row
``starts[e] + j``, node 0 being the root. After the tree walk the accepted path
``accepted[e, 0..m_e]`` (root first) is known. vLLM's chain bookkeeping (the drafter's context,
logprobs of the committed tokens, the next step's positions) expects the accepted tokens in the
first ``m_e + 1`` rows of the block, in path order, at positions ``prefix + j``; these helpers give
the row gathers that lay a verified tree out that way. Pure torch, any device; the naive references
are in ``tests/tree/test_verify_index.py``.
"""

from __future__ import annotations

import torch

from ddtree.transfer import to_device


def _check_blocks(starts: torch.Tensor, q_lens: torch.Tensor) -> None:
    if starts.dim() != 1 or q_lens.shape != starts.shape:
        raise ValueError(f"starts/q_lens: expected two [E] tensors, got {tuple(starts.shape)} and "
                         f"{tuple(q_lens.shape)}")
    if bool((q_lens < 1).any()):
        raise ValueError("q_lens: every verify block holds at least its root (q_len >= 1)")


def path_gather_index(num_rows: int, starts: torch.Tensor, accepted: torch.Tensor,
                      num_accepted: torch.Tensor) -> torch.Tensor:
    """Row gather that puts each block's accepted path first: ``out[r] = r`` everywhere except
    ``out[starts[e] + j] = starts[e] + accepted[e, j]`` for ``0 <= j <= num_accepted[e]``.

    starts [E], accepted [E, W] (node ids, root first, -1 past the path), num_accepted [E].
    Returns a long tensor [num_rows] on the device of ``accepted``; ``x[out]`` is the laid-out copy.
    """
    dev = accepted.device
    if accepted.dim() != 2 or accepted.shape[0] != starts.shape[0]:
        raise ValueError(f"accepted: expected [E, W] with E = {starts.shape[0]}, got {tuple(accepted.shape)}")
    out = torch.arange(num_rows, device=dev)
    if starts.numel() == 0:
        return out
    s = to_device(starts, dev).long()
    m = to_device(num_accepted, dev).long()
    if bool((m >= accepted.shape[1]).any()) or bool((m < 0).any()):
        raise ValueError(f"num_accepted: must lie in [0, {accepted.shape[1] - 1}]")
    j = torch.arange(accepted.shape[1], device=dev)[None, :]
    on_path = j <= m[:, None]
    dst = (s[:, None] + j)[on_path]
    src = (s[:, None] + accepted.long().clamp(min=0))[on_path]
    if dst.numel() and int(torch.maximum(dst.max(), src.max())) >= num_rows:
        raise ValueError(f"accepted path rows reach past num_rows={num_rows}")
    out[dst] = src
    return out


def moved_rows(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) of the rows a gather index changes: apply as ``x[dst] = x[src]`` (the right-hand
    side is gathered first, so overlapping src/dst are fine)."""
    dst = torch.nonzero(index != torch.arange(index.numel(), device=index.device)).flatten()
    return index[dst], dst


def block_token_rows(starts: torch.Tensor, q_lens: torch.Tensor, width: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the blocks' tokens as [E, width] (``starts[e] + j``) and the mask ``j < q_lens[e]``."""
    _check_blocks(starts, q_lens)
    j = torch.arange(width, device=starts.device)[None, :]
    return starts.long()[:, None] + j, j < q_lens.long()[:, None]


def tree_positions(starts: torch.Tensor, q_lens: torch.Tensor, prefix_lens: torch.Tensor,
                   depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of every node of the blocks: node j at ``prefix + depths[e, j]``."""
    rows, inside = block_token_rows(starts, q_lens, depths.shape[1])
    pos = prefix_lens.long()[:, None] + depths.long()
    return rows[inside], pos[inside]


def chain_positions(starts: torch.Tensor, q_lens: torch.Tensor, prefix_lens: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the blocks laid out as chains: row ``starts + j`` at ``prefix + j``."""
    width = int(q_lens.max()) if q_lens.numel() else 0
    rows, inside = block_token_rows(starts, q_lens, width)
    pos = prefix_lens.long()[:, None] + torch.arange(width, device=starts.device)[None, :]
    return rows[inside], pos[inside]


def verify_walk_arrays(num_draft: torch.Tensor, cu_rows: torch.Tensor, width: int,
                       draft_token_ids: torch.Tensor, tree_rows: torch.Tensor,
                       tree_parents: torch.Tensor, tree_depths: torch.Tensor,
                       tree_num_nodes: torch.Tensor) -> dict[str, torch.Tensor]:
    """The walk's per-request arrays for a whole batch (R requests, ``width`` = budget + 1 slots).

    Request i verifies ``num_draft[i]`` drafts in rows ``cu_rows[i] .. cu_rows[i] + num_draft[i]``
    of the sampled rows (``draft_token_ids`` [sum(num_draft)] are its drafts, in order). Requests
    listed in ``tree_rows`` [E] verify a tree (``tree_parents`` / ``tree_depths`` [E, width],
    ``tree_num_nodes`` [E] real nodes; padding nodes are not valid); all others verify the chain
    of their drafts. Returns ``token_ids``, ``parents``, ``depths``, ``valid``, ``rows`` (row of
    each slot, 0 past the block) and ``row_valid``, each [R, width].
    """
    num_draft = num_draft.long()
    R = num_draft.shape[0]
    if cu_rows.shape[0] != R + 1:
        raise ValueError(f"cu_rows: expected {R + 1} entries, got {cu_rows.shape[0]}")
    if bool((num_draft + 1 > width).any()):
        raise ValueError(f"num_draft: a block holds at most width - 1 = {width - 1} drafts")
    if draft_token_ids.numel() != int(num_draft.sum()):
        raise ValueError(f"draft_token_ids: expected {int(num_draft.sum())} ids, got {draft_token_ids.numel()}")
    q = num_draft + 1
    j = torch.arange(width)[None, :]
    in_block = j < q[:, None]
    rows = torch.where(in_block, cu_rows[:-1].long()[:, None] + j, torch.zeros((), dtype=torch.long))
    tokens = torch.full((R, width), -1, dtype=torch.long)
    drafted = (j >= 1) & in_block
    tokens[drafted] = draft_token_ids.long().flatten()  # row-major: request by request, in order
    parents = torch.where(in_block, j - 1, torch.full((), -1, dtype=torch.long))
    depths = torch.where(in_block, j, torch.zeros((), dtype=torch.long))
    valid = in_block.clone()
    if tree_rows.numel():
        tr = tree_rows.long()
        if bool((tree_num_nodes.long() > q[tr]).any()):
            raise ValueError("tree_num_nodes: a tree has more real nodes than its block has slots")
        t_in = in_block[tr]
        parents[tr] = torch.where(t_in, tree_parents.long(), torch.full((), -1, dtype=torch.long))
        depths[tr] = torch.where(t_in, tree_depths.long(), torch.zeros((), dtype=torch.long))
        valid[tr] = j < tree_num_nodes.long()[:, None]
    return {"token_ids": tokens, "parents": parents, "depths": depths, "valid": valid,
            "rows": rows, "row_valid": in_block}
