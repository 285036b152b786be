"""Reference for ``flashinfer_tree``: the FlashInfer inputs built request by request with plain
Python loops and ``numpy.packbits``, the packed mask unpacked again, and FlashInfer's documented
paged-prefill semantics (what its kernel computes from those inputs) in plain torch.

Tests compare the fast construction against ``naive_tree_plan`` and, through
``emulated_paged_prefill``, check that the inputs make FlashInfer compute the tree attention of
``ddtree.attention.tree_sdpa.tree_attention``. Slow on purpose; CPU only.
"""

from __future__ import annotations

import numpy as np
import torch

from ddtree.tree.flatten import ancestor_mask_from_parents


def naive_visibility(visible: torch.Tensor, depths: torch.Tensor, prefix_len: int, q_len: int,
                     window: int | None) -> np.ndarray:
    """[q_len, prefix_len + q_len] bool: node i sees prefix key j and node key prefix + n when
    n is an ancestor of i (or i) and, with a sliding window, the key's position is within
    ``window`` tokens of the node's (positions: prefix j at j, node n at prefix_len + depth_n)."""
    kv = prefix_len + q_len
    out = np.zeros((q_len, kv), dtype=bool)
    for i in range(q_len):
        q_pos = prefix_len + int(depths[i])
        for j in range(kv):
            if j < prefix_len:
                seen, k_pos = True, j
            else:
                n = j - prefix_len
                seen, k_pos = bool(visible[i, n]), prefix_len + int(depths[n])
            if window is not None and q_pos - k_pos >= window:
                seen = False
            out[i, j] = seen
    return out


def naive_tree_plan(block_table: torch.Tensor, block_size: int, req_rows, starts, prefix_lens,
                    q_lens, visible: torch.Tensor, depths: torch.Tensor,
                    window: int | None = None) -> dict:
    """Every FlashInfer input of ``plan_flashinfer_tree`` + ``packed_tree_mask``, one request at a
    time: qo/kv indptr, page indices, last page lengths, the batch rows of the queries, the cache
    slot of every block token, and the packed mask with its byte offsets."""
    table = block_table.cpu().long()
    qo, kvp, idx, last, rows, slots, packed, byte_indptr = [0], [0], [], [], [], [], [], [0]
    Q = visible.shape[1]
    for e in range(len(q_lens)):
        r, s, p, q = int(req_rows[e]), int(starts[e]), int(prefix_lens[e]), int(q_lens[e])
        kv = p + q
        pages = -(-kv // block_size)
        qo.append(qo[-1] + q)
        kvp.append(kvp[-1] + pages)
        idx += [int(table[r, k]) for k in range(pages)]
        last.append(kv - (pages - 1) * block_size)
        rows += list(range(s, s + q))
        slot_row = []
        for n in range(Q):
            pos = p + n if n < q else p  # past q_len: the root's slot
            slot_row.append(int(table[r, pos // block_size]) * block_size + pos % block_size)
        slots.append(slot_row)
        bits = naive_visibility(visible[e], depths[e], p, q, window).reshape(-1)
        seg = np.packbits(bits, bitorder="little")
        packed.append(seg)
        byte_indptr.append(byte_indptr[-1] + seg.shape[0])
    return {"qo_indptr": qo, "kv_indptr": kvp, "kv_indices": idx, "kv_last_page_len": last,
            "rows": rows, "block_slots": slots,
            "packed": np.concatenate(packed) if packed else np.zeros(0, np.uint8),
            "byte_indptr": byte_indptr}


def unpack_tree_mask(packed, byte_indptr, q_lens, kv_lens) -> list[np.ndarray]:
    """The per-request [q_len, kv_len] bool masks of a packed custom mask (little-endian bits)."""
    data = np.asarray(torch.as_tensor(packed).cpu(), dtype=np.uint8)
    out = []
    for e, (q, kv) in enumerate(zip(q_lens, kv_lens)):
        seg = data[int(byte_indptr[e]):int(byte_indptr[e + 1])]
        bits = np.unpackbits(seg, bitorder="little")[: q * kv]
        out.append(bits.reshape(q, kv).astype(bool))
    return out


def emulated_paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           kv_layout: str, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                           packed_mask: torch.Tensor, mask_byte_indptr, window_left: int,
                           scale: float) -> torch.Tensor:
    """What FlashInfer's batch paged prefill computes (custom-mask mode), in fp32 torch.

    k_cache / v_cache: [pages, page_size, kv_heads, D] (NHD) or [pages, kv_heads, page_size, D]
    (HND), any strides. Request b: queries qo_indptr[b] ..; keys = its pages in order, the last
    one filled to kv_last_page_len[b]; query i sees key j when bit i * kv_len + j of the mask
    (starting at byte mask_byte_indptr[b]) is set and, with window_left >= 0,
    j + q_len + window_left >= kv_len + i (FlashInfer's variants.cuh)."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    H = q.shape[1]
    page_size = k_cache.shape[1] if kv_layout == "NHD" else k_cache.shape[2]
    kvh = k_cache.shape[2] if kv_layout == "NHD" else k_cache.shape[1]
    data = torch.as_tensor(packed_mask).cpu()
    for b in range(len(qo_indptr) - 1):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        pages = [int(x) for x in kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])]]
        kv_len = (len(pages) - 1) * page_size + int(kv_last_page_len[b])
        ks, vs = [], []
        for j in range(kv_len):
            page, off = pages[j // page_size], j % page_size
            if kv_layout == "NHD":
                ks.append(k_cache[page, off]), vs.append(v_cache[page, off])
            else:
                ks.append(k_cache[page, :, off]), vs.append(v_cache[page, :, off])
        k = torch.stack(ks).float()  # [kv_len, kvh, D]
        v = torch.stack(vs).float()
        q_len = q1 - q0
        base = int(mask_byte_indptr[b])
        for i in range(q_len):
            keys = []
            for j in range(kv_len):
                off = i * kv_len + j
                bit = (int(data[base + off // 8]) >> (off % 8)) & 1
                if window_left >= 0 and not (j + q_len + window_left >= kv_len + i):
                    bit = 0
                if bit:
                    keys.append(j)
            for h in range(H):
                kh, vh = k[keys, h // (H // kvh)], v[keys, h // (H // kvh)]
                w = torch.softmax((kh @ q[q0 + i, h].float()) * scale, dim=0)
                out[q0 + i, h] = w @ vh
    return out


class EmulatedPagedPrefillWrapper:
    """FlashInfer 0.6.14's ``BatchPrefillWithPagedKVCacheWrapper`` as far as the tree path uses it,
    on CPU: ``plan`` keeps its inputs and, like 0.6.14 given ``packed_custom_mask``, sets the mask
    offsets in bits; ``run`` computes ``emulated_paged_prefill`` from them (which reads the offsets
    as bytes, as the kernel does). Stands in for the real wrapper in CPU tests and the GPU check's
    CPU form (``FlashInferTreeAttention(..., wrapper_factory=EmulatedPagedPrefillWrapper)``)."""

    def __init__(self, workspace, kv_layout: str):
        if kv_layout not in ("NHD", "HND"):
            raise ValueError(f"kv_layout: expected NHD or HND, got {kv_layout!r}")
        self._kv_layout = kv_layout
        self.plans = 0

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads, num_kv_heads, head_dim_qk, page_size, *, packed_custom_mask, causal,
             sm_scale, window_left, q_data_type, kv_data_type, disable_split_kv=False):
        assert qo_indptr.device.type == "cpu" and paged_kv_indptr.device.type == "cpu"
        assert not causal and packed_custom_mask.dtype == torch.uint8
        self.args = dict(qo=qo_indptr, kvp=paged_kv_indptr, idx=paged_kv_indices,
                         last=paged_kv_last_page_len, H=num_qo_heads, kvh=num_kv_heads,
                         D=head_dim_qk, page=page_size, scale=sm_scale, wl=window_left,
                         dtype=q_data_type)
        q_len = qo_indptr[1:] - qo_indptr[:-1]
        kv_len = (paged_kv_indptr[1:] - paged_kv_indptr[:-1] - 1) * page_size + paged_kv_last_page_len
        self._mask_indptr_buf = torch.cat([torch.zeros(1, dtype=torch.int32),
                                           torch.cumsum(q_len * kv_len, 0).int()])
        self._custom_mask_buf = packed_custom_mask
        self.disable_split_kv = disable_split_kv
        self.plans += 1

    def run(self, q, paged_kv_cache, out=None):
        a = self.args
        k, v = paged_kv_cache
        assert q.dtype == a["dtype"] == k.dtype and q.shape[0] == int(a["qo"][-1])
        assert q.shape[1] == a["H"] and q.shape[2] == a["D"] == k.shape[-1]
        heads_dim, page_dim = (2, 1) if self._kv_layout == "NHD" else (1, 2)
        assert k.shape[heads_dim] == a["kvh"] and k.shape[page_dim] == a["page"]
        res = emulated_paged_prefill(q, k, v, self._kv_layout, a["qo"], a["kvp"], a["idx"],
                                     a["last"], self._custom_mask_buf, self._mask_indptr_buf,
                                     a["wl"], a["scale"]).to(q.dtype)
        if out is not None:
            assert out.shape == q.shape and out.is_contiguous()
            out.copy_(res)
            return out
        return res


def random_tree(n: int, g: torch.Generator, chain_bias: float = 0.5):
    """(visible [n, n] bool, depths [n]) of a random tree with parents before children; with
    probability chain_bias a node continues the previous one (deep paths)."""
    parents = [-1]
    for i in range(1, n):
        if float(torch.rand(1, generator=g)) < chain_bias:
            parents.append(i - 1)
        else:
            parents.append(int(torch.randint(0, i, (1,), generator=g)))
    vis = ancestor_mask_from_parents(torch.tensor([parents]), max_depth=n)[0]
    return vis, vis.sum(1) - 1  # a node's depth = its number of ancestors


def random_tree_step(seed: int, prefixes, q_lens, block_size: int, contiguous: bool = True,
                     kv_heads: int = 2, heads: int = 4, head_dim: int = 16, order: str = "NHD",
                     dtype=torch.bfloat16, pad_nodes: int = 0, device="cpu") -> dict:
    """A verify step's tree-attention inputs: E tree requests among other batch rows (a shuffled
    block table with spare rows and blocks), random trees (the last ``pad_nodes`` of each block
    are padding nodes: only themselves, depth 0, as the glue has them), a cache in vLLM's logical
    layout [blocks, kv_heads, block_size, 2 * head_dim] over NHD or HND memory, and the query of
    the whole flattened batch. Keys: table rows starts prefixes qlens vis depths cache query bs D."""
    g = torch.Generator().manual_seed(seed)
    E, Q = len(prefixes), max(q_lens)
    max_blocks = max(-(-(p + q) // block_size) for p, q in zip(prefixes, q_lens)) + 2
    R = E + 2
    nblocks = R * max_blocks + 3
    perm = torch.randperm(nblocks, generator=g)
    table = perm[: R * max_blocks].view(R, max_blocks).int().contiguous()
    rows = torch.randperm(R, generator=g)[:E]
    vis = torch.zeros(E, Q, Q, dtype=torch.bool)
    depths = torch.zeros(E, Q, dtype=torch.long)
    for e, q in enumerate(q_lens):
        real = max(1, q - pad_nodes)
        v, d = random_tree(real, g)
        vis[e, :real, :real], depths[e, :real] = v, d
        for i in range(real, q):
            vis[e, i, i] = True
    starts, pos = [], 2
    for q in q_lens:
        starts.append(pos)
        pos += q + (0 if contiguous else 3)
    T = pos + 2
    # values drawn where they live (a CPU draw of a GPU-sized cache takes seconds)
    gd = g if torch.device(device).type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    shape = ((nblocks, block_size, kv_heads, 2 * head_dim) if order == "NHD"
             else (nblocks, kv_heads, block_size, 2 * head_dim))
    cache = torch.randn(shape, generator=gd, device=device).to(dtype)
    if order == "NHD":
        cache = cache.transpose(1, 2)
    query = torch.randn(T, heads, head_dim, generator=gd, device=device).to(dtype)
    return dict(table=table.to(device), rows=rows, starts=torch.tensor(starts),
                prefixes=torch.tensor(prefixes), qlens=torch.tensor(q_lens), vis=vis, depths=depths,
                cache=cache, query=query, bs=block_size, D=head_dim)


def plan_args(step: dict) -> tuple:
    """The positional inputs of ``plan_flashinfer_tree`` / ``plan_tree_attention`` of a step."""
    return (step["table"], step["bs"], step["rows"], step["starts"], step["prefixes"],
            step["qlens"], step["vis"], step["depths"])


def reference_rows(step: dict, window: int | None, scale: float) -> dict:
    """Request e -> (first batch row, tree_sdpa.tree_attention of its rows in fp32), read from the
    cache (inputs upcast, so the reference carries no bf16 output rounding)."""
    from .tree_sdpa import tree_attention

    out = {}
    table, bs, D = step["table"], step["bs"], step["D"]
    view = step["cache"].transpose(1, 2)  # [blocks, bs, kvh, 2D]
    for e, (p, q) in enumerate(zip(step["prefixes"].tolist(), step["qlens"].tolist())):
        pos = torch.arange(p + q, device=table.device)
        slots = table[int(step["rows"][e])].long()[pos // bs] * bs + pos % bs
        kv = view[slots // bs, slots % bs]  # [n, kvh, 2D]
        k, v = kv[..., :D].transpose(0, 1).float(), kv[..., D:].transpose(0, 1).float()
        s = int(step["starts"][e])
        vis = step["vis"][e, :q, :q].to(table.device)
        out[e] = (s, tree_attention(step["query"][s:s + q].float(), k, v, p, vis, scale, window))
    return out
