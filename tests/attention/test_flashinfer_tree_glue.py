"""The glue's choice of tree-attention path (``DDTREE_TREE_ATTENTION``) and ``tree_attention_fixup``
on the FlashInfer path, run on CPU through the emulated FlashInfer wrapper of
test_flashinfer_tree.py: its rows equal the portable path's, and the plan it records gives the
KV commit the same block slots. The glue module is loaded from this checkout's overlay file (the
venv's vLLM may carry another branch's copy)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from ddtree.attention import flashinfer_tree  # noqa: E402
from ddtree.attention.batched import plan_tree_attention  # noqa: E402
from tests.attention.test_flashinfer_tree import _case, _EmulatedWrapper, _plan_args  # noqa: E402

GLUE = Path(__file__).resolve().parents[2] / "patches/files/vllm/v1/spec_decode/ddtree.py"


@pytest.fixture()
def glue(monkeypatch):
    spec = importlib.util.spec_from_file_location("ddtree_glue_under_test", GLUE)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    mod._set_current(None)


class _CudaLike(torch.Tensor):
    """A CPU tensor the glue takes for a CUDA one (the hook only runs for CUDA queries)."""

    @property
    def is_cuda(self):
        return True


def _step(glue, c):
    E = c["rows"].shape[0]
    return glue.TreeVerifyStep(entries=[object()] * E, by_req={}, rows=c["rows"], starts=c["starts"],
                               prefix_lens=c["prefixes"], q_lens=c["qlens"], visible=c["vis"],
                               depths=c["depths"])


def _layer(c, heads, window):
    impl = SimpleNamespace(num_heads=heads, head_size=c["D"], scale=c["D"] ** -0.5,
                           sliding_window=None if window is None else (window - 1, 0))
    return SimpleNamespace(impl=impl, layer_name="layers.0.attn")


@pytest.mark.parametrize("window", [None, 5])
def test_fixup_flashinfer_path_equals_portable(glue, monkeypatch, window):
    c = _case(41, [0, 23, 50], [9, 17, 4], 16, contiguous=False, order="HND")
    heads = c["query"].shape[1]
    monkeypatch.setitem(flashinfer_tree._RUNNERS, torch.device("cpu"), flashinfer_tree.FlashInferTreeAttention(
        "cpu", workspace_bytes=16, wrapper_factory=_EmulatedWrapper))
    md = SimpleNamespace(block_table=c["table"])
    query = c["query"].reshape(c["query"].shape[0], -1).as_subclass(_CudaLike)
    outs = {}
    for path in ("portable", "flashinfer"):
        monkeypatch.setattr(glue, "_TREE_ATTENTION_PATH", path)
        step = _step(glue, c)
        glue._set_current(step)
        output = torch.full(query.shape, 3.0, dtype=query.dtype)
        glue.tree_attention_fixup(_layer(c, heads, window), query, c["cache"], md, output)
        glue.tree_attention_fixup(_layer(c, heads, window), query, c["cache"], md, output)
        assert len(step.attn_plans) == 1 and len(step.gpu_attn_layers) == 2
        outs[path] = (output, step.gpu_attn_layers[0][1])
    torch.testing.assert_close(outs["flashinfer"][0], outs["portable"][0], atol=2e-2, rtol=2e-2)
    fi_plan = outs["flashinfer"][1]
    assert isinstance(fi_plan, flashinfer_tree.FlashInferTreePlan)
    assert fi_plan.group_key == (c["table"].data_ptr(), 16)


def test_flashinfer_block_slots_equal_the_portable_plans():
    """The KV commit moves rows by block slot: the FlashInfer plan's [E, Q] slots must be the ones
    the commit derives from the portable plan (real block tokens)."""
    c = _case(43, [0, 31, 64, 5], [17, 3, 17, 9], 16, contiguous=False, pad_nodes=1)
    fi = flashinfer_tree.plan_flashinfer_tree(*_plan_args(c))
    portable = plan_tree_attention(*_plan_args(c))
    Q = c["vis"].shape[1]
    pos = c["prefixes"][:, None] + torch.arange(Q)[None, :]
    ref = portable.slots.gather(1, pos.clamp(max=portable.slots.shape[1] - 1))
    for e, q in enumerate(c["qlens"].tolist()):
        assert fi.block_slots[e, :q].tolist() == ref[e, :q].tolist()
        assert (fi.block_slots[e, q:] == fi.block_slots[e, 0]).all()  # past q_len: the root's


def test_path_variable(glue, monkeypatch):
    monkeypatch.setattr(glue, "_TREE_ATTENTION_PATH", None)
    monkeypatch.setenv("DDTREE_TREE_ATTENTION", "fastest")
    with pytest.raises(ValueError, match="DDTREE_TREE_ATTENTION"):
        glue._tree_attention_path()
    monkeypatch.setenv("DDTREE_TREE_ATTENTION", "flashinfer")
    monkeypatch.setattr(flashinfer_tree, "flashinfer_available", lambda: "ImportError: none here")
    assert glue._tree_attention_path() == "portable"  # requested but not importable
    monkeypatch.setattr(glue, "_TREE_ATTENTION_PATH", None)
    monkeypatch.setattr(flashinfer_tree, "flashinfer_available", lambda: None)
    assert glue._tree_attention_path() == "flashinfer"
    monkeypatch.setattr(glue, "_TREE_ATTENTION_PATH", None)
    monkeypatch.delenv("DDTREE_TREE_ATTENTION")
    assert glue._tree_attention_path() == "flashinfer"  # the default where flashinfer imports
    monkeypatch.setattr(glue, "_TREE_ATTENTION_PATH", None)
    monkeypatch.setattr(flashinfer_tree, "flashinfer_available", lambda: "ImportError: none here")
    assert glue._tree_attention_path() == "portable"
