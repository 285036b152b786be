"""Tree-masked attention over a paged KV cache (portable torch path for CPU and mask-less backends)."""

from .tree_sdpa import paged_tree_attention

__all__ = ["paged_tree_attention"]
