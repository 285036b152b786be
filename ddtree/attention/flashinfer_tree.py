"""Tree-verify attention through FlashInfer's paged prefill kernel with a packed custom mask (CUDA).

The fast path beside the portable one (``ddtree.attention.batched``): the attention backend has
already run the verify blocks causally (writing every node's K/V into its own cache slot); this path
recomputes the tree requests' rows with ``flashinfer.BatchPrefillWithPagedKVCacheWrapper``, reading
K/V straight from vLLM's paged cache (no gather) under a bit-packed mask: each node sees the
committed prefix (inside the layer's sliding window, if any) and its ancestors and itself.

Style follows FlashInfer: ``FlashInferTreeAttention`` (one per process and device: the workspace
and the planned kernel wrappers are allocated once) -> ``plan(...)`` once per verify step and
KV-cache group (index arrays, built from host lengths; the mask per sliding window on first use) ->
``FlashInferTreePlan.run(query, kv_cache, output, scale, window)`` per layer.

Semantics that differ from FlashInfer's own and how they are handled:

* FlashInfer's sliding window counts positions in flattened order (query i of a request sits at
  ``kv_len - q_len + i``); a tree node sits at ``prefix + depth``. The exact window is therefore
  encoded in the custom mask, and FlashInfer's ``window_left`` is only widened to a superset
  (``window - 1 + max_q_len - 1``) so that the kernel still skips KV tiles left of every window.
* FlashInfer 0.6.14's ``plan(packed_custom_mask=...)`` computes ``mask_indptr`` in bits while its
  kernel reads it as a byte offset (flashinfer-ai/flashinfer PR #2201): the wrapper's mask indptr is
  replaced by the byte offsets after every ``plan`` (correct whichever way upstream settles it).

torch and flashinfer are imported lazily; everything except ``FlashInferTreeAttention.run`` works
on CPU tensors (tests). ``flashinfer_tree_naive`` holds the per-request reference construction.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from typing import Any, Callable

MODE_ENV = "DDTREE_TREE_ATTENTION"
MODES = ("portable", "flashinfer")
DEFAULT_MODE = "flashinfer"  # scripts/gpu_flashinfer_tree_check.py passed on an H100 (2026-11-23)


def tree_attention_mode(environ=None) -> str:
    """The requested CUDA tree-attention path: ``DDTREE_TREE_ATTENTION`` = portable | flashinfer."""
    env = os.environ if environ is None else environ
    value = env.get(MODE_ENV, "").strip().lower() or DEFAULT_MODE
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={env.get(MODE_ENV)!r}: expected one of {', '.join(MODES)}")
    return value


def flashinfer_available() -> str | None:
    """None when flashinfer imports, else the reason it does not."""
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising at import
        return f"{type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------- cache layout


def paged_kv_views(kv_cache, head_size: int):
    """(kv_layout, k_cache, v_cache) views of vLLM 0.26's GPU paged cache for FlashInfer.

    FLASH_ATTN, TRITON_ATTN and FLASHINFER (bf16/fp16 caches) share the logical shape
    [num_blocks, kv_heads, block_size, 2 * head_size] (K in the first half of the last dim) with
    NHD or HND memory behind it (``get_kv_cache_stride_order``). The memory order is read from the
    strides, so one function serves all three backends and both layouts: NHD memory gives
    [blocks, block_size, kv_heads, head_size] views, HND memory [blocks, kv_heads, block_size,
    head_size]; both are strided views (no copy), which FlashInfer's paged kernel reads by stride.
    """
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(f"kv_cache: expected [blocks, kv_heads, block_size, {2 * head_size}], got "
                         f"{tuple(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache: the head dim must be contiguous, strides {kv_cache.stride()}")
    nb, kvh, bs, two_d = kv_cache.shape
    s_blk, s_head, s_tok, _ = kv_cache.stride()
    # size-1 dims may carry any stride; give them the canonical one so that the layout test and
    # the kernel's stride arithmetic see a well-formed tensor (vLLM does the same before FlashInfer)
    if kvh == 1:
        s_head = s_tok * bs if s_tok >= two_d else two_d
    if bs == 1:
        s_tok = s_head * kvh if s_head >= two_d else two_d
    nhd = s_tok > s_head if kvh > 1 and bs > 1 else s_tok >= s_head
    if nhd:
        view = kv_cache.as_strided((nb, bs, kvh, two_d), (s_blk, s_tok, s_head, 1))
        layout = "NHD"
    else:
        view = kv_cache.as_strided((nb, kvh, bs, two_d), (s_blk, s_head, s_tok, 1))
        layout = "HND"
    return layout, view[..., :head_size], view[..., head_size:]


# ----------------------------------------------------------------------------- plan arrays


def flashinfer_window_left(window: int | None, max_q_len: int) -> int:
    """FlashInfer's ``window_left`` for a layer with a sliding window of ``window`` tokens.

    Ours: node i (position prefix + depth_i) sees keys with position > prefix + depth_i - window.
    FlashInfer keeps kv index >= prefix + i - window_left (i = flattened index >= depth_i, kv index
    = position for prefix keys, prefix + n for node n). window_left = window - 1 + max_q_len - 1
    keeps a superset for every node and key; the custom mask makes the exact cut."""
    if window is None:
        return -1
    if window < 1:
        raise ValueError(f"window: expected >= 1 tokens or None, got {window}")
    return window - 1 + max(max_q_len - 1, 0)


def _host_long(x, name: str):
    import torch

    t = torch.as_tensor(x)
    if t.is_floating_point() or t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    return t.detach().to("cpu", torch.int64)


@dataclasses.dataclass
class TreeMask:
    """Packed custom mask of one step and sliding window (FlashInfer's layout)."""

    packed: Any  # [total_bytes] uint8 on the device: per request row-major [q_len, kv_len] bits,
    #              little-endian within a byte, each request's segment padded to whole bytes
    byte_indptr: Any  # [E + 1] int32 on the device: byte offset of each request's segment
    byte_indptr_host: list[int]
    window_left: int  # FlashInfer window_left to plan with (-1: none)


@dataclasses.dataclass
class FlashInferTreePlan:
    """One verify step's FlashInfer inputs for the tree requests of one KV-cache group.

    Host tensors (int32, CPU) feed ``wrapper.plan`` without a device sync; device tensors are built
    with one host->device copy."""

    block_size: int
    prefix_lens: list[int]
    q_lens: list[int]
    kv_lens: list[int]  # prefix + q_len
    qo_indptr: Any  # [E + 1] int32 CPU
    kv_indptr: Any  # [E + 1] int32 CPU (pages)
    kv_last_page_len: Any  # [E] int32 CPU, in 1..block_size
    kv_indices: Any  # [kv_indptr[-1]] int32 device: the pages of every request, in order
    block_slots: Any  # [E, Q] long device: cache slot of block token n (n >= q_len: the root's)
    row_range: tuple[int, int] | None  # the tree rows are this contiguous range of the batch
    rows: Any  # [sum q_len] long device: their batch rows (None when row_range is set)
    visible: Any  # [E, Q, Q] bool CPU ancestor-or-self masks
    depths: Any  # [E, Q] long CPU
    device: Any
    owner: "FlashInferTreeAttention | None" = None
    group_key: Any = None  # which pool of planned wrappers this plan uses (stable across steps)
    serial: int = 0
    _masks: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def num_requests(self) -> int:
        return len(self.q_lens)

    @property
    def num_rows(self) -> int:
        return sum(self.q_lens)

    def mask(self, window: int | None) -> TreeMask:
        """The packed mask for a sliding window (None: full attention), built once per step."""
        m = self._masks.get(window)
        if m is None:
            m = self._masks[window] = packed_tree_mask(self.visible, self.depths, self.prefix_lens,
                                                      self.q_lens, window, self.device)
        return m

    def run(self, query, kv_cache, output, scale: float, window: int | None = None) -> None:
        """Overwrite the tree rows of ``output`` [T, H, D] with the tree-masked attention of
        ``query`` [T, H, D] over ``kv_cache`` (vLLM's [blocks, kv_heads, block_size, 2 * D])."""
        if self.owner is None:
            raise RuntimeError("this plan was built without a FlashInferTreeAttention to run it")
        self.owner.run(self, query, kv_cache, output, scale, window)


def plan_flashinfer_tree(block_table, block_size: int, req_rows, starts, prefix_lens, q_lens,
                         visible, depths) -> FlashInferTreePlan:
    """FlashInfer's paged-KV index arrays for E tree requests (the inputs ``plan_tree_attention``
    takes): block_table [R, max_blocks] on the cache's device; req_rows / starts / prefix_lens /
    q_lens [E] (host tensors: no sync); visible [E, Q, Q] bool; depths [E, Q].

    Request e's keys are its positions 0 .. prefix + q_len - 1 (the block's nodes were written at
    prefix .. prefix + q_len - 1 in flattened order), i.e. its first ceil(kv_len / block_size)
    pages of the block table."""
    import numpy as np
    import torch

    from ddtree.transfer import to_device

    if block_size < 1:
        raise ValueError(f"block_size: expected >= 1, got {block_size}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table: expected [rows, max_blocks], got {tuple(block_table.shape)}")
    rows_h = _host_long(req_rows, "req_rows")
    starts_h = _host_long(starts, "starts")
    prefix_h = _host_long(prefix_lens, "prefix_lens")
    qlen_h = _host_long(q_lens, "q_lens")
    E = rows_h.shape[0]
    visible = visible.detach().to("cpu", torch.bool)
    depths = depths.detach().to("cpu", torch.int64)
    Q = visible.shape[1] if visible.dim() == 3 else -1
    if visible.shape != (E, Q, Q) or depths.shape != (E, Q):
        raise ValueError(f"visible must be [E, Q, Q] and depths [E, Q]; got {tuple(visible.shape)}, "
                         f"{tuple(depths.shape)} for E={E}")
    for name, t in (("starts", starts_h), ("prefix_lens", prefix_h), ("q_lens", qlen_h)):
        if t.shape[0] != E:
            raise ValueError(f"{name}: expected {E} values, got {t.shape[0]}")
    if E and (int(qlen_h.min()) < 1 or int(qlen_h.max()) > Q):
        raise ValueError(f"q_lens: values must be in 1..Q={Q}, got {qlen_h.tolist()}")
    if E and (int(prefix_h.min()) < 0 or int(starts_h.min()) < 0):
        raise ValueError("prefix_lens and starts must be >= 0")
    if E and (int(rows_h.min()) < 0 or int(rows_h.max()) >= block_table.shape[0]):
        raise ValueError(f"req_rows: values must index the {block_table.shape[0]} block-table rows")
    kv_h = prefix_h + qlen_h
    pages_h = (kv_h + block_size - 1) // block_size
    if E and int(pages_h.max()) > block_table.shape[1]:
        raise ValueError(f"block_table: {block_table.shape[1]} blocks per row, a request needs "
                         f"{int(pages_h.max())} (block_size {block_size})")
    zero = torch.zeros(1, dtype=torch.int64)
    qo_indptr = torch.cat([zero, torch.cumsum(qlen_h, 0)]).to(torch.int32)
    kv_indptr = torch.cat([zero, torch.cumsum(pages_h, 0)]).to(torch.int32)
    last_page = (kv_h - (pages_h - 1) * block_size).to(torch.int32)

    # page p of request e is block_table[row_e, p]; block token n sits at position prefix_e + n
    pages_np, rows_np = pages_h.numpy(), rows_h.numpy()
    page_row = np.repeat(rows_np, pages_np)
    page_col = np.arange(page_row.shape[0]) - np.repeat(kv_indptr[:-1].numpy(), pages_np)
    n = np.arange(Q)[None, :]
    tok_pos = prefix_h.numpy()[:, None] + np.minimum(n, qlen_h.numpy()[:, None] - 1)
    tok_pos = np.where(n < qlen_h.numpy()[:, None], tok_pos, prefix_h.numpy()[:, None])
    slot_row = np.repeat(rows_np[:, None], Q, 1)
    # the batch rows of the tree queries: one contiguous range in the common case (all decode
    # requests verify trees and come first), else an index
    st = starts_h.numpy()
    ql = qlen_h.numpy()
    contiguous = E > 0 and bool(np.all(st[1:] == st[:-1] + ql[:-1]))
    row_range = (int(st[0]), int(st[-1] + ql[-1])) if contiguous else None
    q_rows = (np.repeat(st, ql) + np.arange(int(ql.sum())) - np.repeat(np.cumsum(ql) - ql, ql)
              if E and not contiguous else np.zeros(0, dtype=np.int64))
    dev = block_table.device
    host = torch.from_numpy(np.concatenate([
        page_row, page_col, slot_row.reshape(-1), tok_pos.reshape(-1), q_rows]).astype(np.int64))
    packed = to_device(host, dev)
    P, EQ = page_row.shape[0], E * Q
    pr, pc, sr, tp, qr = torch.split(packed, [P, P, EQ, EQ, q_rows.shape[0]])
    kv_indices = block_table[pr, pc].to(torch.int32)
    block_slots = (block_table[sr, tp // block_size].long() * block_size + tp % block_size).view(E, Q)
    return FlashInferTreePlan(
        block_size=block_size, prefix_lens=prefix_h.tolist(), q_lens=qlen_h.tolist(),
        kv_lens=kv_h.tolist(), qo_indptr=qo_indptr, kv_indptr=kv_indptr,
        kv_last_page_len=last_page, kv_indices=kv_indices, block_slots=block_slots,
        row_range=row_range, rows=None if contiguous else qr, visible=visible, depths=depths,
        device=dev)


def packed_tree_mask(visible, depths, prefix_lens: list[int], q_lens: list[int],
                     window: int | None, device) -> TreeMask:
    """FlashInfer's packed custom mask for E tree requests, built on ``device`` from host lengths.

    Request e's segment is the row-major [q_len, kv_len] visibility (kv = prefix + q_len; bit
    ``i * kv_len + j`` of the segment, little-endian within each byte, segment padded to whole
    bytes): key j < prefix is visible to node i when it is inside the window (position j >
    prefix + depth_i - window), node key prefix + n when n is an ancestor of i (or i itself) and
    depth_i - depth_n < window. Rows are runs of ones over the prefix plus a few tree bits, so the
    bits are made as one prefix sum over run boundaries plus one scatter of the tree bits
    (O(total bits) bytes of temporary memory, no per-bit index arithmetic)."""
    import torch

    from ddtree.transfer import to_device

    E = len(q_lens)
    Q = visible.shape[1] if E else 0
    qlen = torch.tensor(q_lens, dtype=torch.int64)
    prefix = torch.tensor(prefix_lens, dtype=torch.int64)
    kv = prefix + qlen
    seg_bytes = (qlen * kv + 7) // 8
    byte_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(seg_bytes, 0)])
    total_bytes = int(byte_indptr[-1])
    total_bits = 8 * total_bytes
    max_q = max(q_lens) if E else 0
    wl = flashinfer_window_left(window, max_q)
    if E == 0:
        empty = torch.zeros(0, dtype=torch.uint8, device=device)
        return TreeMask(empty, torch.zeros(1, dtype=torch.int32, device=device), [0], wl)
    i = torch.arange(Q)
    row_ok = i[None, :] < qlen[:, None]  # [E, Q]
    dump = total_bits  # one extra element absorbs the writes of rows/columns past q_len
    row_base = torch.where(row_ok, 8 * byte_indptr[:-1, None] + i[None, :] * kv[:, None], dump)
    depths = depths.to(torch.int64)
    if window is not None:
        lo = (prefix[:, None] + depths - window + 1).clamp(min=0)
        lo = torch.minimum(lo, prefix[:, None].expand(E, Q))
        near = (depths[:, :, None] - depths[:, None, :]) < window
        tree_vis = visible & near
    else:
        lo = torch.zeros(E, Q, dtype=torch.int64)
        tree_vis = visible
    run_start = torch.where(row_ok, row_base + lo, dump)
    run_end = torch.where(row_ok, row_base + prefix[:, None], dump)
    col_ok = row_ok[:, None, :] & row_ok[:, :, None]  # [E, Q(i), Q(n)]
    tree_pos = torch.where(col_ok, (row_base + prefix[:, None])[:, :, None] + i[None, None, :], dump)
    host = torch.cat([run_start.flatten(), run_end.flatten(), tree_pos.flatten(), byte_indptr])
    idx = to_device(host, device)  # one copy for the indices, one for the tree bits
    vals = to_device(tree_vis.flatten(), device)
    starts_d, ends_d, tree_d, indptr_d = torch.split(idx, [E * Q, E * Q, E * Q * Q, E + 1])
    delta = torch.zeros(total_bits + 1, dtype=torch.int8, device=device)
    ones = torch.ones(E * Q, dtype=torch.int8, device=device)
    delta.index_add_(0, starts_d, ones)
    delta.index_add_(0, ends_d, -ones)
    bits = torch.cumsum(delta, 0, dtype=torch.int8) > 0  # run boundaries never overlap: 0 or 1
    bits[tree_d] = vals
    weights = torch.pow(2, torch.arange(8, device=device)).to(torch.uint8)  # made on the device
    packed = (bits[:total_bits].view(total_bytes, 8).to(torch.uint8) * weights).sum(
        -1, dtype=torch.uint8) if total_bytes else torch.zeros(0, dtype=torch.uint8, device=device)
    return TreeMask(packed, indptr_d.to(torch.int32), byte_indptr.tolist(), wl)


# ----------------------------------------------------------------------------- the runner


def _default_wrapper_factory(workspace, kv_layout: str):
    import flashinfer

    # fa2: on Hopper a custom mask rules out fa3 (it rejects masks at run time)
    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout, backend="fa2")


class FlashInferTreeAttention:
    """Pre-allocated FlashInfer state for tree verify (one per process and device).

    One float workspace shared by every wrapper (their runs are serialised on one stream, as in
    vLLM's FlashInfer backend; 256 MB covers KV splits up to 8 query heads per kv head at head
    dim 256 on 132 SMs, see ``split_kv_bytes``); one planned ``BatchPrefillWithPagedKVCacheWrapper``
    per KV-cache group and layer configuration (kv layout, heads, head size, dtypes, scale,
    window), created on first use and re-planned once per step. The glue makes it when the runner
    is built, so that vLLM's memory profile counts the workspace before sizing the KV cache."""

    def __init__(self, device, workspace_bytes: int = 256 << 20,
                 wrapper_factory: Callable[[Any, str], Any] | None = None, max_wrappers: int = 16):
        import torch

        self.device = torch.device(device)
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._factory = wrapper_factory or _default_wrapper_factory
        # (group key, config) -> [wrapper, serial of the plan it holds], least recently used first;
        # bounded, so that group keys that are not stable across steps cannot pile up wrappers
        # (each holds 16 MB of index workspace; one evicted is simply made again when needed)
        self._wrappers: collections.OrderedDict = collections.OrderedDict()
        self.max_wrappers = max_wrappers
        self._serial = itertools.count(1)
        self._num_sms: int | None = None

    def split_kv_bytes(self, num_qo_heads: int, num_kv_heads: int, head_dim: int) -> int:
        """Upper bound of the float workspace FlashInfer's fa2 prefill plan may take when it splits
        the KV (partial outputs + LSEs of at most 2 CTAs per SM per kv head, query tiles <= 128
        rows: PrefillPlan in its scheduler.cuh). Past the workspace, a layer is planned without
        KV splits (correct, fewer CTAs at small batches) rather than failing mid-step."""
        import torch

        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                             if self.device.type == "cuda" else 132)
        tiles = (2 * self._num_sms) // max(num_kv_heads, 1)
        return num_qo_heads * tiles * 128 * (head_dim + 1) * 4 + (1 << 16)

    def plan(self, block_table, block_size: int, req_rows, starts, prefix_lens, q_lens, visible,
             depths, group_key: Any = None) -> FlashInferTreePlan:
        """The step's plan for one KV-cache group; ``group_key`` (e.g. the block table's address
        and block size) picks the wrappers it re-plans, so two groups never share one."""
        plan = plan_flashinfer_tree(block_table, block_size, req_rows, starts, prefix_lens, q_lens,
                                    visible, depths)
        plan.owner, plan.group_key, plan.serial = self, group_key, next(self._serial)
        return plan

    def prepare(self, plan: FlashInferTreePlan, query, kv_cache, scale: float,
                window: int | None = None):
        """Validate a layer's inputs and plan its wrapper for this step (done by ``run``; callable
        ahead, e.g. to time planning). Returns (wrapper, k_cache view, v_cache view)."""
        import torch

        if query.dim() != 3:
            raise ValueError(f"query: expected [T, H, D], got {tuple(query.shape)}")
        if query.dtype not in (torch.float16, torch.bfloat16) or kv_cache.dtype != query.dtype:
            raise ValueError(f"query / kv_cache dtype: FlashInfer tree attention takes fp16/bf16 "
                             f"query and an equal-dtype cache, got {query.dtype} / {kv_cache.dtype}")
        H, D = query.shape[1], query.shape[2]
        layout, k_cache, v_cache = paged_kv_views(kv_cache, D)
        kvh = kv_cache.shape[1]
        if H % kvh:
            raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({kvh})")
        if kv_cache.shape[2] != plan.block_size:
            raise ValueError(f"kv_cache: block size {kv_cache.shape[2]}, the plan has {plan.block_size}")
        config = (layout, H, kvh, D, query.dtype, float(scale), window)
        return self._planned_wrapper(plan, config, plan.mask(window)), k_cache, v_cache

    def run(self, plan: FlashInferTreePlan, query, kv_cache, output, scale: float,
            window: int | None = None) -> None:
        if plan.num_requests == 0:
            return
        if output.shape != query.shape:
            raise ValueError(f"query and output: expected equal [T, H, D] shapes, got "
                             f"{tuple(query.shape)} and {tuple(output.shape)}")
        wrapper, k_cache, v_cache = self.prepare(plan, query, kv_cache, scale, window)
        if plan.row_range is not None:
            a, b = plan.row_range
            q = query[a:b]
            out = output[a:b]
            if out.is_contiguous():  # the kernel writes [rows, H, D] densely
                wrapper.run(q, (k_cache, v_cache), out=out)
                return
            out.copy_(wrapper.run(q, (k_cache, v_cache)))
            return
        q = query.index_select(0, plan.rows)
        output.index_copy_(0, plan.rows, wrapper.run(q, (k_cache, v_cache)))

    def _planned_wrapper(self, plan: FlashInferTreePlan, config: tuple, mask: TreeMask):
        key = (plan.group_key, config)
        entry = self._wrappers.get(key)
        if entry is None:
            while len(self._wrappers) >= self.max_wrappers:
                self._wrappers.popitem(last=False)
            entry = self._wrappers[key] = [self._factory(self.workspace, config[0]), 0]
        self._wrappers.move_to_end(key)
        wrapper, planned = entry
        if planned != plan.serial:
            layout, H, kvh, D, dtype, scale, window = config
            wrapper.plan(plan.qo_indptr, plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len,
                         H, kvh, D, plan.block_size, packed_custom_mask=mask.packed, causal=False,
                         sm_scale=scale, window_left=mask.window_left, q_data_type=dtype,
                         kv_data_type=dtype,
                         disable_split_kv=self.split_kv_bytes(H, kvh, D) > self.workspace.numel())
            # plan() derives the mask offsets in bits (FlashInfer PR #2201); the kernel reads bytes
            wrapper._mask_indptr_buf = mask.byte_indptr
            entry[1] = plan.serial
        return wrapper


_RUNNERS: dict = {}


def tree_attention_runner(device) -> FlashInferTreeAttention:
    """The process's FlashInferTreeAttention for ``device`` (allocated on first use)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    runner = _RUNNERS.get(dev)
    if runner is None:
        runner = _RUNNERS[dev] = FlashInferTreeAttention(dev)
    return runner


def precompile(variants, dtype="bfloat16") -> None:
    """Build FlashInfer's fa2 paged-prefill modules for ``variants`` = [(head_dim, sliding window
    used)] in one parallel ninja run (the first call of each variant otherwise JIT-compiles for
    about a minute, on the first verify step). Already built modules are skipped."""
    import torch
    from flashinfer.jit import build_jit_specs, gen_batch_prefill_module

    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    specs = [gen_batch_prefill_module("fa2", dt, dt, dt, torch.int32, hd, hd, 0, bool(sliding),
                                      False, False) for hd, sliding in variants]
    build_jit_specs(specs, verbose=False)
