"""Attention of one request's tree-verify queries over a paged KV cache, with the ancestor mask.

Every node sees the whole committed prefix and, inside the verify block, its ancestors and itself.
This is the portable path (torch SDPA) used where the attention backend has no custom-mask support
(vLLM's CPU backend); the GPU path uses FlashInfer's packed custom mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_paged_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int,
                    layout: str = "HND") -> torch.Tensor:
    """Positions 0..length-1 of one request from a paged cache, as [kv_heads, length, head_dim].

    layout "HND": cache [num_blocks, kv_heads, block_size, head_dim] (vLLM CPU backend);
    layout "NHD": cache [num_blocks, block_size, kv_heads, head_dim].
    """
    block_size = cache.shape[2] if layout == "HND" else cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_table_row.long()[pos // block_size]
    offs = pos % block_size
    if layout == "HND":
        return cache[blocks, :, offs, :].transpose(0, 1)
    return cache[blocks, offs, :, :].transpose(0, 1)


def paged_tree_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         block_table_row: torch.Tensor, prefix_len: int, visible: torch.Tensor,
                         scale: float, layout: str = "HND", sliding_window: int | None = None
                         ) -> torch.Tensor:
    """query [q, H, D]; visible [q, q] bool (ancestor-or-self); the block's own K/V are already in the
    cache at positions prefix_len .. prefix_len + q - 1 (flattened node order). Returns [q, H, D]."""
    q_len, num_heads, head_dim = query.shape
    kv_len = prefix_len + q_len
    k = gather_paged_kv(key_cache, block_table_row, kv_len, layout)
    v = gather_paged_kv(value_cache, block_table_row, kv_len, layout)
    kv_heads = k.shape[0]
    if num_heads != kv_heads:
        rep = num_heads // kv_heads
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
    mask[:, prefix_len:] = visible
    if sliding_window is not None and sliding_window > 0:
        # A node at depth d sits at absolute position prefix_len + d; older keys leave the window.
        key_pos = _abs_key_positions(visible, prefix_len)
        q_pos = key_pos[prefix_len:]
        mask &= (q_pos[:, None] - key_pos[None, :]) < sliding_window
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1).float(), k.float(), v.float(), attn_mask=mask[None], scale=scale)
    return out.transpose(0, 1).to(query.dtype)


def _abs_key_positions(visible: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Absolute position of every key: prefix keys at their index, tree keys at prefix + depth."""
    depth = visible.sum(-1) - 1
    prefix = torch.arange(prefix_len, device=visible.device)
    return torch.cat([prefix, prefix_len + depth])


def paged_tree_attention_naive(query, key_cache, value_cache, block_table_row, prefix_len, visible,
                               scale, layout="HND"):
    """Reference: one softmax per (node, head) over the explicit list of keys it may see."""
    q_len, num_heads, head_dim = query.shape
    k = gather_paged_kv(key_cache, block_table_row, prefix_len + q_len, layout).float()
    v = gather_paged_kv(value_cache, block_table_row, prefix_len + q_len, layout).float()
    group = num_heads // k.shape[0]
    out = torch.empty(q_len, num_heads, head_dim)
    for i in range(q_len):
        keys = list(range(prefix_len)) + [prefix_len + j for j in range(q_len) if visible[i, j]]
        for h in range(num_heads):
            kh, vh = k[h // group, keys], v[h // group, keys]
            w = torch.softmax((kh @ query[i, h].float()) * scale, dim=0)
            out[i, h] = w @ vh
    return out.to(query.dtype)
