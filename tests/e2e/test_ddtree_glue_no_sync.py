"""The DDTree glue's verify step (positions, tree walk, KV commit) and its GDN plan read no device
values on the host (no engine): the "device" tensors live on the ``meta`` device, where .item(),
int(), .cpu(), boolean-mask indexing and nonzero raise. The one host wait left per step is the
drafter's input layout (``drafter_inputs``), which really needs the accepted lengths.

Values: the GDN plan derived from the runner's host counts equals the one derived from vLLM's
device metadata (the path that syncs), on CPU tensors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
glue = pytest.importorskip("vllm.v1.spec_decode.ddtree")  # the overlay must be applied

BUDGET = 4
N = BUDGET + 1


def _tree(parents: list[int], tokens: list[int]):
    depths = [0] * len(parents)
    for i, p in enumerate(parents):
        if p >= 0:
            depths[i] = depths[p] + 1
    return glue._ReqTree(parents=torch.tensor(parents), depths=torch.tensor(depths),
                         num_nodes=sum(t >= 0 for t in tokens), token_ids=torch.tensor(tokens))


def _runner(dev):
    batch = SimpleNamespace(num_reqs=3, req_ids=["a", "b", "c"],
                            req_id_to_index={"a": 0, "b": 1, "c": 2},
                            num_computed_tokens_cpu=np.array([10, 20, 7]))
    return SimpleNamespace(
        speculative_config=SimpleNamespace(ddtree_budget=BUDGET, ddtree_top_k=2,
                                           ddtree_chain_seed=True, ddtree_max_depth=4),
        input_batch=batch, requests={}, positions=torch.zeros(64, dtype=torch.long, device=dev),
        uses_mrope=False,
        # vLLM's GDN builder input: draft counts per row (-1: not a spec row), kept on the host
        num_decode_draft_tokens=SimpleNamespace(np=np.array([4, 2, 4, -1], dtype=np.int32)))


def _verify_step(dev):
    """Rows a and c verify trees (a bushy one, one with a padding node); b verifies a plain chain
    of 2 drafts (no tree for it)."""
    runner = _runner(dev)
    state = glue.DDTreeRunnerState(runner)
    state.trees = {"a": _tree([-1, 0, 0, 1, 2], [9, 5, 6, 7, 8]),
                   "c": _tree([-1, 0, 1, 2, -1], [3, 4, 5, 6, -1])}
    sched = SimpleNamespace(scheduled_spec_decode_tokens={"a": [5, 6, 7, 8], "b": [1, 2],
                                                          "c": [4, 5, 6, 3]})
    num_scheduled = np.array([5, 3, 5])
    state.on_positions(sched, 3, num_scheduled)
    step = glue.current_tree_step()
    assert step is not None and [e.req_index for e in step.entries] == [0, 2]
    return runner, state, step


def test_verify_step_reads_no_device_values():
    runner, state, step = _verify_step("meta")
    # one attention layer's plan and cache (what tree_attention_fixup records on CUDA)
    from ddtree.attention.batched import plan_tree_attention

    table = torch.zeros(3, 4, dtype=torch.int32, device="meta")
    plan = plan_tree_attention(table, 16, step.rows, step.starts, step.prefix_lens, step.q_lens,
                               step.visible, step.depths)
    step.gpu_attn_layers.append((torch.empty(16, 1, 16, 8, device="meta"), plan))
    logits = torch.empty(13, 50, device="meta")
    spec_md = SimpleNamespace(num_draft_tokens=[4, 2, 4],
                              draft_token_ids=torch.empty(10, dtype=torch.int32, device="meta"))
    sampling = SimpleNamespace(all_greedy=True, max_num_logprobs=None)
    out = state.sample(logits, spec_md, sampling)
    assert out.sampled_token_ids.shape == (3, N)
    assert glue.current_tree_step() is None
    # the statistics wait for the walk's host copy; reading them is the (deliberate) sync point
    assert state._pending_stats is not None


def _gdn_md(dev):
    # rows 0..2 are spec rows (query lens 5, 3, 5), row 3 is a padding row
    spec_idx = torch.arange(3 * N, dtype=torch.int32).view(3, N) + 100
    return SimpleNamespace(
        num_spec_decodes=3, spec_state_indices_tensor=spec_idx.to(dev),
        num_accepted_tokens=torch.tensor([1, 2, 1]).to(dev),
        spec_sequence_masks=torch.tensor([True, True, True, False]).to(dev),
        spec_query_start_loc=torch.tensor([0, 5, 8, 13], dtype=torch.int32).to(dev))


def test_gdn_plan_reads_no_device_values():
    _, _, step = _verify_step("meta")
    plan = glue._gdn_plan(step, _gdn_md("meta"))
    assert plan.parents.shape == (3, N) and plan.real_nodes.shape == plan.real_tokens.shape


def test_gdn_plan_from_host_counts_equals_device_metadata():
    _, _, step = _verify_step("cpu")
    host = glue._gdn_plan(step, _gdn_md("cpu"))
    step.gdn_plans.clear()
    step.runner = SimpleNamespace()  # no host counts: the plan reads vLLM's device metadata
    device = glue._gdn_plan(step, _gdn_md("cpu"))
    for field in ("parents", "num_nodes", "gather", "real_nodes", "real_tokens", "req_rows",
                  "is_tree", "init_lines"):
        assert torch.equal(getattr(host, field), getattr(device, field)), field
    assert host.parents[0].tolist() == [-1, 0, 0, 1, 2]  # tree a
    assert host.parents[1].tolist() == [-1, 0, 1, -1, -1]  # chain b (3 tokens)
    assert host.num_nodes.tolist() == [5, 3, 4]  # c has a padding node
    assert host.is_tree.tolist() == [True, False, True]
    assert host.real_tokens.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
