"""DDTreeSpeculator.propose (patches/files/vllm/v1/spec_decode/ddtree_v2.py) with the V2 runner's own
request-state buffers, as ``GPUModelRunner.sample_tokens`` passes them.

The H100 check (scripts/gpu_ddtree_v2_check.py, every tree mode) died in vLLM's V2 start-up warm-up
(``warmup.py``: a prefill of ``max_num_seqs`` = 8 requests, then ``sample_tokens`` -> ``propose``) with
``root_token_ids: expected a [8] tensor``: V2 keeps ``last_sampled_tokens`` as ``[max_num_reqs, 1]``
and ``next_prefill_tokens`` as ``[max_num_reqs]``, and mixing the two in ``torch.where`` broadcast the
roots to ``[8, 8]``. Here the buffers come from vLLM's ``RequestState`` itself (its pinned / UVA
helpers replaced by plain CPU tensors, as this CPU wheel has no CUDA), so a change of V2's layout shows
up here too. The drafter's CUDA-graph pass (``DFlashSpeculator.propose``) is stubbed: what it leaves
for the tree is ``tree_hidden``, filled with random rows.

The overlay module is loaded from this checkout's patches/files (not the venv's installed copy, which
holds whatever overlays were last applied there)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("vllm.v1.spec_decode.ddtree")  # the overlays must be applied (the V1 glue)
states = pytest.importorskip("vllm.v1.worker.gpu.states")
dflash = pytest.importorskip("vllm.v1.worker.gpu.spec_decode.dflash.speculator")

from ddtree.tree import build_tree  # noqa: E402
from tests.support.v2_stand_ins import bare_speculator, host_request_state  # noqa: E402

OVERLAY = Path(__file__).resolve().parents[2] / "patches/files/vllm/v1/spec_decode/ddtree_v2.py"
MAX_NUM_REQS, BUDGET, DEPTH, TOP_K, VOCAB, HIDDEN = 8, 6, 4, 3, 40, 5


def _load_overlay():
    name = "ddtree_v2_overlay_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, OVERLAY)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _request_state(monkeypatch):
    return host_request_state(states, monkeypatch, MAX_NUM_REQS, BUDGET, VOCAB)


def _speculator(mod, seed):
    return bare_speculator(mod.DDTreeSpeculator, max_num_reqs=MAX_NUM_REQS, budget=BUDGET,
                           depth=DEPTH, top_k=TOP_K, vocab=VOCAB, hidden=HIDDEN, seed=seed,
                           random_hidden=True)


def _propose(spec, rs, num_reqs, num_sampled, idx_mapping):
    batch = SimpleNamespace(num_reqs=num_reqs, idx_mapping=idx_mapping,
                            req_ids=[f"r{i}" for i in range(num_reqs)])
    return spec.propose(batch, {}, {}, None, None, num_sampled,
                        torch.zeros(num_reqs, dtype=torch.int32), rs.last_sampled_tokens,
                        rs.next_prefill_tokens, None, None)


@pytest.fixture
def drafter_pass_stubbed(monkeypatch):
    # the drafter's graph pass needs CUDA; propose only reads what it wrote (tree_hidden)
    monkeypatch.setattr(dflash.DFlashSpeculator, "propose", lambda self, *a, **k: None)


@pytest.mark.parametrize("num_reqs", [MAX_NUM_REQS, 3, 1])
def test_propose_roots_from_v2_request_state(monkeypatch, drafter_pass_stubbed, num_reqs):
    """The warm-up's call (all requests after a prefill: one token sampled each), and mixed batches
    where some requests are still mid-prefill (the root is then the next prompt token)."""
    mod = _load_overlay()
    rs = _request_state(monkeypatch)
    assert rs.last_sampled_tokens.dim() == 2, "V2's layout changed: revisit tree_roots"
    g = torch.Generator().manual_seed(num_reqs)
    rs.last_sampled_tokens.copy_(torch.randint(VOCAB, rs.last_sampled_tokens.shape, generator=g))
    rs.next_prefill_tokens.copy_(torch.randint(VOCAB, rs.next_prefill_tokens.shape, generator=g))
    # the batch's rows map to scattered request-state rows, as in a running engine
    idx_mapping = torch.randperm(MAX_NUM_REQS, generator=g)[:num_reqs].to(torch.int32)
    num_sampled = torch.ones(num_reqs, dtype=torch.int32)
    if num_reqs > 1:
        num_sampled[1] = 0  # a chunked prefill: nothing sampled
    spec = _speculator(mod, seed=num_reqs)

    drafts = _propose(spec, rs, num_reqs, num_sampled, idx_mapping)

    idx = idx_mapping.long()
    want_roots = torch.where(num_sampled > 0, rs.last_sampled_tokens[idx, 0],
                             rs.next_prefill_tokens[idx].long())
    logits = spec.model.compute_logits(spec.tree_hidden[: num_reqs * DEPTH]).view(num_reqs, DEPTH, -1)
    ref = build_tree(root_token_ids=want_roots, budget=BUDGET, top_k=TOP_K, draft_logits=logits.float(),
                     chain_seed=True)
    assert drafts.shape == (num_reqs, BUDGET) and drafts.dtype == torch.int64
    assert torch.equal(spec.last_trees.token_ids[:, 0], want_roots)
    assert torch.equal(spec.last_trees.token_ids, ref.token_ids)
    assert torch.equal(spec.last_trees.parents, ref.parents)
    tokens = ref.token_ids[:, 1:]
    assert torch.equal(drafts, torch.where(tokens >= 0, tokens, want_roots[:, None].expand_as(tokens)))


def test_propose_test_hook_sees_scalar_roots(monkeypatch, drafter_pass_stubbed):
    """The oracle mode (DDTREE_TEST_DRAFT_HOOK) failed on the same roots one step later, in
    ``apply_test_hook``'s ``int(roots[i])``: each request's history must end in its own root."""
    mod = _load_overlay()
    rs = _request_state(monkeypatch)
    num_reqs = MAX_NUM_REQS
    idx_mapping = torch.arange(num_reqs, dtype=torch.int32).flip(0)
    for row in range(num_reqs):  # history of request-state row r: [r, r + 1, r + 2]
        rs.all_token_ids.gpu[row, :3] = torch.arange(row, row + 3)
        rs.total_len.gpu[row] = 3
        rs.last_sampled_tokens[row, 0] = row + 2
    seen = []

    def hook(history, depth, vocab):
        seen.append(list(history))
        return None

    runner = SimpleNamespace(req_states=rs, speculative_config=SimpleNamespace(
        ddtree_budget=BUDGET, ddtree_top_k=TOP_K, ddtree_chain_seed=True, ddtree_max_depth=DEPTH))
    spec = _speculator(mod, seed=7)
    spec.ddtree_state = mod.DDTreeV2RunnerState(runner)
    monkeypatch.setattr(mod, "_test_draft_hook", lambda: hook)

    _propose(spec, rs, num_reqs, torch.ones(num_reqs, dtype=torch.int32), idx_mapping)

    rows = idx_mapping.tolist()
    assert seen == [[r, r + 1, r + 2] for r in rows]  # the root is the history's last token


def test_tree_roots_refuses_other_layouts():
    mod = _load_overlay()
    idx = torch.arange(2, dtype=torch.int32)
    ns = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="last_sampled"):
        mod.tree_roots(ns, torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.int32), idx, 2)
    with pytest.raises(ValueError, match="next_prefill_tokens"):
        mod.tree_roots(ns, torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1, dtype=torch.int32), idx, 2)
    # and build_tree itself still refuses roots of the wrong shape, saying what it got
    with pytest.raises(ValueError, match=r"root_token_ids: expected a \[2\] tensor, got \(2, 2\)"):
        build_tree(root_token_ids=torch.zeros(2, 2, dtype=torch.long), budget=3, top_k=2,
                   draft_logits=torch.randn(2, 2, 5))
