"""Per-request DDTree tree shapes (``vllm_xargs`` ddtree_budget / ddtree_top_k) in one engine.

One batch mixes requests with the server's shape (budget 16, top_k 4), flat DFlash (budget = L = 15,
top_k 1), a small tree (4, 2), a chain of the server's budget (top_k 1) and a single draft (budget 1).
Every output must equal the target alone (bf16 tie rule); smaller budgets must schedule fewer drafts
(not padding up to the server's 16); bad values are rejected on arrival with a 400 naming the field,
and a server without DDTree rejects the keys too. Trained tiny pair + the oracle drafter in ``mixed``
mode (true token ranked second at odd depths), so trees with top_k >= 2 take siblings."""

from __future__ import annotations

import json

import pytest

from tests.e2e.test_ddtree_preemption import PAIR, oracle_env, run_engine
from tests.support.equality import compare_greedy
from tests.support.prompts import token_prompts

pytestmark = pytest.mark.slow
SERVER_BUDGET, SERVER_TOP_K = 16, 4
SHAPES = [{}, {"ddtree_budget": 15, "ddtree_top_k": 1}, {"ddtree_budget": 4, "ddtree_top_k": 2},
          {"ddtree_top_k": 1}, {"ddtree_budget": 1}]
BAD = [  # (extra_args, field named in the answer)
    ({"ddtree_budget": SERVER_BUDGET + 1}, "ddtree_budget"),
    ({"ddtree_top_k": 0}, "ddtree_top_k"),
    ({"ddtree_budget": 2.5}, "ddtree_budget"),
    ({"ddtree_top_k": "2"}, "ddtree_top_k"),
    ({"ddtree_topk": 2}, "ddtree_topk"),
]
MAX_TOKENS = 40


def test_mixed_request_shapes_equal_target_alone(log_dir):
    prompts = token_prompts(PAIR / "target", [150, 130, 110, 90, 70])
    base = {"model": str(PAIR / "target"), "prompts": prompts, "max_tokens": MAX_TOKENS,
            "max_model_len": 512}
    ref = run_engine(dict(base, logprobs=True, bad_params=[{"extra_args": {"ddtree_budget": 4}}]))
    oracle = log_dir / "oracle-request-shapes.json"
    oracle.write_text(json.dumps([{"prompt": p, "completion": o["tokens"]}
                                  for p, o in zip(prompts, ref["outputs"])]))
    spec = {"method": "dflash_ddtree", "model": str(PAIR / "drafter"), "ddtree_budget": SERVER_BUDGET,
            "ddtree_top_k": SERVER_TOP_K, "ddtree_chain_seed": False}
    tree = run_engine(dict(base, spec=spec, params=[{"extra_args": s} if s else {} for s in SHAPES],
                           bad_params=[{"extra_args": b} for b, _ in BAD]), env=oracle_env(oracle))
    verdicts = [compare_greedy(r["tokens"], r["top2"], t["tokens"])
                for r, t in zip(ref["outputs"], tree["outputs"])]
    report = {"shapes": SHAPES, "metrics": tree["metrics"], "ddtree": tree["ddtree"],
              "rejected": tree["rejected"], "rejected_without_ddtree": ref["rejected"],
              "verdicts": [v.detail for v in verdicts]}
    (log_dir / "request-shapes.json").write_text(json.dumps(report, indent=2))

    assert all(v.ok for v in verdicts), report["verdicts"]
    assert all(len(t["tokens"]) == MAX_TOKENS for t in tree["outputs"]), report
    # trees were verified and siblings accepted (the top_k >= 2 requests)
    assert tree["ddtree"]["steps"] > 0 and tree["ddtree"]["sibling_taken"] > 0, report
    # smaller budgets scheduled fewer drafts: with padding to the server's shape every verify
    # block would carry exactly 16 drafts
    drafts = tree["metrics"]["vllm:spec_decode_num_drafts"]
    draft_tokens = tree["metrics"]["vllm:spec_decode_num_draft_tokens"]
    assert drafts > 0 and drafts <= draft_tokens < SERVER_BUDGET * drafts, report
    # bad values: a 400 naming the field, nothing run
    for (bad, field), answer in zip(BAD, tree["rejected"]):
        assert answer.get("status") == 400, (bad, answer)
        assert answer["param"] == f"vllm_xargs.{field}" and field in answer["message"], (bad, answer)
    (no_tree,) = ref["rejected"]
    assert no_tree.get("status") == 400 and "dflash_ddtree" in no_tree["message"], no_tree
