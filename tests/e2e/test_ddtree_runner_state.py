"""DDTreeRunnerState bookkeeping across preemption, aborts and steps without a drafter pass (fast,
no engine): which trees the runner keeps, and when a scheduled block is verified as a tree."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
ddtree_glue = pytest.importorskip("vllm.v1.spec_decode.ddtree")  # the overlay must be applied


def _tree(tokens: list[int], num_nodes: int | None = None):
    n = len(tokens)
    return ddtree_glue._ReqTree(parents=torch.arange(-1, n - 1), depths=torch.arange(n),
                                num_nodes=n if num_nodes is None else num_nodes,
                                token_ids=torch.tensor(tokens))


def test_scheduled_drafts_must_be_the_trees_tokens():
    t = _tree([9, 5, 6, 7, 8])  # root 9, nodes 5..8
    assert t.proposed([5, 6, 7, 8])
    assert t.proposed([5, 6])  # the scheduler may shorten a block
    assert t.proposed([-1, -1, -1, -1])  # placeholders
    # vLLM schedules zeros when the drafter did not run for a step (near max_model_len): the tree
    # left from an older proposal must not be applied to them
    assert not t.proposed([0, 0, 0, 0])
    assert not t.proposed([5, 6, 7, 9])
    # padding nodes (a budget the tree could not fill) carry the root token and are not compared
    padded = _tree([9, 5, 6, -1, -1], num_nodes=3)
    assert padded.proposed([5, 6, 9, 9])
    assert not padded.proposed([5, 4, 9, 9])


def test_trees_of_preempted_and_finished_requests_are_dropped():
    runner = SimpleNamespace(speculative_config=SimpleNamespace(
        ddtree_budget=4, ddtree_top_k=2, ddtree_chain_seed=True, ddtree_max_depth=4))
    state = ddtree_glue.DDTreeRunnerState(runner)
    state.trees = {rid: _tree([9, 5, 6, 7, 8]) for rid in ("a", "b", "c")}
    state._forget_trees(SimpleNamespace(preempted_req_ids={"a"}, finished_req_ids={"b", "gone"}))
    assert set(state.trees) == {"c"}
    assert state.stats.trees_dropped_by_preemption == 1
    assert state.stats.trees_dropped_by_finish == 1
    # a scheduler output without those fields (other vLLM builds) leaves the trees alone
    state._forget_trees(SimpleNamespace())
    assert set(state.trees) == {"c"}
