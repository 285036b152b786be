"""The FlashInfer tree-verify path (ddtree.attention.flashinfer_tree).

CPU: the plan arrays and the packed mask against the per-request reference
(``flashinfer_tree_naive``) on random trees and shuffled block tables; the mask unpacked against
the ancestor + window visibility of ``tree_sdpa.tree_attention``; ``run`` end to end through a
stand-in for FlashInfer's wrapper that computes what FlashInfer 0.6.14's kernel computes from the
same inputs (including its bit-offset ``mask_indptr`` from ``plan(packed_custom_mask=...)``).
GPU (marker ``gpu``, skipped without CUDA + flashinfer): the real kernel against ``tree_attention``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddtree.attention.flashinfer_tree import (FlashInferTreeAttention, flashinfer_available,
                                              flashinfer_window_left, paged_kv_views,
                                              plan_flashinfer_tree, tree_attention_mode)
from ddtree.attention.flashinfer_tree_naive import (EmulatedPagedPrefillWrapper, naive_tree_plan,
                                                    naive_visibility, plan_args, random_tree_step,
                                                    reference_rows, unpack_tree_mask)
from ddtree.tree.flatten import flashinfer_custom_mask


def _case(seed, prefixes, qlens, bs, contiguous=True, kvh=2, heads=4, D=16, **kw):
    return random_tree_step(seed, prefixes, qlens, bs, contiguous, kv_heads=kvh, heads=heads,
                            head_dim=D, **kw)


_plan_args = plan_args


CASES = [
    # prefixes, q_lens, block size, contiguous rows
    ([0, 13, 40, 5], [5, 9, 17, 1], 16, True),
    ([31, 0, 64, 100, 7], [17, 17, 3, 17, 17], 32, False),
    ([3, 70], [8, 12], 5, True),  # odd block size: pages end mid-row
    ([0], [1], 16, True),  # a lone root with no past
]


@pytest.mark.parametrize("window", [None, 1, 3, 20])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_plan_arrays_match_per_request_construction(case, window):
    prefixes, qlens, bs, contiguous = CASES[case]
    c = _case(case, prefixes, qlens, bs, contiguous, pad_nodes=case % 2)
    plan = plan_flashinfer_tree(*_plan_args(c))
    ref = naive_tree_plan(*_plan_args(c), window=window)
    assert plan.qo_indptr.dtype == plan.kv_indptr.dtype == torch.int32
    assert plan.qo_indptr.tolist() == ref["qo_indptr"]
    assert plan.kv_indptr.tolist() == ref["kv_indptr"]
    assert plan.kv_indices.tolist() == ref["kv_indices"]
    assert plan.kv_last_page_len.tolist() == ref["kv_last_page_len"]
    assert plan.block_slots.tolist() == ref["block_slots"]
    if contiguous:
        assert plan.rows is None and plan.row_range == (ref["rows"][0], ref["rows"][-1] + 1)
    else:
        assert plan.row_range is None and plan.rows.tolist() == ref["rows"]
    mask = plan.mask(window)
    assert mask.byte_indptr.tolist() == mask.byte_indptr_host == ref["byte_indptr"]
    assert mask.packed.dtype == torch.uint8
    np.testing.assert_array_equal(mask.packed.numpy(), ref["packed"])
    assert plan.mask(window) is mask  # built once per step and window


@pytest.mark.parametrize("window", [None, 2, 6])
def test_packed_mask_unpacks_to_ancestor_window_visibility(window):
    """Independent of the naive builder: unpack, then compare with the visibility that
    tree_sdpa.tree_attention applies (prefix + ancestors, positions prefix + depth, window)."""
    from ddtree.attention.tree_sdpa import _abs_key_positions

    c = _case(7, [0, 9, 33], [12, 7, 16], 16)
    plan = plan_flashinfer_tree(*_plan_args(c))
    mask = plan.mask(window)
    masks = unpack_tree_mask(mask.packed, mask.byte_indptr_host, plan.q_lens, plan.kv_lens)
    for e, (p, q) in enumerate(zip(plan.prefix_lens, plan.q_lens)):
        vis = c["vis"][e, :q, :q]
        expect = torch.ones(q, p + q, dtype=torch.bool)
        expect[:, p:] = vis
        if window is not None:
            key_pos = _abs_key_positions(vis, p)
            expect &= (key_pos[p:, None] - key_pos[None, :]) < window
        np.testing.assert_array_equal(masks[e], expect.numpy())
        np.testing.assert_array_equal(masks[e], naive_visibility(c["vis"][e], c["depths"][e], p, q,
                                                                 window))
    if window is None:  # the same layout as ddtree.tree.flashinfer_custom_mask (full blocks)
        c2 = _case(8, [4, 0, 21], [9, 9, 9], 16)
        plan2 = plan_flashinfer_tree(*_plan_args(c2))
        ref = flashinfer_custom_mask(c2["vis"], c2["prefixes"].tolist())
        assert torch.equal(plan2.mask(None).packed, ref.packed)
        assert plan2.mask(None).byte_indptr.tolist() == ref.packed_indptr.tolist()


def test_window_left_is_a_superset_and_the_plain_one_is_not():
    """FlashInfer's own window (flattened order) never hides a key the tree mask shows with the
    widened window_left; with the plain window - 1 it would (so the widening is needed)."""
    c = _case(11, [40, 25, 60], [17, 17, 17], 16)
    window = 5
    wl = flashinfer_window_left(window, 17)
    plain_cuts = 0
    for e, (p, q) in enumerate(zip(c["prefixes"].tolist(), c["qlens"].tolist())):
        ours = naive_visibility(c["vis"][e], c["depths"][e], p, q, window)
        kv = p + q
        i, j = np.meshgrid(np.arange(q), np.arange(kv), indexing="ij")
        assert not (ours & ~(j + q + wl >= kv + i)).any()
        plain_cuts += int((ours & ~(j + q + window - 1 >= kv + i)).sum())
    assert plain_cuts > 0
    assert flashinfer_window_left(None, 17) == -1
    with pytest.raises(ValueError, match="window"):
        flashinfer_window_left(0, 17)


# ----------------------------------------------------------------------------- run (emulated)


class _EmulatedWrapper(EmulatedPagedPrefillWrapper):
    instances: list = []

    def __init__(self, workspace, kv_layout):
        super().__init__(workspace, kv_layout)
        _EmulatedWrapper.instances.append(self)


def _reference_rows(c, plan, window, scale):
    return reference_rows(c, window, scale)


@pytest.mark.parametrize("order", ["NHD", "HND"])
@pytest.mark.parametrize("window,contiguous,kvh", [(None, True, 2), (4, False, 2), (None, False, 1),
                                                    (9, True, 1)])
def test_run_matches_tree_attention_through_emulated_flashinfer(order, window, contiguous, kvh):
    c = _case(21, [0, 19, 45], [9, 13, 6], 16, contiguous, kvh=kvh, order=order)
    runner = FlashInferTreeAttention("cpu", workspace_bytes=16, wrapper_factory=_EmulatedWrapper)
    plan = runner.plan(*_plan_args(c), group_key=("group", 0))
    output = torch.full_like(c["query"], 7.0)
    scale = c["D"] ** -0.5
    plan.run(c["query"], c["cache"], output, scale, window)
    written = torch.zeros(output.shape[0], dtype=torch.bool)
    for e, (s, ref) in _reference_rows(c, plan, window, scale).items():
        torch.testing.assert_close(output[s:s + ref.shape[0]].float(), ref, atol=2e-2, rtol=2e-2)
        written[s:s + ref.shape[0]] = True
    assert (output[~written] == 7.0).all()  # other requests' rows untouched
    # a second layer of the step reuses the planned wrapper; a new step plans it again
    wrapper = _EmulatedWrapper.instances[-1]
    plan.run(c["query"], c["cache"], output, scale, window)
    assert wrapper.plans == 1
    runner.plan(*_plan_args(c), group_key=("group", 0)).run(c["query"], c["cache"], output, scale,
                                                            window)
    assert wrapper.plans == 2 and _EmulatedWrapper.instances[-1] is wrapper
    assert wrapper.disable_split_kv  # a 16-byte workspace cannot hold KV-split partials


def test_default_workspace_allows_kv_splits_for_common_shapes():
    runner = FlashInferTreeAttention("cpu", wrapper_factory=_EmulatedWrapper)  # 132 SMs assumed
    for heads, kvh, D in [(24, 4, 256), (16, 2, 128), (64, 8, 128), (32, 8, 128), (4, 2, 64)]:
        assert runner.split_kv_bytes(heads, kvh, D) <= runner.workspace.numel()
    assert runner.split_kv_bytes(64, 4, 256) > runner.workspace.numel()  # 16 per kv head: no split


def test_byte_offsets_matter():
    """Without the byte mask offsets (FlashInfer 0.6.14's plan leaves bit offsets) every request
    after the first reads another part of the mask: the test above would fail."""
    c = _case(5, [10, 30], [9, 9], 16)
    scale = c["D"] ** -0.5

    class BitOffsets(_EmulatedWrapper):
        def run(self, q, paged_kv_cache, out=None):
            self._mask_indptr_buf = self._bits
            return super().run(q, paged_kv_cache, out)

        def plan(self, *args, **kw):
            super().plan(*args, **kw)
            self._bits = self._mask_indptr_buf

    runner = FlashInferTreeAttention("cpu", workspace_bytes=16, wrapper_factory=BitOffsets)
    plan = runner.plan(*_plan_args(c))
    output = torch.zeros_like(c["query"])
    try:
        plan.run(c["query"], c["cache"], output, scale, None)
    except IndexError:  # the emulator reads past the mask: the kernel would read stray memory
        return
    (s0, ref0), (s1, ref1) = _reference_rows(c, plan, None, scale).values()
    torch.testing.assert_close(output[s0:s0 + 9].float(), ref0, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(output[s1:s1 + 9].float(), ref1.float(), atol=2e-2, rtol=2e-2)


def test_paged_kv_views_layouts():
    g = torch.Generator().manual_seed(0)
    nhd = torch.randn(6, 16, 3, 8, generator=g)  # memory [blocks, bs, kvh, 2D]
    layout, k, v = paged_kv_views(nhd.transpose(1, 2), 4)
    assert layout == "NHD" and k.shape == (6, 16, 3, 4)
    assert torch.equal(k, nhd[..., :4]) and torch.equal(v, nhd[..., 4:])
    hnd = torch.randn(6, 3, 16, 8, generator=g)
    layout, k, v = paged_kv_views(hnd, 4)
    assert layout == "HND" and torch.equal(k, hnd[..., :4]) and torch.equal(v, hnd[..., 4:])
    one = torch.randn(6, 16, 1, 8, generator=g).transpose(1, 2)  # one kv head, NHD memory
    layout, k, v = paged_kv_views(one, 4)
    assert torch.equal(k.reshape(6, 16, 4), one[..., :4].reshape(6, 16, 4))
    with pytest.raises(ValueError, match="kv_cache"):
        paged_kv_views(hnd, 5)


def test_bad_inputs_raise_value_errors():
    c = _case(1, [4, 8], [5, 5], 16)
    args = list(_plan_args(c))
    bad = list(args)
    bad[5] = torch.tensor([5, 9])  # q_len past Q
    with pytest.raises(ValueError, match="q_lens"):
        plan_flashinfer_tree(*bad)
    bad = list(args)
    bad[0] = c["table"][:, :0]  # too few blocks per row
    with pytest.raises(ValueError, match="block_table"):
        plan_flashinfer_tree(*bad)
    bad = list(args)
    bad[6] = c["vis"][:, :4]
    with pytest.raises(ValueError, match="visible"):
        plan_flashinfer_tree(*bad)
    runner = FlashInferTreeAttention("cpu", workspace_bytes=16, wrapper_factory=_EmulatedWrapper)
    plan = runner.plan(*args)
    with pytest.raises(ValueError, match="dtype"):
        plan.run(c["query"].float(), c["cache"], c["query"].float(), 1.0)


def test_mode_variable():
    assert tree_attention_mode({}) == "flashinfer"  # the default since the H100 check passed
    assert tree_attention_mode({"DDTREE_TREE_ATTENTION": "portable"}) == "portable"
    assert tree_attention_mode({"DDTREE_TREE_ATTENTION": "FlashInfer"}) == "flashinfer"
    with pytest.raises(ValueError, match="DDTREE_TREE_ATTENTION"):
        tree_attention_mode({"DDTREE_TREE_ATTENTION": "fast"})


def test_plan_and_mask_need_no_device_values():
    """On the meta device any host read of device values raises: the plan and the mask are built
    from host lengths only (no sync per step)."""
    c = _case(3, [0, 13, 40], [5, 9, 17], 16, contiguous=False)
    args = list(_plan_args(c))
    args[0] = c["table"].to("meta")
    plan = plan_flashinfer_tree(*args)
    assert plan.kv_indices.device.type == "meta" and plan.rows.device.type == "meta"
    mask = plan.mask(4)
    assert mask.packed.device.type == "meta"
    assert mask.packed.shape[0] == mask.byte_indptr_host[-1]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flashinfer_available() is not None,
                    reason="needs CUDA and flashinfer")
@pytest.mark.parametrize("D,bs,order", [(128, 16, "NHD"), (256, 32, "HND"), (128, 32, "HND")])
@pytest.mark.parametrize("window", [None, 24, 6])
def test_flashinfer_kernel_matches_tree_attention(D, bs, order, window):
    """GQA (8 query heads on 2 kv heads), several requests of different prefix lengths (one with
    none), rows interleaved with other requests': the real kernel against the fp32 reference."""
    c = _case(31, [0, 70, 300, 1000], [17, 33, 9, 33], bs, contiguous=False, kvh=2, heads=8, D=D,
              order=order, device="cuda", pad_nodes=2)
    runner = FlashInferTreeAttention("cuda")
    plan = runner.plan(*_plan_args(c), group_key="test")
    output = torch.full_like(c["query"], 5.0)
    scale = D ** -0.5
    plan.run(c["query"], c["cache"], output, scale, window)
    written = torch.zeros(output.shape[0], dtype=torch.bool, device=output.device)
    for e, (s, ref) in _reference_rows(c, plan, window, scale).items():
        got = output[s:s + ref.shape[0]].float()
        assert (got - ref.float()).abs().max().item() < 3e-2
        written[s:s + ref.shape[0]] = True
    assert (output[~written] == 5.0).all()


# ----------------------------------------------------------------------------- FlashInfer's Python layer


class _KernelStandIn:
    """The compiled fa2 batch-prefill module behind FlashInfer's wrapper: ``plan`` returns a plan
    info, ``paged_run`` computes from the very arguments the wrapper hands the kernel (0.6.14's
    argument order) what the kernel computes, by ``emulated_paged_prefill``."""

    def __init__(self):
        self.runs = []

    def plan(self, *args):
        return [0]

    def paged_run(self, float_ws, int_ws, plan_info, q, k_cache, v_cache, qo_indptr, kv_indptr,
                  kv_indices, last_page_len, out, lse, mask_mode, layout, window_left, enable_pdl,
                  custom_mask, mask_indptr, alibi, prefix_len, token_pos, max_item_len, soft_cap,
                  sm_scale, *rest):
        from flashinfer.utils import MaskMode, TensorLayout

        from ddtree.attention.flashinfer_tree_naive import emulated_paged_prefill

        assert mask_mode == MaskMode.CUSTOM.value and soft_cap == 0.0
        kv_layout = TensorLayout(layout).name
        self.runs.append({"layout": kv_layout, "window_left": window_left,
                          "mask_indptr": mask_indptr.tolist()})
        res = emulated_paged_prefill(q, k_cache, v_cache, kv_layout, qo_indptr.cpu(), kv_indptr.cpu(),
                                     kv_indices.cpu(), last_page_len.cpu(), custom_mask, mask_indptr.cpu(),
                                     window_left, sm_scale)
        out.copy_(res.to(out.dtype))


@pytest.mark.parametrize("order,window", [("NHD", None), ("HND", 5)])
def test_through_flashinfer_python_wrapper(monkeypatch, order, window):
    """FlashInfer 0.6.14's own ``BatchPrefillWithPagedKVCacheWrapper.plan`` / ``run`` (its Python
    layer: argument handling, dtype and shape checks, mask offsets, layout) on CPU tensors, with the
    compiled kernel module replaced by a stand-in: the tree rows equal the reference, so the
    arguments reach the kernel as intended (skipped where flashinfer does not import)."""
    if flashinfer_available() is not None:
        pytest.skip(f"flashinfer does not import: {flashinfer_available()}")
    import flashinfer.prefill as fp

    kernel = _KernelStandIn()
    monkeypatch.setattr(fp, "get_batch_prefill_module", lambda backend, *args: kernel)
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kw):  # no pinned memory without a driver
        return real_empty(*args, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    c = _case(51, [0, 21, 47], [9, 13, 6], 16, contiguous=False, order=order)
    runner = FlashInferTreeAttention("cpu", workspace_bytes=1 << 16)
    plan = runner.plan(*_plan_args(c))
    output = torch.full_like(c["query"], 7.0)
    scale = c["D"] ** -0.5
    plan.run(c["query"], c["cache"], output, scale, window)
    assert kernel.runs[-1]["layout"] == order
    assert kernel.runs[-1]["window_left"] == flashinfer_window_left(window, 13)
    assert kernel.runs[-1]["mask_indptr"] == plan.mask(window).byte_indptr_host  # bytes, not bits
    for e, (s, ref) in _reference_rows(c, plan, window, scale).items():
        torch.testing.assert_close(output[s:s + ref.shape[0]].float(), ref, atol=2e-2, rtol=2e-2)
