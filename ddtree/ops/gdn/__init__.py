"""Tree-aware Gated DeltaNet ops: tree conv1d update, tree recurrence, accepted-path commit.

See docs/tree-gdn.md for the contract. ``naive`` holds the fp32 per-path references.
"""

from .api import (HAS_TRITON, accepted_state_lines, check_tree, commit_conv_state,
                  commit_recurrent_state, copy_state_lines, make_conv_commit_plan,
                  tree_conv1d_update, tree_gated_delta_rule, use_triton)

__all__ = [
    "HAS_TRITON", "accepted_state_lines", "check_tree", "commit_conv_state",
    "commit_recurrent_state", "copy_state_lines", "make_conv_commit_plan", "tree_conv1d_update", "tree_gated_delta_rule", "use_triton",
]
