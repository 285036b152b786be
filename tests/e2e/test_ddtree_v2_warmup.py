"""vLLM 0.26's V2 start-up warm-up (``vllm/v1/worker/gpu/warmup.py: warmup_kernels``) through the
DDTree V2 glue, on the CPU.

The warm-up runs a prefill of ``max_num_seqs`` requests (``SamplingParams.for_sampler_warmup()``:
penalties, bad words, logit bias, logprobs), samples (our speculator proposes trees), then a decode
step scheduling ``[0] * num_speculative_tokens`` as every request's drafts, then a step that only
finishes the requests (no tokens: ``execute_model`` returns before our hooks). On the H100 every
V2 tree mode died in that decode step, in the shared GDN tree hook (``_gdn_plan``:
``step.parents`` was None): the V2 glue built its ``TreeVerifyStep`` without the trees' padded
parents and node counts, which the V1 glue sets and the GDN path reads. The decode step is the
first tree verify of the process, so the warm-up was only where every V2 tree step would fail.

Here the warm-up's scheduler outputs are built with vLLM's own classes and the same shapes; the V2
batch is a host stand-in (V2 does not run on the CPU wheel), the drafter's graph pass is stubbed
(it leaves random ``tree_hidden`` rows), and the GDN metadata is what vLLM's builder makes for an
all-decode batch. Checked: the decode step's GDN plan (root-only trees for the warm-up's penalty
requests, chains for requests whose scheduled zeros are not their tree's nodes), the walk (one
token per root-only tree), the drafter inputs, and that the first real request after the warm-up
verifies its own full tree; and the warm-up's GDN layer itself on the torch backend (root-only
trees vs the same blocks as chains). Both overlay modules are loaded from this checkout's
patches/files. Every test here failed with the H100's TypeError before the fix."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("vllm.v1.spec_decode.ddtree")  # the overlays' vLLM side must be there
states = pytest.importorskip("vllm.v1.worker.gpu.states")
dflash = pytest.importorskip("vllm.v1.worker.gpu.spec_decode.dflash.speculator")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from tests.support.v2_stand_ins import (GreedySampler, bare_speculator,  # noqa: E402
                                        host_request_state, num_sampled_and_rejected)

FILES = Path(__file__).resolve().parents[2] / "patches/files/vllm/v1/spec_decode"
MAX_NUM_REQS, BUDGET, DEPTH, TOP_K, VOCAB, HIDDEN = 8, 6, 4, 3, 40, 5
Q = BUDGET + 1  # the runner's decode_query_len
PROMPT_LEN = Q + 1  # warmup_kernels: decode_query_len + 1 prompt tokens


_LOADED: dict = {}


def _load_glue():
    """(V1 glue, V2 glue) from patches/files, loaded once per session; the V2 module is loaded
    while the V1 glue under test stands as ``vllm.v1.spec_decode.ddtree`` (it imports from it)."""
    if not _LOADED:
        installed = sys.modules["vllm.v1.spec_decode.ddtree"]
        mods = []
        try:
            for name, path in (("ddtree_glue_under_test_warmup", FILES / "ddtree.py"),
                               ("ddtree_v2_under_test_warmup", FILES / "ddtree_v2.py")):
                spec = importlib.util.spec_from_file_location(name, path)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
                mods.append(mod)
                if len(mods) == 1:
                    # the Prometheus counters exist once per process: share the installed glue's
                    mod._PROM = installed._prometheus_metrics()
                    sys.modules["vllm.v1.spec_decode.ddtree"] = mod
        finally:
            sys.modules["vllm.v1.spec_decode.ddtree"] = installed
        _LOADED["mods"] = tuple(mods)
    return _LOADED["mods"]


@pytest.fixture
def glue_modules(monkeypatch):
    glue, v2 = _load_glue()
    monkeypatch.delenv("DDTREE_TEST_DRAFT_HOOK", raising=False)
    # the drafter's graph pass needs CUDA; propose only reads what it wrote (tree_hidden)
    monkeypatch.setattr(dflash.DFlashSpeculator, "propose", lambda self, *a, **k: None)
    import vllm.v1.worker.gpu.input_batch as v2_input_batch

    monkeypatch.setattr(v2_input_batch, "get_num_sampled_and_rejected", num_sampled_and_rejected)
    yield glue, v2
    glue._set_current(None)


def _engine(v2, monkeypatch):
    """The runner's pieces the glue touches: V2's own RequestState, our speculator and state."""
    rs = host_request_state(states, monkeypatch, MAX_NUM_REQS, BUDGET, VOCAB)
    runner = SimpleNamespace(
        req_states=rs, speculative_config=SimpleNamespace(
            ddtree_budget=BUDGET, ddtree_top_k=TOP_K, ddtree_chain_seed=True, ddtree_max_depth=DEPTH),
        sampler=GreedySampler(torch.full((MAX_NUM_REQS,), PROMPT_LEN, dtype=torch.long)),
        block_tables=SimpleNamespace(input_block_tables=[torch.zeros(MAX_NUM_REQS, 4)]),
        rejection_sampler=None)
    state = v2.DDTreeV2RunnerState(runner)
    spec = bare_speculator(v2.DDTreeSpeculator, max_num_reqs=MAX_NUM_REQS, budget=BUDGET, depth=DEPTH,
                           top_k=TOP_K, vocab=VOCAB, hidden=HIDDEN, seed=0, random_hidden=False)
    spec.ddtree_state = state
    return runner, rs, state, spec


def _batch(req_ids, q_lens, computed, input_ids, num_draft=None, prefilling=False):
    """A V2 InputBatch stand-in (rows in request-state order: idx_mapping = arange)."""
    n = len(req_ids)
    q_lens = np.asarray(q_lens, dtype=np.int32)
    computed = np.asarray(computed, dtype=np.int64)
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    nd = None if num_draft is None else np.asarray(num_draft, dtype=np.int32)
    num_logits = np.ones(n, dtype=np.int64) if nd is None else nd + 1
    cu = np.concatenate([[0], np.cumsum(num_logits)])
    logits_indices = np.concatenate([qsl[1:][i] - num_logits[i] + np.arange(num_logits[i])
                                     for i in range(n)])
    positions = torch.from_numpy(np.concatenate([computed[i] + np.arange(q_lens[i]) for i in range(n)]))
    return SimpleNamespace(
        req_ids=list(req_ids), num_reqs=n, num_tokens=int(qsl[-1]), num_scheduled_tokens=q_lens,
        is_prefilling_np=np.full(n, prefilling), query_start_loc_np=qsl, num_computed_tokens_np=computed,
        input_ids=input_ids.clone(), positions=positions, logits_indices=torch.from_numpy(logits_indices),
        expanded_idx_mapping=torch.arange(n).repeat_interleave(torch.from_numpy(num_logits)),
        idx_mapping_np=np.arange(n), expanded_local_pos=torch.cat([torch.arange(k) for k in num_logits]),
        num_draft_tokens_per_req=nd, num_draft_tokens=0 if nd is None else int(nd.sum()),
        cu_num_logits_np=cu, cu_num_logits=torch.from_numpy(cu),
        seq_lens=torch.from_numpy(computed + q_lens), idx_mapping=torch.arange(n, dtype=torch.int32))


def _propose(spec, rs, batch, num_sampled):
    return spec.propose(batch, {}, {}, None, None, num_sampled,
                        torch.zeros(batch.num_reqs, dtype=torch.int32),
                        rs.last_sampled_tokens, rs.next_prefill_tokens, None, None)


def _gdn_metadata(batch):
    """What vLLM's GDN builder makes of an all-spec-decode batch (V2's counts >= 0 on every row)."""
    n = batch.num_reqs
    spec_idx = torch.arange(n * Q, dtype=torch.int32).view(n, Q) + 100
    return SimpleNamespace(
        num_spec_decodes=n, spec_state_indices_tensor=spec_idx,
        num_accepted_tokens=torch.ones(n, dtype=torch.int32),
        spec_sequence_masks=torch.ones(n, dtype=torch.bool),
        spec_query_start_loc=torch.from_numpy(batch.query_start_loc_np.astype(np.int32)))


def _warmup_scheduler_outputs(req_ids, params):
    """warmup_kernels' prefill, decode and clean-up scheduler outputs (one KV group)."""
    prompt = list(range(PROMPT_LEN))
    prefill = SchedulerOutput.make_empty()
    prefill.scheduled_new_reqs = [
        NewRequestData.from_request(Request(rid, prompt, params, None), block_ids=([i + 1],),
                                    prefill_token_ids=prompt)
        for i, rid in enumerate(req_ids)]
    prefill.num_scheduled_tokens = {rid: PROMPT_LEN for rid in req_ids}
    prefill.total_num_scheduled_tokens = PROMPT_LEN * len(req_ids)
    cached = CachedRequestData.make_empty()
    cached.req_ids = list(req_ids)
    cached.num_computed_tokens = [PROMPT_LEN] * len(req_ids)
    cached.num_output_tokens = [1] * len(req_ids)
    cached.new_block_ids = [None] * len(req_ids)
    decode = SchedulerOutput.make_empty()
    decode.scheduled_cached_reqs = cached
    decode.num_scheduled_tokens = {rid: Q for rid in req_ids}
    decode.scheduled_spec_decode_tokens = {rid: [0] * BUDGET for rid in req_ids}
    decode.total_num_scheduled_tokens = Q * len(req_ids)
    cleanup = SchedulerOutput.make_empty()
    cleanup.finished_req_ids = set(req_ids)
    return prefill, decode, cleanup


def _prefill_then_propose(state, spec, rs, sched, req_ids, sampled):
    """A prefill step (no drafts: on_positions only records the params), then the speculator."""
    n = len(req_ids)
    for i, rid in enumerate(req_ids):  # V2's add_requests, before the hooks
        rs.req_id_to_index[rid] = i
    batch = _batch(req_ids, [PROMPT_LEN] * n, [0] * n, torch.zeros(PROMPT_LEN * n, dtype=torch.long),
                   prefilling=True)
    state.on_positions(sched, batch)
    rs.last_sampled_tokens[:n, 0] = torch.as_tensor(sampled)
    drafts = _propose(spec, rs, batch, torch.ones(n, dtype=torch.int32))
    rs.draft_tokens[:n] = drafts  # what V2's sample_tokens writes; the next step's input ids
    return drafts


def _decode_batch(rs, req_ids, computed):
    n = len(req_ids)
    roots = rs.last_sampled_tokens[:n, 0]
    input_ids = torch.cat([roots[:, None], rs.draft_tokens[:n]], 1).flatten()
    return _batch(req_ids, [Q] * n, [computed] * n, input_ids, num_draft=[BUDGET] * n)


def _verify(glue, state, batch, sched, seed):
    """The decode step of the V2 runner with our hooks: positions, the GDN layers' plan, the walk,
    the drafter inputs. Returns (step, GDN plan, sampler output)."""
    state.on_positions(sched, batch)
    step = glue.current_tree_step()
    plan = None
    if step is not None:
        plan = glue._gdn_plan(step, _gdn_metadata(batch))
        # the spec rows from the step's host counts are the ones vLLM's device metadata gives
        counts, step.spec_draft_counts = step.spec_draft_counts, None
        assert counts is not None and (counts == BUDGET).all()
        step.gdn_plans.clear()
        device = glue._gdn_plan(step, _gdn_metadata(batch))
        for field in ("parents", "num_nodes", "gather", "real_nodes", "real_tokens", "req_rows", "is_tree"):
            assert torch.equal(getattr(plan, field), getattr(device, field)), field
        step.spec_draft_counts = counts
    logits = torch.randn(batch.num_tokens, VOCAB, generator=torch.Generator().manual_seed(seed))
    out = state.sample(logits, batch)
    assert glue.current_tree_step() is None  # cleared by the commit: no step leaks into later runs
    hidden = torch.randn(batch.num_tokens, HIDDEN)
    state.drafter_inputs(batch, hidden, None)
    return step, plan, out


@pytest.mark.parametrize("params_kind", ["sampler_warmup", "greedy"])
def test_v2_warmup_decode_step_runs_through_the_glue(glue_modules, monkeypatch, params_kind):
    glue, v2 = glue_modules
    runner, rs, state, spec = _engine(v2, monkeypatch)
    req_ids = [f"_warmup_{i}_" for i in range(MAX_NUM_REQS)]
    params = (SamplingParams.for_sampler_warmup() if params_kind == "sampler_warmup"
              else SamplingParams(temperature=0.0, max_tokens=2))
    prefill, decode, cleanup = _warmup_scheduler_outputs(req_ids, params)
    sampled = torch.arange(MAX_NUM_REQS) + 3

    drafts = _prefill_then_propose(state, spec, rs, prefill, req_ids, sampled)
    batch = _decode_batch(rs, req_ids, PROMPT_LEN)
    step, plan, out = _verify(glue, state, batch, decode, seed=1)

    trees = spec.last_trees  # of the decode step's proposal now; the verified ones were root-only
    if params_kind == "sampler_warmup":
        # penalties etc.: root-only trees, verified as trees (no draft to check against zeros)
        assert drafts.shape == (MAX_NUM_REQS, BUDGET)
        assert step is not None and [e.req_index for e in step.entries] == list(range(MAX_NUM_REQS))
        assert plan.is_tree.all() and plan.num_nodes.tolist() == [1] * MAX_NUM_REQS
        assert (plan.parents == -1).all()
        assert out.num_sampled.tolist() == [1] * MAX_NUM_REQS  # the root's token only
        assert out.num_rejected.tolist() == [BUDGET] * MAX_NUM_REQS
    else:
        # the scheduled zeros are not the trees' nodes: each block is verified as the chain of the
        # input ids it holds (the GDN plan's chain rows, no tree entry)
        entries = [] if step is None else step.entries
        if plan is not None:
            chain_rows = [r for r in range(MAX_NUM_REQS) if r not in {e.req_index for e in entries}]
            for r in chain_rows:
                assert plan.parents[r].tolist() == list(range(-1, Q - 1))
        assert all(1 <= int(k) <= Q for k in out.num_sampled)
    assert trees is not None and trees.token_ids.shape[0] == MAX_NUM_REQS

    # clean-up: no tokens scheduled, so V2's execute_model returns before our hooks; then the first
    # real request (greedy) gets a full tree and the next step verifies exactly that tree
    for rid in cleanup.finished_req_ids:  # V2's finish_requests; then it returns before our hooks
        rs.req_id_to_index.pop(rid)
    assert set(state.params) == set(req_ids)
    real = ["real-0"]
    prefill2, _, _ = _warmup_scheduler_outputs(real, SamplingParams(temperature=0.0, max_tokens=8))
    _prefill_then_propose(state, spec, rs, prefill2, real, torch.tensor([7]))
    tree = spec.last_trees
    assert int(tree.num_nodes[0]) > 2
    batch2 = _decode_batch(rs, real, PROMPT_LEN)
    sched2 = SchedulerOutput.make_empty()
    sched2.num_scheduled_tokens = {"real-0": Q}
    sched2.scheduled_spec_decode_tokens = {"real-0": [-1] * BUDGET}  # V2: placeholders
    step2, plan2, out2 = _verify(glue, state, batch2, sched2, seed=2)
    assert set(state.params) == {"real-0"}  # the warm-up's requests are forgotten
    assert step2 is not None and [e.req_index for e in step2.entries] == [0]
    n = int(tree.num_nodes[0])
    assert plan2.is_tree.tolist() == [True] and int(plan2.num_nodes[0]) == n
    assert plan2.parents[0, :n].tolist() == tree.parents[0, :n].tolist()
    assert torch.equal(step2.parents[0, :n], tree.parents[0, :n])
    assert 1 <= int(out2.num_sampled[0]) <= n


def test_gdn_plan_refuses_a_tree_step_without_parents(glue_modules):
    """A runner glue that forgets the trees' arrays gets a ValueError naming them, not a TypeError
    inside the GDN layer."""
    glue, _ = glue_modules
    entry = glue.TreeEntry(0, 0, Q, PROMPT_LEN, torch.full((Q,), -1), 1, torch.eye(Q, dtype=torch.bool),
                           torch.zeros(Q, dtype=torch.long))
    step = glue.TreeVerifyStep([entry], {0: entry}, runner=SimpleNamespace())
    batch = SimpleNamespace(num_reqs=1, query_start_loc_np=np.array([0, Q]))
    with pytest.raises(ValueError, match="parents"):
        glue._gdn_plan(step, _gdn_metadata(batch))


class _GdnLayer:
    """The attributes of vLLM's GDN layer that the tree forward reads (one head, tiny dims)."""

    H, K, V, W = 1, 4, 4, 4
    D = 2 * H * K + H * V

    def __init__(self, g):
        self.conv1d = SimpleNamespace(bias=torch.randn(self.D, generator=g) * 0.1)
        self.activation = "silu"
        self.A_log = torch.randn(self.H, generator=g) * 0.1
        self.dt_bias = torch.randn(self.H, generator=g) * 0.1

    def rearrange_mixed_qkv(self, x):
        q, k, v = torch.split(x, [self.H * self.K, self.H * self.K, self.H * self.V], dim=-1)
        return (q.reshape(1, -1, self.H, self.K), k.reshape(1, -1, self.H, self.K),
                v.reshape(1, -1, self.H, self.V))


def test_v2_warmup_root_only_trees_through_the_gdn_forward(glue_modules, monkeypatch):
    """The warm-up decode's GDN layer on the torch backend: the root-only trees' root rows (the
    only rows that count) equal those of the same blocks verified as plain chains, and the state
    slot of the root is the same."""
    glue, v2 = glue_modules
    runner, rs, state, spec = _engine(v2, monkeypatch)
    req_ids = [f"_warmup_{i}_" for i in range(MAX_NUM_REQS)]
    prefill, decode, _ = _warmup_scheduler_outputs(req_ids, SamplingParams.for_sampler_warmup())
    _prefill_then_propose(state, spec, rs, prefill, req_ids, torch.arange(MAX_NUM_REQS) + 3)
    batch = _decode_batch(rs, req_ids, PROMPT_LEN)
    state.on_positions(decode, batch)
    step = glue.current_tree_step()
    assert step is not None and len(step.entries) == MAX_NUM_REQS
    glue._set_current(None)

    g = torch.Generator().manual_seed(5)
    layer = _GdnLayer(g)
    T = batch.num_tokens
    x = torch.randn(T, layer.D, generator=g)
    a, b = torch.randn(T, layer.H, generator=g), torch.randn(T, layer.H, generator=g)
    weight = torch.randn(layer.D, layer.W, generator=g) * 0.3
    lines = 100 + MAX_NUM_REQS * Q
    conv0 = torch.randn(lines, layer.D, layer.W - 1 + BUDGET, generator=g)
    ssm0 = torch.randn(lines, layer.H, layer.V, layer.K, generator=g) * 0.1
    md = _gdn_metadata(batch)

    outs = []
    for run_step in (step, glue.TreeVerifyStep([], {}, runner=runner)):  # trees, then chains
        glue._set_current(run_step)
        conv, ssm = conv0.clone(), ssm0.clone()
        outs.append((glue.gdn_tree_spec_forward(layer, md, x, a, b, conv, ssm, weight, "torch"), ssm))
    glue._set_current(None)
    assert bool(step.gdn_layers[0][2].is_tree.all())
    (tree_out, tree_ssm), (chain_out, chain_ssm) = outs
    roots = torch.from_numpy(batch.query_start_loc_np[:-1])
    root_slots = md.spec_state_indices_tensor[:, 0].long()
    assert torch.allclose(tree_out[roots], chain_out[roots], atol=1e-5)
    assert torch.allclose(tree_ssm[root_slots], chain_ssm[root_slots], atol=1e-5)
    # the padding nodes are computed by nobody: zero rows, never accepted
    pad = torch.ones(T, dtype=torch.bool)
    pad[roots] = False
    assert not tree_out[pad].any()
