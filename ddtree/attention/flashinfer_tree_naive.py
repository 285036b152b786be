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
