"""``ddtree.transfer``: host -> device copies that do not make the host wait for the GPU.

CPU: values, dtype and no aliasing. GPU (marker ``gpu``): under torch's sync debug mode set to
"error", ``to_device`` of a host tensor and the tree-attention plans built from host arrays do not
synchronise, while the plain ``.to("cuda")`` of a pageable tensor does (the control)."""

import pytest
import torch

from ddtree.transfer import list_to_device, to_device


def test_values_dtype_and_no_alias_on_cpu():
    t = torch.arange(6).view(2, 3)
    out = to_device(t, "cpu", torch.int32)
    assert out.dtype == torch.int32 and torch.equal(out, t.int())
    same = to_device(t, "cpu")
    assert same is t or torch.equal(same, t)  # same device: a plain .to
    assert torch.equal(list_to_device([3, 1, 2], "cpu"), torch.tensor([3, 1, 2]))
    assert list_to_device([], "cpu").shape == (0,)


def test_meta_device_is_a_plain_to():
    out = to_device(torch.ones(3), "meta")
    assert out.device.type == "meta" and out.shape == (3,)


@pytest.mark.gpu
def test_to_device_does_not_sync_on_cuda():
    dev = torch.device("cuda")  # gpu marker: tests/conftest.py skips it without CUDA
    host = torch.arange(1000, dtype=torch.int64)
    busy = torch.randn(4096, 4096, device=dev)
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _ = busy @ busy  # queued work the copy must not wait for
        out = to_device(host, dev)
        lst = list_to_device([5, 6, 7], dev)
        host.zero_()  # the caller may overwrite its tensor at once
        with pytest.raises(RuntimeError):
            torch.arange(10).to(dev)  # control: pageable memory is staged synchronously
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert torch.equal(out.cpu(), torch.arange(1000)) and lst.tolist() == [5, 6, 7]


@pytest.mark.gpu
def test_tree_attention_plans_do_not_sync_on_cuda():
    dev = torch.device("cuda")  # gpu marker: tests/conftest.py skips it without CUDA
    from ddtree.attention.batched import plan_tree_attention
    from ddtree.attention.flashinfer_tree import packed_tree_mask, plan_flashinfer_tree

    E, Q = 3, 5
    rows, starts = torch.tensor([0, 1, 2]), torch.tensor([0, 5, 10])
    prefix, q_lens = torch.tensor([7, 40, 3]), torch.tensor([5, 4, 5])
    vis = torch.tril(torch.ones(Q, Q, dtype=torch.bool)).expand(E, Q, Q).clone()
    depths = torch.arange(Q).expand(E, Q).clone()
    table = torch.arange(3 * 8, dtype=torch.int32, device=dev).view(3, 8)
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan_tree_attention(table, 16, rows, starts, prefix, q_lens, vis, depths)
        plan_flashinfer_tree(table, 16, rows, starts, prefix, q_lens, vis, depths)
        packed_tree_mask(vis, depths, prefix.tolist(), q_lens.tolist(), None, dev)
        packed_tree_mask(vis, depths, prefix.tolist(), q_lens.tolist(), 4, dev)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
