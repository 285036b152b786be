"""The per-step cache commit replayed from a CUDA graph (``DDTREE_COMMIT_GRAPH=1``) leaves the KV,
conv and recurrent caches exactly as the eager commit does, step after step (first step eager,
second captured, later replayed), for tree and chain requests and varying accepted paths. GPU only;
the eager commit itself is covered on CPU by the engine tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
glue = pytest.importorskip("vllm.v1.spec_decode.ddtree")  # the overlay must be applied

from tests.e2e.test_ddtree_glue_no_sync import _gdn_md, _verify_step  # noqa: E402

# per call: accepted nodes (root first, -1 past the path) and counts m for rows a (tree), b (chain
# of 2 drafts), c (tree with a padding node)
WALKS = [
    ([[0, 2, 4, -1, -1], [0, 1, -1, -1, -1], [0, 1, 2, 3, -1]], [2, 1, 3]),
    ([[0, 1, 3, -1, -1], [0, 1, 2, -1, -1], [0, -1, -1, -1, -1]], [2, 2, 0]),
    ([[0, 2, -1, -1, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, -1]], [1, 0, 3]),
    ([[0, 1, 3, -1, -1], [0, 1, -1, -1, -1], [0, 1, -1, -1, -1]], [2, 1, 1]),
]


def _caches(dev, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    kv = [torch.randn(12, 1, 16, 16, generator=g).to(dev) for _ in range(2)]
    conv = [torch.randn(128, 8, 8, generator=g).to(dev) for _ in range(2)]
    pools = [torch.randn(128, 2, 4, 4, generator=g).to(dev) for _ in range(2)]
    return kv, conv, pools


def _run(monkeypatch, graph: bool):
    dev = torch.device("cuda")
    monkeypatch.setattr(glue, "_TREE_ATTENTION_PATH", "portable")  # no FlashInfer set-up needed
    monkeypatch.setattr(glue, "_COMMIT_GRAPH", graph)
    _, state, step = _verify_step(dev)
    from ddtree.attention.flashinfer_tree import plan_flashinfer_tree

    table = torch.arange(12, dtype=torch.int32, device=dev).view(3, 4)
    plan = plan_flashinfer_tree(table, 16, step.rows, step.starts, step.prefix_lens, step.q_lens,
                                step.visible, step.depths)
    gdn_plan = glue._gdn_plan(step, _gdn_md(dev))
    kv, conv, pools = _caches(dev, 0)
    step.gpu_attn_layers.extend((k, plan) for k in kv)
    step.gdn_layers.extend((c, p, gdn_plan, 4) for c, p in zip(conv, pools))
    snapshots = []
    for acc, m in WALKS:
        walk = SimpleNamespace(accepted_nodes=torch.tensor(acc, device=dev),
                               num_accepted=torch.tensor(m, device=dev))
        state._commit(step, walk)
        torch.cuda.synchronize()
        snapshots.append([t.cpu().clone() for t in (*kv, *conv, *pools)])
    return state, snapshots


@pytest.mark.gpu
def test_commit_replay_equals_eager(monkeypatch):
    _, eager = _run(monkeypatch, graph=False)
    state, replayed = _run(monkeypatch, graph=True)
    cache = state._commit_replays
    assert (cache.eager_runs, cache.captures, cache.replays) == (1, 1, len(WALKS) - 1)
    start = _caches("cpu", 0)
    changed = False
    for step_i, (a, b) in enumerate(zip(eager, replayed)):
        for k, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), (step_i, k)
    for x, y in zip(eager[-1], [t for group in start for t in group]):
        changed |= not torch.equal(x, y)
    assert changed  # the commits did move rows and states
