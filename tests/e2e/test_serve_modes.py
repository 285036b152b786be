"""`vllm serve` on CPU with the tiny hybrid target: no speculation, flat DFlash and dflash_ddtree
(chain form) must agree token for token (the team's bf16 equality rule), driven by the openai client."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from servertools import CPU_TINY_FLAGS, VllmServer, spec_decode_stats, speculative_args
from tests.support.equality import compare_greedy
from tests.support.prompts import token_prompts

pytestmark = pytest.mark.slow

MAX_TOKENS = 32
PROMPT_LENGTHS = [10, 13, 17, 24, 31, 40, 48, 57, 64, 75, 90, 100, 128, 150, 180, 200, 230, 256,
                  300, 350, 400, 480]
MODES = {
    "dflash": {"method": "dflash", "num_speculative_tokens": 15},
    "ddtree": {"method": "dflash_ddtree", "ddtree_budget": 15, "ddtree_top_k": 1},
}


def _complete_all(server: VllmServer, prompts, logprobs: int | None):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", timeout=300)
    model = client.models.list().data[0].id

    def one(p):
        r = client.completions.create(
            model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=logprobs,
            extra_body={"ignore_eos": True, "return_token_ids": True,
                        "return_tokens_as_token_ids": True})
        c = r.choices[0]
        top2 = None
        if logprobs:
            top2 = [[(int(k.split(":", 1)[1]), v) for k, v in d.items()]
                    for d in c.logprobs.top_logprobs]
        return list(c.token_ids), top2

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, prompts))


@pytest.fixture(scope="module")
def prompts(tiny_models):
    return token_prompts(tiny_models / "tokenizer", PROMPT_LENGTHS)


@pytest.fixture(scope="module")
def reference(tiny_models, prompts, log_dir):
    args = CPU_TINY_FLAGS + ["--logprobs-mode", "raw_logits", "--max-logprobs", "4"]
    with VllmServer(tiny_models / "target", args, log_dir / "serve-baseline.log") as srv:
        return _complete_all(srv, prompts, logprobs=2)


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_equals_target_alone(mode, tiny_models, prompts, reference, log_dir):
    spec = dict(MODES[mode], model=str(tiny_models / "drafter"))
    log = log_dir / f"serve-{mode}.log"
    with VllmServer(tiny_models / "target", CPU_TINY_FLAGS + speculative_args(spec), log) as srv:
        outs = _complete_all(srv, prompts, logprobs=None)
        stats = spec_decode_stats(srv.metrics())
    verdicts = [compare_greedy(ref, top2, out) for (ref, top2), (out, _) in zip(reference, outs)]
    report = {"mode": mode, "spec": stats,
              "identical": sum(v.identical for v in verdicts), "prompts": len(verdicts),
              "ties": [v.detail for v in verdicts if not v.identical]}
    (log_dir / f"equality-{mode}.json").write_text(json.dumps(report, indent=2))
    bad = [f"prompt {i} (len {len(p)}): {v.detail}"
           for i, (p, v) in enumerate(zip(prompts, verdicts)) if not v.ok]
    assert not bad, "\n".join(bad)
    assert stats["drafts"] > 0, f"{mode}: no speculative steps were run: {stats}"
    if mode == "ddtree":
        assert "tree verify is not available in this build" in srv.log_text()
