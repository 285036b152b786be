#!/usr/bin/env python3
"""Replay a benchmark sweep's request pattern on one in-process DDTree engine, step by step, and keep
the engine's own traceback if it fails (the API server's log only says EngineDeadError).

    python scripts/ddtree_load_repro.py --out OUT [--models DIR] [--prompts DIR] [--plan gpu-sweep]
                                        [--output-len 96] [--max-num-seqs 64] [--small]

The engine is configured like run_profile's DDTree server (b64-k8 speculative config, per-request
shapes through ``extra_args`` = the server's ``vllm_xargs``, prefix caching off, eager,
max_num_batched_tokens 8192 = vLLM's server default on an H100). Each phase keeps at most
``concurrency`` requests in flight and adds the next one as soon as one finishes (like
``vllm bench serve --max-concurrency``), with one warm-up request first. ``--plan gpu-sweep`` is
the sequence the GPU sweep of 23 Nov 2026 ran before its server died: 16 shapes x c 1, 8 on code,
then b32-k8 on code at c 1..64 (2 x c requests, at least 6 / 8), then prose c=1.

Writes OUT/ddtree_load_repro.json (device, phases with generated / expected tokens and seconds, the
error and its full traceback if any) and prints a short table. ``--small`` shrinks the plan for a
CPU smoke run. Engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a failure's traceback is
this process's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sweep_plan(small: bool) -> list[dict]:
    shapes = [(b, k) for b in (8, 16, 32, 64) for k in (1, 2, 4, 8)]
    conc = (1, 8)
    curve = (1, 2, 4, 8, 16, 32, 64)
    if small:
        shapes, conc, curve = [(8, 1), (64, 8)], (1, 4), (1, 8)
    plan = [{"cat": "code", "c": c, "n": {1: 6, 8: 16}.get(c, 2 * c), "budget": b, "top_k": k}
            for b, k in shapes for c in conc]
    plan += [{"cat": "code", "c": c, "n": max(2 * c, 6 if c <= 2 else 8), "budget": 32, "top_k": 8}
             for c in curve]
    plan.append({"cat": "prose", "c": 1, "n": 6, "budget": 32, "top_k": 8})
    return plan


def run_phase(llm, prompts: list[str], phase: dict, output_len: int, tag: str) -> dict:
    """Up to phase["c"] requests in flight (one warm-up request first); returns token counts."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                        extra_args={"ddtree_budget": phase["budget"], "ddtree_top_k": phase["top_k"]})
    queue = [prompts[0]] + prompts[: phase["n"]]  # warm-up, then the measured requests
    generated = 0
    in_flight: set[str] = set()
    next_i = 0
    warm = True
    steps = 0
    while next_i < len(queue) or in_flight:
        limit = 1 if warm else phase["c"]
        while next_i < len(queue) and len(in_flight) < limit:
            rid = f"{tag}-{next_i}"
            engine.add_request(rid, queue[next_i], sp)
            in_flight.add(rid)
            next_i += 1
        for out in engine.step():
            if out.finished:
                in_flight.discard(out.request_id)
                generated += len(out.outputs[0].token_ids)
        steps += 1
        if warm and not in_flight:
            warm = False
    return {"generated": generated, "expected": len(queue) * output_len, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", type=Path, default=REPO / "models" / "tiny-pair")
    ap.add_argument("--prompts", type=Path, default=REPO / "build" / "bench-prompts")
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import prompt_sets

    if not (args.prompts / "code.jsonl").exists():
        prompt_sets.build(args.prompts)
    prompts = {c: [json.loads(line)["prompt"] for line in open(args.prompts / f"{c}.jsonl")]
               for c in ("code", "prose")}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    doc = {"device": device, "tree_attention": os.environ.get("DDTREE_TREE_ATTENTION", "default"),
           "models": str(args.models), "output_len": args.output_len,
           "max_num_seqs": args.max_num_seqs, "phases": [], "error": None}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "ddtree_load_repro.json"
    from vllm import LLM

    kw = {}
    if torch.cuda.is_available():  # the sweep server's 0.5, or the shared-GPU settings (gpu_share)
        sys.path.insert(0, str(REPO / "scripts"))
        from gpu_share import engine_memory_kwargs, gdn_prefill_config

        kw = dict(engine_memory_kwargs(0.5), additional_config=gdn_prefill_config())
    llm = LLM(model=str(args.models / "target"), enforce_eager=True, max_model_len=4096,
              language_model_only=True, enable_prefix_caching=False, seed=0,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              speculative_config={"method": "dflash_ddtree", "ddtree_budget": 64, "ddtree_top_k": 8,
                                  "model": str(args.models / "drafter")}, **kw)
    print(f"{'phase':28s} {'gen':>7s} {'expected':>8s} {'s':>7s}", flush=True)
    for i, phase in enumerate(sweep_plan(args.small)):
        name = f"{phase['cat']} b{phase['budget']}-k{phase['top_k']} c={phase['c']} n={phase['n']}"
        t0 = time.perf_counter()
        try:
            res = run_phase(llm, prompts[phase["cat"]], phase, args.output_len, f"p{i}")
        except Exception as exc:
            doc["error"] = {"phase": name, "type": type(exc).__name__, "message": str(exc)[:2000],
                            "traceback": traceback.format_exc()}
            path.write_text(json.dumps(doc, indent=1))
            print(f"{name:28s} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            print(traceback.format_exc(), flush=True)
            sys.exit(1)
        res.update(phase=name, seconds=round(time.perf_counter() - t0, 2))
        doc["phases"].append(res)
        path.write_text(json.dumps(doc, indent=1))
        print(f"{name:28s} {res['generated']:7d} {res['expected']:8d} {res['seconds']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
