"""DDTree in-process engine checks against the target alone (bf16 tie rule), oracle drafter so that
trees are accepted along siblings:

* KV pressure: a KV cache too small for 8 growing requests (the target alone is preempted);
* sampling parameters that need vLLM's history-aware logits processing (repetition penalty,
  min_tokens) and logprobs: those requests run without drafts through vLLM's own sampler, the others
  keep their trees, and logprobs are returned for committed tokens only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.equality import compare_greedy
from tests.support.prompts import token_prompts

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# 32-token pages (the hybrid page size here), of which 16 hold the 8 requests' GDN states: 20 pages
# = 640 tokens of KV, which admits all 8 short prompts but not their growth to ~150 tokens each.
BLOCKS = 36


def run_engine(cfg: dict, env: dict | None = None) -> dict:
    e = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("engine_run.py")),
                        json.dumps(cfg)], capture_output=True, text=True, env=e, timeout=1200,
                       cwd=REPO)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, f"engine run failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(line[len("RESULT "):])


def test_ddtree_greedy_under_kv_pressure(tiny_models, log_dir):
    prompts = token_prompts(tiny_models / "tokenizer", [31, 29, 27, 25, 23, 21, 19, 17])
    base = {"model": str(tiny_models / "target"), "prompts": prompts, "max_tokens": 120,
            "blocks": BLOCKS, "max_model_len": 512}
    ref = run_engine(dict(base, logprobs=True))
    oracle = log_dir / "oracle-preemption.json"
    oracle.write_text(json.dumps([{"prompt": p, "completion": o["tokens"]}
                                  for p, o in zip(prompts, ref["outputs"])]))
    spec = {"method": "dflash_ddtree", "model": str(tiny_models / "drafter"), "ddtree_budget": 8,
            "ddtree_top_k": 4}
    # spec decode reserves lookahead slots, so the DDTree engine gets a smaller cache to be sure
    # that it runs out too
    tree = run_engine(dict(base, spec=spec, blocks=BLOCKS - 8), env={
        "DDTREE_TEST_DRAFT_HOOK": "tests.support.oracle_drafter:draft_logits",
        "DDTREE_ORACLE_MODE": "mixed", "DDTREE_ORACLE_FILE": str(oracle)})
    report = {"metrics_ref": ref["metrics"], "metrics_tree": tree["metrics"]}
    verdicts = [compare_greedy(r["tokens"], r["top2"], t["tokens"])
                for r, t in zip(ref["outputs"], tree["outputs"])]
    report["verdicts"] = [v.detail for v in verdicts]
    (log_dir / "preemption.json").write_text(json.dumps(report, indent=2))
    assert all(v.ok for v in verdicts), report["verdicts"]
    # the cache is too small for this workload: the target alone is preempted. (The DDTree engine
    # with a smaller cache still was not, in this configuration: vLLM admits fewer spec-decode
    # requests at once; so preemption of tree requests is not forced here - see docs/ddtree-vllm.md.)
    assert (ref["metrics"].get("vllm:num_preemptions") or 0) > 0, report
    assert (tree["metrics"].get("vllm:spec_decode_num_accepted_tokens") or 0) > 0, report


def test_penalties_min_tokens_and_logprobs(tiny_models, log_dir):
    prompts = token_prompts(tiny_models / "tokenizer", [30, 45, 60, 75])
    # logprobs (processed logits: after the penalty) on every request, for the tie rule
    params = [{"logprobs": 4}, {"repetition_penalty": 1.5, "logprobs": 4}, {"logprobs": 4},
              {"min_tokens": 8, "logprobs": 4}]
    base = {"model": str(tiny_models / "target"), "prompts": prompts, "max_tokens": 24,
            "params": params}
    ref = run_engine(base)
    oracle = log_dir / "oracle-params.json"
    oracle.write_text(json.dumps([{"prompt": p, "completion": o["tokens"]}
                                  for p, o in zip(prompts, ref["outputs"])]))
    spec = {"method": "dflash_ddtree", "model": str(tiny_models / "drafter"), "ddtree_budget": 16,
            "ddtree_top_k": 4}
    tree = run_engine(dict(base, spec=spec), env={
        "DDTREE_TEST_DRAFT_HOOK": "tests.support.oracle_drafter:draft_logits",
        "DDTREE_ORACLE_MODE": "mixed", "DDTREE_ORACLE_FILE": str(oracle)})
    for i, (r, t) in enumerate(zip(ref["outputs"], tree["outputs"])):
        v = compare_greedy(r["tokens"], r["top2"], t["tokens"])
        assert v.ok, f"request {i} ({params[i]}): {v.detail}"
        # logprobs of the committed tokens, within bf16 noise of the target alone, up to any tie
        end = v.first_divergence if v.first_divergence is not None else len(r["tokens"])
        for k in range(end):
            tok, lr, lt = r["tokens"][k], dict(r["top2"][k]), dict(t["top2"][k])
            assert tok in lt and abs(lr[tok] - lt[tok]) < 0.1, (i, k, tok, lr, lt)
    assert (tree["metrics"].get("vllm:spec_decode_num_accepted_tokens") or 0) > 0, tree["metrics"]
