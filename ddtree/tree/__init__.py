"""DDTree core: batched draft-tree build, flattening for the verifier, and lossless tree walks.

See docs/tree-core.md for the data layout, the ordering / tie rule and how the vLLM glue calls it.
"""

from .build import build_tree, draft_topk
from .flatten import (
    ancestor_mask,
    ancestor_mask_from_parents,
    child_table,
    flashinfer_custom_mask,
    flatten_tree,
    logits_rows,
    node_positions,
    pack_bits_rows,
)
from .sample import (
    SAMPLING_EPS,
    apply_top_k_top_p,
    greedy_tree_walk,
    sample_target_tokens,
    sample_tree_walk,
    tree_walk,
)
from .types import DraftTree, FlashInferMask, FlatTree, WalkResult

__all__ = [
    "DraftTree", "FlatTree", "FlashInferMask", "WalkResult",
    "build_tree", "draft_topk",
    "ancestor_mask", "ancestor_mask_from_parents", "child_table", "flashinfer_custom_mask", "flatten_tree", "logits_rows",
    "node_positions", "pack_bits_rows",
    "SAMPLING_EPS", "apply_top_k_top_p", "greedy_tree_walk", "sample_target_tokens",
    "sample_tree_walk", "tree_walk",
]
