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

from ddtree.transfer import to_device


@dataclasses.dataclass
class TreeAttentionPlan:
    slots: torch.Tensor  # [E, L] long: cache slot of key j of request e (0 where j is unused)
    key_pos: torch.Tensor  # [E, L] long: absolute position of each key (prefix j; node prefix+depth)
    key_valid: torch.Tensor  # [E, Q, L] bool: query i may see key j (prefix + ancestors + itself)
    query_rows: torch.Tensor  # [E, Q] long: row of query i of request e in the flattened batch
    query_valid: torch.Tensor  # [E, Q] bool: real query rows (q_len of each request)
    query_pos: torch.Tensor  # [E, Q] long: absolute position of each query
    # Host copies and precomputed indices, so that no layer needs a device->host sync:
    kv_lens_host: list[int] | None = None  # [E] prefix + q_len of each request
    q_lens_host: list[int] | None = None  # [E]
    write_rows: torch.Tensor | None = None  # [sum q_len] long: output row of each real query
    write_src: torch.Tensor | None = None  # [sum q_len] long: its row in the flattened [E * Q] result
    # additive SDPA masks per (sliding window, dtype), built by the first layer that needs one
    _masks: dict = dataclasses.field(default_factory=dict, repr=False)
    _groups: dict = dataclasses.field(default_factory=dict, repr=False)  # (a, b) -> sub-plan

    @property
    def num_requests(self) -> int:
        return self.slots.shape[0]

    def rows(self, a: int, b: int) -> "TreeAttentionPlan":
        """The plan of requests a..b-1 (keys trimmed to their longest sequence)."""
        if self.kv_lens_host is not None and self.q_lens_host is not None:
            L = max(self.kv_lens_host[a:b]) if b > a else 1
            first = sum(self.q_lens_host[:a])
            count = sum(self.q_lens_host[a:b])
            Q = self.query_rows.shape[1]
            write_rows = self.write_rows[first:first + count]
            write_src = self.write_src[first:first + count] - a * Q
            return TreeAttentionPlan(self.slots[a:b, :L], self.key_pos[a:b, :L],
                                     self.key_valid[a:b, :, :L], self.query_rows[a:b],
                                     self.query_valid[a:b], self.query_pos[a:b],
                                     self.kv_lens_host[a:b], self.q_lens_host[a:b], write_rows,
                                     write_src)
        L = int(self.key_valid[a:b].any(dim=1).any(dim=0).nonzero().max()) + 1 if b > a else 1
        return TreeAttentionPlan(self.slots[a:b, :L], self.key_pos[a:b, :L],
                                 self.key_valid[a:b, :, :L], self.query_rows[a:b],
                                 self.query_valid[a:b], self.query_pos[a:b])

    def sdpa_mask(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[E, 1, Q, L] additive mask (0 visible, -inf hidden) in ``dtype``, built once per window
        and dtype and shared by the layers. Boolean masks are converted to exactly this by SDPA on
        every call; the storage's last dim is padded to a multiple of 8 elements so that the
        memory-efficient kernel takes it without copying it into an aligned buffer."""
        key = (sliding_window, dtype)
        mask = self._masks.get(key)
        if mask is None:
            visible = self.key_valid
            if sliding_window is not None and sliding_window > 0:
                near = (self.query_pos[:, :, None] - self.key_pos[:, None, :]) < sliding_window
                visible = visible & (near | ~self.query_valid[:, :, None])
            E, Q, L = visible.shape
            storage = torch.zeros((E, 1, Q, (L + 7) // 8 * 8), dtype=dtype, device=visible.device)
            mask = storage[..., :L]
            mask.masked_fill_(~visible[:, None], float("-inf"))
            self._masks[key] = mask
        return mask


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
        if a == 0 and group >= E:
            sub = plan
        else:  # sub-plans (and their masks) are built by the first layer and reused by the others
            b = min(E, a + group)
            sub = plan._groups.get((a, b))
            if sub is None:
                sub = plan._groups[(a, b)] = plan.rows(a, b)
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
    # The host needs the lengths (key count, rows to write back): take them from the inputs, which
    # the runner keeps on the CPU (then this costs no device sync; device inputs cost one copy).
    lens_host = torch.stack([starts.long(), prefix_lens.long(), q_lens.long()]).cpu()
    starts_h, prefix_h, qlen_h = lens_host
    if E and int(qlen_h.max()) > Q:
        raise ValueError(f"q_lens: a block of {int(qlen_h.max())} tokens exceeds Q={Q}")
    kv_len_h = prefix_h + qlen_h
    L = int(kv_len_h.max()) if E else 1
    # real query i of request e: output row starts[e] + i <- result row e * Q + i
    req_of = torch.repeat_interleave(torch.arange(E), qlen_h)
    first = torch.cumsum(qlen_h, 0) - qlen_h
    i_of = torch.arange(req_of.numel()) - first[req_of]
    index_h = torch.stack([starts_h[req_of] + i_of, req_of * Q + i_of])
    # one host->device copy for all the per-request vectors
    packed = to_device(torch.cat([torch.stack([req_rows.cpu().long(), starts_h, prefix_h, qlen_h]).flatten(),
                        index_h.flatten()]), dev)
    req_rows, starts, prefix, qlen = packed[: 4 * E].view(4, E)
    write_rows, write_src = packed[4 * E:].view(2, -1)
    visible, depths = to_device(visible, dev), to_device(depths, dev).long()
    kv_len = prefix + qlen
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
                             query_rows=query_rows, query_valid=query_valid, query_pos=node_pos,
                             kv_lens_host=kv_len_h.tolist(), q_lens_host=qlen_h.tolist(),
                             write_rows=write_rows, write_src=write_src)


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
    dt = compute_dtype or query.dtype
    mask = plan.sdpa_mask(sliding_window, dt)
    q = query[plan.query_rows.flatten()].view(E, Q, H, D).transpose(1, 2).to(dt)
    kk, vv = k.transpose(1, 2).to(dt), v.transpose(1, 2).to(dt)
    if Hkv != H:
        kk = kk.repeat_interleave(H // Hkv, dim=1)
        vv = vv.repeat_interleave(H // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).to(query.dtype)


def write_tree_rows(output: torch.Tensor, out: torch.Tensor, plan: TreeAttentionPlan) -> None:
    """output [T, H, D] <- the real rows of out [E, Q, H, D]."""
    if plan.write_rows is None:  # a plan built without host lengths (boolean indexing syncs)
        output[plan.query_rows[plan.query_valid]] = out[plan.query_valid]
        return
    output[plan.write_rows] = out.reshape(-1, *out.shape[2:])[plan.write_src]


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
