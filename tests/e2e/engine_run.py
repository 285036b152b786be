"""Run one in-process engine configuration (a fresh process per configuration: several engines in
one process trip over vLLM's kernel registration) and print its outputs and a few metrics as one JSON
line. Used by the e2e tests that need engine options the server tests do not cover (a KV cache too
small for all requests, per-request sampling parameters, an abort between two engine steps while the
other requests of the batch have trees in flight).

``cfg["abort"] = {"index": i, "after_steps": k}`` drives the engine step by step (``LLMEngine``) and
aborts request i after k steps; its output then holds the tokens streamed before the abort and
``"aborted": true``."""

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
              logprobs_mode="processed_logits", max_logprobs=4,
              **({"max_num_batched_tokens": cfg["max_num_batched_tokens"]}
                 if cfg.get("max_num_batched_tokens") else {}))
    per_request = cfg.get("params") or [{}] * len(cfg["prompts"])
    params = [SamplingParams(**{"max_tokens": cfg["max_tokens"], "temperature": 0.0, "ignore_eos": True,
                                "logprobs": 4 if cfg.get("logprobs") else None, **extra})
              for extra in per_request]
    rejected = [try_bad_params(llm, cfg["prompts"][0], bad) for bad in cfg.get("bad_params") or []]
    aborted: set[int] = set()
    tree_at_abort = None
    if cfg.get("abort"):
        outs, aborted, tree_at_abort = generate_with_abort(llm, cfg["prompts"], params,
                                                           **cfg["abort"])
    else:
        outs = llm.generate([{"prompt_token_ids": p} for p in cfg["prompts"]], params)
    result = []
    for i, o in enumerate(outs):
        c = o.outputs[0]
        top2 = None
        if c.logprobs:
            top2 = [[(int(t), float(lp.logprob)) for t, lp in d.items()] for d in c.logprobs]
        result.append({"tokens": list(c.token_ids), "top2": top2, "aborted": i in aborted})
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()
               if m.name in ("vllm:num_preemptions", "vllm:spec_decode_num_accepted_tokens",
                             "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens")}
    print("RESULT " + json.dumps({"outputs": result, "metrics": metrics, "ddtree": ddtree_stats(llm),
                                  "tree_in_flight_at_abort": tree_at_abort, "rejected": rejected}))


def try_bad_params(llm, prompt, extra: dict) -> dict:
    """Submit one request with sampling parameters that vLLM must reject on arrival; return how
    the OpenAI server would answer it (status, param, message), or {"accepted": True}."""
    from vllm import SamplingParams
    from vllm.entrypoints.serve.utils.error_response import create_error_response

    try:
        llm.llm_engine.add_request("bad", {"prompt_token_ids": prompt},
                                   SamplingParams(max_tokens=2, temperature=0.0, **extra))
    except ValueError as exc:
        err = create_error_response(exc).error
        return {"status": err.code, "param": err.param, "message": err.message}
    llm.llm_engine.abort_request(["bad"])
    return {"accepted": True}


def generate_with_abort(llm, prompts, params, index: int, after_steps: int):
    """Step the engine; abort request ``index`` after ``after_steps`` steps (between two steps, with
    the drafts of its next tree already scheduled). Returns the latest output of every request."""
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        sp.output_kind = RequestOutputKind.CUMULATIVE  # see the aborted request's partial output
        engine.add_request(str(i), {"prompt_token_ids": p}, sp)
    latest: dict[int, object] = {}
    steps = 0
    tree_at_abort = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            latest[int(out.request_id.split("-")[0])] = out
        steps += 1
        if steps == after_steps:
            if index not in latest or latest[index].finished:
                raise RuntimeError(f"request {index} is not running at step {after_steps}")
            state = _ddtree_state(llm)
            if state is not None:  # internal request ids carry a suffix: "<index>-<random>"
                tree_at_abort = any(k.split("-")[0] == str(index) for k in state.trees)
            engine.abort_request([str(index)])
    return [latest[i] for i in range(len(prompts))], {index}, tree_at_abort


def _ddtree_state(llm):
    """The model runner's DDTreeRunnerState (in-process engine only), or None."""
    try:
        core = llm.llm_engine.engine_core.engine_core
        runner = core.model_executor.driver_worker.worker.model_runner
    except AttributeError:
        return None
    return getattr(runner, "_ddtree", None)


def ddtree_stats(llm) -> dict | None:
    """The DDTree runner's counters (in-process engine only), or None without a tree path."""
    state = _ddtree_state(llm)
    if state is None:
        return None
    s = state.stats
    return {"steps": s.steps, "sibling_taken": s.sibling_taken,
            "accepted_hist": {str(k): v for k, v in sorted(s.accepted_hist.items())},
            "trees_dropped_by_preemption": getattr(s, "trees_dropped_by_preemption", None),
            "trees_dropped_by_finish": getattr(s, "trees_dropped_by_finish", None)}


if __name__ == "__main__":
    main()
