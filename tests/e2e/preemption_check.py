"""One engine configuration per process (run by test_ddtree_preemption.py): greedy outputs and
preemption count for the tiny target, with or without DDTree, under a KV cache that is too small for
all requests at once. Prints one JSON line."""

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
              num_gpu_blocks_override=cfg["blocks"], disable_log_stats=False,
              logprobs_mode="raw_logits", max_logprobs=4)
    params = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0, ignore_eos=True,
                            logprobs=2 if cfg.get("logprobs") else None)
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
