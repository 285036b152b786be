"""The V2-runner glue (vllm/v1/spec_decode/ddtree_v2.py) on a fake V2 batch (fast, no engine: vLLM's
V2 model runner does not run on the CPU wheel; scripts/gpu_ddtree_v2_check.py runs it on a GPU).

One step of three requests with drafts, two verifying trees and one a chain: node positions, the
walk's committed tokens and V2's ``num_sampled`` / ``num_rejected``, then the drafter's inputs (the
accepted path's hidden-state rows first in each block, chain positions), each against a per-request
reference built with the naive tree walk. Also: a stale tree is verified as a chain, and the
request restrictions (penalties -> root-only, grammar -> chain)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
v2 = pytest.importorskip("vllm.v1.spec_decode.ddtree_v2")  # the overlays must be applied
glue = pytest.importorskip("vllm.v1.spec_decode.ddtree")

from ddtree.tree import build_tree  # noqa: E402
from ddtree.tree.naive import tree_walk_naive  # noqa: E402
from ddtree.tree.types import DraftTree  # noqa: E402
from tests.support.v2_stand_ins import GreedySampler, num_sampled_and_rejected  # noqa: E402

BUDGET, VOCAB, HIDDEN = 6, 40, 5


def _trees(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, VOCAB, generator=g) * 3
    roots = torch.tensor([1, 2, 3])
    return build_tree(root_token_ids=roots, budget=BUDGET, top_k=3, draft_logits=logits,
                      chain_seed=False, backend="torch"), roots


def _step(seed: int, stale: bool = False):
    """Three requests a, b, c with BUDGET drafts each; a and c verify trees, b a chain."""
    trees, roots = _trees(seed)
    runner = SimpleNamespace(speculative_config=SimpleNamespace(
        ddtree_budget=BUDGET, ddtree_top_k=3, ddtree_chain_seed=False, ddtree_max_depth=4))
    state = v2.DDTreeV2RunnerState.__new__(v2.DDTreeV2RunnerState)
    glue.DDTreeRunnerState.__init__(state, runner)
    state.params, state._warned_stale = {}, False
    state.last_trees = None
    req_ids = ["a", "b", "c"]
    drafter = SimpleNamespace(last_trees=trees, last_build_s=0.0)
    state.after_propose(drafter, req_ids)
    del state.trees["b"]  # b: drafts without a tree (e.g. a stale one dropped): a chain block
    q = BUDGET + 1
    prefix = np.array([30, 11, 52])
    tokens = trees.token_ids.clone()
    tokens = torch.where(tokens >= 0, tokens, roots[:, None].expand_as(tokens))
    if stale:  # the runner's draft buffer holds other tokens than c's tree
        tokens[2, 1] = (tokens[2, 1] + 1) % VOCAB
    input_ids = tokens.flatten()
    starts = np.arange(3) * q
    positions = torch.from_numpy(np.concatenate([p + np.arange(q) for p in prefix]))
    cu = np.arange(4) * q
    batch = SimpleNamespace(
        req_ids=req_ids, num_reqs=3, num_tokens=3 * q, num_scheduled_tokens=np.full(3, q),
        is_prefilling_np=np.zeros(3, dtype=bool), query_start_loc_np=np.append(starts, 3 * q),
        num_computed_tokens_np=prefix, input_ids=input_ids, positions=positions.clone(),
        logits_indices=torch.arange(3 * q), expanded_idx_mapping=torch.arange(3).repeat_interleave(q),
        idx_mapping_np=np.arange(3), expanded_local_pos=torch.arange(q).repeat(3),
        num_draft_tokens_per_req=np.full(3, BUDGET), cu_num_logits_np=cu,
        cu_num_logits=torch.from_numpy(cu), seq_lens=torch.from_numpy(prefix + q),
        idx_mapping=torch.arange(3, dtype=torch.int32))
    runner.sampler = GreedySampler(torch.zeros(3, dtype=torch.long))
    runner.block_tables = SimpleNamespace(input_block_tables=[torch.zeros(3, 4)])
    runner.rejection_sampler = None
    sched = SimpleNamespace(scheduled_spec_decode_tokens={r: [-1] * BUDGET for r in req_ids},
                            scheduled_new_reqs=[], finished_req_ids=set(), preempted_req_ids=set())
    return state, batch, sched, trees, tokens


def _target_logits(trees, tokens, seed):
    """Per node: the token of a random child (siblings included) or, sometimes, a fresh token."""
    g = torch.Generator().manual_seed(1000 + seed)
    q = BUDGET + 1
    target = torch.full((3, q), VOCAB - 1)
    for b in range(3):
        n = int(trees.num_nodes[b])
        for node in range(q):
            kids = [c for c in range(1, n) if int(trees.parents[b, c]) == node]
            if b == 1:  # chain block: children are the next slot
                kids = [node + 1] if node + 1 < q else []
            if kids and float(torch.rand(1, generator=g)) < 0.85:
                target[b, node] = tokens[b, kids[int(torch.randint(len(kids), (1,), generator=g))]]
    logits = torch.full((3 * q, VOCAB), -5.0)
    logits[torch.arange(3 * q), target.flatten()] = 5.0
    return logits, target


def _run_step(seed, monkeypatch) -> int:
    """One step checked against the reference; returns how many tree blocks left the chain."""
    import vllm.v1.worker.gpu.input_batch as v2_input_batch

    monkeypatch.setattr(v2_input_batch, "get_num_sampled_and_rejected", num_sampled_and_rejected)
    state, batch, sched, trees, tokens = _step(seed)
    q = BUDGET + 1
    chain_pos = batch.positions.clone()
    state.on_positions(sched, batch)
    step = glue.current_tree_step()
    assert step is not None and sorted(e.req_index for e in step.entries) == [0, 2]
    # tree nodes at root position + depth; the chain block keeps its positions
    for b in range(3):
        want = chain_pos[b * q: (b + 1) * q]
        if b != 1:
            want = int(batch.num_computed_tokens_np[b]) + trees.depths[b]
        assert torch.equal(batch.positions[b * q: (b + 1) * q], want), b

    logits, target = _target_logits(trees, tokens, seed)
    out = state.sample(logits, batch)
    assert glue.current_tree_step() is None
    # reference: the naive walk over each request's tree (b: the chain of its drafts)
    par = trees.parents.clone()
    valid = trees.valid.clone()
    par[1] = torch.arange(-1, q - 1)
    valid[1] = True
    ref_tree = DraftTree(token_ids=tokens.where(valid, torch.tensor(-1)), parents=par,
                         depths=trees.depths, ranks=trees.ranks, scores=trees.scores,
                         num_nodes=valid.sum(1), valid=valid, max_depth=q - 1, top_k=3)
    ref = tree_walk_naive(ref_tree, target)
    for b in range(3):
        m = int(ref.num_accepted[b])
        assert int(out.num_sampled[b]) == m + 1
        assert int(out.num_rejected[b]) == q - (m + 1)
        assert out.sampled_token_ids[b, : m + 1].tolist() == ref.committed_token_ids[b, : m + 1].tolist()

    # drafter inputs: the accepted path's rows first in each tree block, chain positions
    hidden = torch.randn(3 * q, HIDDEN)
    aux = [torch.randn(3 * q, HIDDEN), torch.randn(3 * q, HIDDEN)]
    before = [hidden.clone()] + [a.clone() for a in aux]
    state.drafter_inputs(batch, hidden, aux)
    assert torch.equal(batch.positions, chain_pos)
    for h, h0 in zip([hidden] + aux, before):
        for b in range(3):
            m = int(ref.num_accepted[b])
            path = ref.accepted_nodes[b, : m + 1]
            assert torch.equal(h[b * q: b * q + m + 1], h0[b * q + path]), b
            assert torch.equal(h[b * q + m + 1: (b + 1) * q], h0[b * q + m + 1: (b + 1) * q])
    assert state.stats.steps == 2
    left_chain = sum(bool((ref.accepted_nodes[b, 1: int(ref.num_accepted[b]) + 1]
                           != torch.arange(1, int(ref.num_accepted[b]) + 1)).any()) for b in (0, 2))
    assert state.stats.sibling_taken == left_chain
    return left_chain


def test_v2_tree_steps_match_per_request_reference(monkeypatch):
    # the seeds must exercise accepted paths that leave the top-1 chain (non-trivial row moves)
    assert sum(_run_step(seed, monkeypatch) for seed in range(4)) > 0


def test_stale_tree_is_verified_as_a_chain(monkeypatch):
    state, batch, sched, trees, tokens = _step(0, stale=True)
    state.on_positions(sched, batch)
    step = glue.current_tree_step()
    assert [e.req_index for e in step.entries] == [0]  # c's drafts are not its tree's nodes
    glue._set_current(None)


def test_restrict_trees_policy():
    trees, roots = _trees(3)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, VOCAB, generator=g)
    v2.restrict_trees(trees, roots, logits, BUDGET, flat_rows=[0], chain_rows=[0, 2])
    assert int(trees.num_nodes[0]) == 1 and not bool(trees.valid[0, 1:].any())
    chain = build_tree(root_token_ids=roots, budget=BUDGET, top_k=1, draft_logits=logits,
                       chain_seed=True)
    assert torch.equal(trees.parents[2], chain.parents[2])
    assert torch.equal(trees.token_ids[2], chain.token_ids[2])
    assert int(trees.num_nodes[1]) > 1  # untouched


def test_speculator_resized_to_the_drafter_depth():
    """DDTreeSpeculator: the runner schedules `budget` drafts, the drafter runs `depth` positions."""
    spec = v2.DDTreeSpeculator.__new__(v2.DDTreeSpeculator)
    spec.device, spec.dtype, spec.max_num_reqs, spec.vocab_size = torch.device("cpu"), torch.float32, 3, 7
    spec.num_speculative_steps = BUDGET  # as DFlash sized it (num_speculative_tokens = budget)
    spec.draft_logits = torch.zeros(3, BUDGET, 7)
    spec._resize_for_depth(4, HIDDEN)
    assert spec.num_speculative_steps == 4 and spec.num_query_per_req == 5
    assert spec.draft_tokens.shape == (3, 4) and spec.draft_logits.shape == (3, 4, 7)
    assert spec.sample_col.tolist() == [0, 1, 2, 3] * 3
    assert spec.tree_hidden.shape == (12, HIDDEN)
    with pytest.raises(ValueError, match="ddtree_max_depth"):
        spec._resize_for_depth(5, HIDDEN)  # deeper than the budget it was sized for
