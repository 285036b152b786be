"""Tree-verify attention for a whole batch of trees in one SDPA call (portable path, any device).

The attention backend first runs the verify block as if it were causal (which also writes every
node's K/V into its own cache slot); this path then recomputes the rows of the tree requests with
the right mask: each node sees the committed prefix and its ancestors (and itself), nothing else.

One plan per step (``plan_tree_attention``) holds the index math shared by every attention layer:
which cache slots each request's keys live in, the absolute position of every key and query, and
the ancestor mask padded to the batch. Per layer the caller gathers K/V of ``plan.slots`` from its
cache layout and calls ``tree_attention_batched``. ``tree_sdpa.tree_attention`` (one request at a
time) is the reference it is tested against.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class TreeAttentionPlan:
    slots: torch.Tensor  # [E, L] long: cache slot of key j of request e (0 where j is unused)
    key_pos: torch.Tensor  # [E, L] long: absolute position of each key (prefix j; node prefix+depth)
    key_valid: torch.Tensor  # [E, Q, L] bool: query i may see key j (prefix + ancestors + itself)
    query_rows: torch.Tensor  # [E, Q] long: row of query i of request e in the flattened batch
    query_valid: torch.Tensor  # [E, Q] bool: real query rows (q_len of each request)
    query_pos: torch.Tensor  # [E, Q] long: absolute position of each query

    @property
    def num_requests(self) -> int:
        return self.slots.shape[0]

    def rows(self, a: int, b: int) -> "TreeAttentionPlan":
        """The plan of requests a..b-1 (keys trimmed to their longest sequence)."""
        L = int(self.key_valid[a:b].any(dim=1).any(dim=0).nonzero().max()) + 1 if b > a else 1
        return TreeAttentionPlan(self.slots[a:b, :L], self.key_pos[a:b, :L],
                                 self.key_valid[a:b, :, :L], self.query_rows[a:b],
                                 self.query_valid[a:b], self.query_pos[a:b])


def paged_tree_attention_chunked(query: torch.Tensor, output: torch.Tensor, read_kv, plan:
                                 TreeAttentionPlan, scale: float, sliding_window: int | None = None,
                                 compute_dtype: torch.dtype | None = None,
                                 max_kv_elements: int = 1 << 26) -> None:
    """``tree_attention_batched`` + ``write_tree_rows`` over groups of requests, so that the gathered
    K/V (expanded to the query heads) stay under ``max_kv_elements`` elements per group.

    read_kv(slots [e, L]) -> (k, v) [e, L, H_kv, D] reads the cache in its own layout.
    """
    E = plan.num_requests
    H, D = query.shape[1], query.shape[2]
    per_request = max(1, plan.slots.shape[1] * H * D * 2)
    group = max(1, max_kv_elements // per_request)
    for a in range(0, E, group):
        sub = plan if (a == 0 and group >= E) else plan.rows(a, min(E, a + group))
        k, v = read_kv(sub.slots)
        out = tree_attention_batched(query, k, v, sub, scale, sliding_window, compute_dtype)
        write_tree_rows(output, out, sub)


def plan_tree_attention(block_table: torch.Tensor, block_size: int, req_rows: torch.Tensor,
                        starts: torch.Tensor, prefix_lens: torch.Tensor, q_lens: torch.Tensor,
                        visible: torch.Tensor, depths: torch.Tensor) -> TreeAttentionPlan:
    """Index math for E tree requests (one-time per step; shared by all layers of a KV group).

    block_table [R, max_blocks] (device of the cache); req_rows [E]: each request's row in it;
    starts [E]: first token of its verify block in the flattened batch; prefix_lens [E]: committed
    tokens before the root; q_lens [E]: tokens in its block (root + nodes, padding nodes included);
    visible [E, Q, Q] bool ancestor-or-self masks (Q >= max q_len); depths [E, Q] node depths.
    The block's K/V sit at positions prefix .. prefix + q_len - 1 of the request (flattened order).
    """
    dev = block_table.device
    E = int(req_rows.shape[0])
    Q = int(visible.shape[1])
    if visible.shape != (E, Q, Q) or depths.shape != (E, Q):
        raise ValueError(f"visible must be [E, Q, Q] and depths [E, Q]; got {tuple(visible.shape)}, "
                         f"{tuple(depths.shape)} for E={E}")
    if E and int(q_lens.max()) > Q:
        raise ValueError(f"q_lens: a block of {int(q_lens.max())} tokens exceeds Q={Q}")
    req_rows, starts = req_rows.to(dev).long(), starts.to(dev).long()
    prefix, qlen = prefix_lens.to(dev).long(), q_lens.to(dev).long()
    visible, depths = visible.to(dev), depths.to(dev).long()
    kv_len = prefix + qlen
    L = int(kv_len.max()) if E else 1
    j = torch.arange(L, device=dev)[None, :]  # key index
    used = j < kv_len[:, None]
    blocks = block_table.long()[req_rows[:, None], (j // block_size).clamp(max=block_table.shape[1] - 1)]
    slots = torch.where(used, blocks * block_size + j % block_size, torch.zeros_like(blocks))

    i = torch.arange(Q, device=dev)[None, :]  # query index
    query_valid = i < qlen[:, None]
    in_block = j - prefix[:, None]  # [E, L] node index of a key inside the block (<0: prefix)
    node_pos = prefix[:, None] + depths  # [E, Q]
    key_pos = torch.where(in_block >= 0, node_pos.gather(1, in_block.clamp(0, Q - 1)), j)
    # query i sees key j: j in the prefix, or j is the block's node n and visible[i, n]
    tree_vis = visible.gather(2, in_block.clamp(0, Q - 1)[:, None, :].expand(E, Q, L))
    key_valid = (in_block < 0)[:, None, :] | (tree_vis & (in_block >= 0)[:, None, :])
    key_valid &= used[:, None, :] & query_valid[:, :, None]
    # padding query rows see their own first key so the softmax stays finite (never written back)
    key_valid[:, :, 0] |= ~query_valid
    query_rows = torch.where(query_valid, starts[:, None] + i, starts[:, None])
    return TreeAttentionPlan(slots=slots, key_pos=key_pos, key_valid=key_valid,
                             query_rows=query_rows, query_valid=query_valid, query_pos=node_pos)


def tree_attention_batched(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           plan: TreeAttentionPlan, scale: float, sliding_window: int | None = None,
                           compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """query [T, H, D] (the whole flattened batch); k, v [E, L, H_kv, D] gathered at plan.slots.

    Returns [E, Q, H, D] in query's dtype (rows past each request's q_len are junk). A sliding window
    w keeps keys with query_pos - key_pos < w, as vLLM's causal sliding window does.
    """
    E, Q = plan.query_rows.shape
    H, D = query.shape[1], query.shape[2]
    Hkv = k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    mask = plan.key_valid
    if sliding_window is not None and sliding_window > 0:
        near = (plan.query_pos[:, :, None] - plan.key_pos[:, None, :]) < sliding_window
        mask = mask & (near | ~plan.query_valid[:, :, None])
    dt = compute_dtype or query.dtype
    q = query[plan.query_rows.flatten()].view(E, Q, H, D).transpose(1, 2).to(dt)
    kk, vv = k.transpose(1, 2).to(dt), v.transpose(1, 2).to(dt)
    if Hkv != H:
        kk = kk.repeat_interleave(H // Hkv, dim=1)
        vv = vv.repeat_interleave(H // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2).to(query.dtype)


def write_tree_rows(output: torch.Tensor, out: torch.Tensor, plan: TreeAttentionPlan) -> None:
    """output [T, H, D] <- the real rows of out [E, Q, H, D]."""
    output[plan.query_rows[plan.query_valid]] = out[plan.query_valid]


def paged_kv_rows(kv_cache: torch.Tensor, head_size: int, slots: torch.Tensor):
    """K and V of the given slots from vLLM 0.26's GPU paged layout, as [*slots.shape, H_kv, D].

    FLASH_ATTN, TRITON_ATTN and FLASHINFER (bf16/fp16 caches) share the logical shape
    [num_blocks, kv_heads, block_size, 2 * head_size] (K in the first half of the last dim), with
    NHD or HND memory order behind it; indexing the logical view works for both.
    """
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(f"kv_cache: expected [blocks, kv_heads, block_size, {2 * head_size}], got "
                         f"{tuple(kv_cache.shape)} (this cache layout has no tree-attention reader)")
    block_size = kv_cache.shape[2]
    flat = slots.reshape(-1)
    rows = kv_cache.transpose(1, 2)[flat // block_size, flat % block_size]  # [n, H_kv, 2D]
    rows = rows.view(*slots.shape, kv_cache.shape[1], 2 * head_size)
    return rows[..., :head_size], rows[..., head_size:]


def move_paged_kv_rows(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the K/V rows of slots src to slots dst (all read before any is written), GPU layout."""
    if src.numel() == 0:
        return
    block_size = kv_cache.shape[2]
    view = kv_cache.transpose(1, 2)
    rows = view[src // block_size, src % block_size]
    view[dst // block_size, dst % block_size] = rows
