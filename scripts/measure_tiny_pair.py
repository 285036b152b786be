#!/usr/bin/env python3
"""Measure the trained tiny pair with the real vLLM: flat-DFlash acceptance length on held-out
standard-library files, and greedy equality with the target alone.

    python scripts/measure_tiny_pair.py [--models models/tiny-pair] [--prompts 20] [--max-tokens 128]

Starts ``vllm serve`` twice on 127.0.0.1 (target alone with raw-logit logprobs; target + flat DFlash,
num_speculative_tokens 15), sends the same token-id prompts through the ``openai`` client, reads
``vllm:spec_decode_*`` from /metrics and writes ``benchmarks/results/<device>/tiny_pair.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servertools import (CPU_TINY_FLAGS, REPO, VllmServer, greedy_completions,  # noqa: E402
                         spec_decode_stats, speculative_args)
import train_tiny_pair as ttp  # noqa: E402

DEFAULT_MODELS = REPO / "models" / "tiny-pair"


def heldout_prompts(tokenizer_json: Path, n: int, min_len: int = 48, max_len: int = 256,
                    stdlib: Path | None = None) -> list[list[int]]:
    """``n`` token-id prompts, each the start of a different held-out file (deterministic): lengths
    spread over [min_len, max_len], files taken in path order, skipping files that are too short."""
    import sysconfig

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    root = stdlib or Path(sysconfig.get_paths()["stdlib"])
    _, held = ttp.split_corpus(root)
    # the same selection as the training script's engine-like acceptance
    return ttp.file_start_prompts(lambda text: tok.encode(text).ids, held, n, min_len, max_len)


def complete_all(server: VllmServer, prompts, max_tokens: int, logprobs: int | None):
    """Greedy completions (token ids, and the top raw logits per position when asked)."""
    return greedy_completions(server.base_url, prompts, max_tokens, logprobs)


def dflash_spec(models: Path) -> dict:
    return {"method": "dflash", "model": str(models / "drafter"), "num_speculative_tokens": 15}


#: in-process engine: a server starts in seconds instead of spawning an engine process
FAST_START_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def run_pair(models: Path, prompts, max_tokens: int, log_dir: Path):
    """(reference outputs with top-2, dflash outputs, dflash spec stats, seconds per mode)."""
    args = CPU_TINY_FLAGS + ["--logprobs-mode", "raw_logits", "--max-logprobs", "4"]
    t0 = time.monotonic()
    with VllmServer(models / "target", args, log_dir / "pair-target.log",
                    env=FAST_START_ENV) as srv:
        t1 = time.monotonic()
        ref = complete_all(srv, prompts, max_tokens, logprobs=2)
        t_ref = time.monotonic() - t1
    with VllmServer(models / "target", CPU_TINY_FLAGS + speculative_args(dflash_spec(models)),
                    log_dir / "pair-dflash.log", env=FAST_START_ENV) as srv:
        t1 = time.monotonic()
        outs = complete_all(srv, prompts, max_tokens, logprobs=None)
        t_spec = time.monotonic() - t1
        stats = spec_decode_stats(srv.metrics())
    return ref, outs, stats, {"target_alone_s": round(t_ref, 2), "dflash_s": round(t_spec, 2),
                              "total_s": round(time.monotonic() - t0, 1)}


def main() -> int:
    from tests.support.equality import compare_greedy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device-dir", default="cpu-amd-epyc",
                    help="folder under benchmarks/results (cpu-<model>)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    prompts = heldout_prompts(args.models / "target" / "tokenizer.json", args.prompts)
    log_dir = REPO / "build" / "pair-logs"
    ref, outs, stats, secs = run_pair(args.models, prompts, args.max_tokens, log_dir)
    verdicts = [compare_greedy(r, t2, o) for (r, t2), (o, _) in zip(ref, outs)]
    train = json.loads((args.models / "train_report.json").read_text())
    result = {
        "device": f"cpu: {ttp.cpu_model_name()}",
        "what": "flat DFlash (num_speculative_tokens 15, greedy) on the trained tiny pair, vLLM 0.26 CPU",
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "max_tokens": args.max_tokens,
        "prompt_source": "first tokens of held-out standard-library .py files (split rule in "
                         "scripts/train_tiny_pair.py)",
        "spec_decode": stats,
        "acceptance_length": round(stats["acceptance_length"], 3),
        "greedy_equality": {"identical": sum(v.identical for v in verdicts),
                            "ok_under_tie_rule": sum(v.ok for v in verdicts),
                            "details": [v.detail for v in verdicts if not v.identical]},
        "wall_seconds": secs,
        "training": {k: train[k] for k in ("device", "target", "drafter") if k in train},
    }
    out = args.out or REPO / "benchmarks" / "results" / args.device_dir / "tiny_pair.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    per_pos = " ".join(f"{v:.0f}" for v in stats["accepted_per_position"])
    print(f"| prompts | drafts | accepted | acceptance length | identical | ok |\n"
          f"| {len(prompts)} | {stats['drafts']:.0f} | {stats['accepted_tokens']:.0f} | "
          f"{stats['acceptance_length']:.2f} | {result['greedy_equality']['identical']} | "
          f"{result['greedy_equality']['ok_under_tie_rule']} |")
    print(f"accepted per position: {per_pos}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
