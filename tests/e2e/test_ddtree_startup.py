"""vLLM's engine start (its memory profile run: a dummy forward of max_num_batched_tokens, the
sampler's and rejection sampler's dummy runs, the drafter's dummy run) must not run any of the
DDTree tree-verify work, whose cost grows with budget x requests: a GPU server with budget 64 and
64 sequences (64 x 65 verify tokens) once looked stuck in that phase (docs/ddtree-vllm.md,
"Server start-up time"). Counts calls, no timing. The same engine then generates a few tokens, where
the counted entry points must run (so a probe that counts nothing fails)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.child import run_json_child

REPO = Path(__file__).resolve().parents[2]
PAIR = REPO / "models" / "tiny-pair"
TREE_WORK = ("build_tree", "on_positions", "sample", "drafter_inputs", "_commit", "after_propose",
             "_gdn_plan", "gdn_tree_spec_forward", "cpu_gdn_tree_spec_forward",
             "DDTreeProposer.propose")

pytestmark = pytest.mark.slow


def _probe(cfg: dict) -> dict:
    return run_json_child(Path(__file__).with_name("startup_probe.py"), cfg,
                          {"HF_HUB_OFFLINE": "1"}, timeout=900, what="probe")


def test_engine_start_runs_no_tree_work_at_budget_64_x_64_sequences(log_dir):
    spec = {"method": "dflash_ddtree", "model": str(PAIR / "drafter"), "ddtree_budget": 64,
            "ddtree_top_k": 8}
    r = _probe({"model": str(PAIR / "target"), "spec": spec, "max_num_seqs": 64,
                "prompt": list(range(5, 40)), "max_tokens": 6})
    (log_dir / "ddtree-startup.json").write_text(json.dumps(r, indent=2))
    assert r["num_speculative_tokens"] == 64 and r["max_num_seqs"] == 64, r
    start = r["calls_at_start"]
    assert all(start.get(name, 0) == 0 for name in TREE_WORK), start
    # the profile's dummy runs are sized by vLLM's token budget, not by budget x requests x nodes
    sizes = r["dummy_run_tokens_at_start"]
    assert sizes["target_dummy_run"], r
    assert max(sizes["target_dummy_run"] + sizes["drafter_dummy_run"]) <= r["max_num_batched_tokens"], r
    # ... and the probe does see the tree path once requests run
    after = r["calls_after_generate"]
    for name in ("build_tree", "on_positions", "sample", "DDTreeProposer.propose"):
        assert after.get(name, 0) > 0, after
