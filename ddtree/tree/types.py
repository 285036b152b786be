"""Small result containers of the tree core. Every tensor has a static shape for a given
(batch, budget, max depth, top_k), so a decode step built from them can be captured in a CUDA graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """A batch of draft trees, N = budget + 1 node slots per request, node 0 = the root.

    The root carries the last committed token (it is not a draft). Valid nodes occupy slots
    0..num_nodes-1 in parent-before-child order; the remaining slots are padding.
    """

    token_ids: torch.Tensor  # [B, N] long; padding -1
    parents: torch.Tensor  # [B, N] long; root and padding -1
    depths: torch.Tensor  # [B, N] long; root 0, padding 0
    ranks: torch.Tensor  # [B, N] long; sibling rank in the drafter's top-K at that depth; root/padding -1
    scores: torch.Tensor  # [B, N] float32; cumulative draft log-prob of the path; root 0, padding -inf
    num_nodes: torch.Tensor  # [B] long; valid nodes including the root
    valid: torch.Tensor  # [B, N] bool
    max_depth: int  # L, the number of drafted depths the tree was built from
    top_k: int  # K, the branching limit

    @property
    def batch_size(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_slots(self) -> int:
        return self.token_ids.shape[1]

    @property
    def budget(self) -> int:
        return self.token_ids.shape[1] - 1


@dataclass
class FlatTree:
    """What the verifier needs, in the padded layout (every request feeds all N slots)."""

    positions: torch.Tensor  # [B, N] long: root_pos + depth
    ancestor_mask: torch.Tensor  # [B, N, N] bool: [b, i, j] True iff j is an ancestor of i or j == i
    child_table: torch.Tensor  # [B, N, K] long: child node of node n with sibling rank r, else -1
    logits_rows: torch.Tensor  # [B, N] long: row of the flattened [B*N, V] verifier logits scoring node n's children
    tree_mask_packed: torch.Tensor  # [B, ceil(N*N/8)] uint8: ancestor_mask[b] row-major, little-endian bits


@dataclass
class FlashInferMask:
    """FlashInfer custom-mask inputs for a batch: per request a row-major q_len x kv_len mask
    (kv = committed prefix then the tree), concatenated over requests."""

    qo_indptr: torch.Tensor  # [B+1] int32
    kv_lens: torch.Tensor  # [B] int32: prefix_len + q_len
    mask_indptr: torch.Tensor  # [B+1] int64: offsets into ``mask`` (q_len * kv_len per request)
    mask: torch.Tensor  # [mask_indptr[-1]] bool
    packed_indptr: torch.Tensor  # [B+1] int64: offsets into ``packed`` (ceil(q_len*kv_len/8) per request)
    packed: torch.Tensor  # [packed_indptr[-1]] uint8, numpy.packbits(bitorder="little") per segment


@dataclass
class WalkResult:
    """Outcome of verifying a batch of trees. L = tree.max_depth."""

    accepted_nodes: torch.Tensor  # [B, L+1] long: visited nodes root first (column 0 is the root), -1 padded
    committed_token_ids: torch.Tensor  # [B, L+1] long: accepted draft tokens then the bonus token, -1 padded
    num_accepted: torch.Tensor  # [B] long: accepted draft tokens; committed = num_accepted + 1
    last_accepted_node: torch.Tensor  # [B] long: deepest accepted node (0 = root when nothing was accepted)
    target_token_ids: torch.Tensor  # [B, N] long: the target's token at every node slot (argmax or sample)
