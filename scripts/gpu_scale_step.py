"""Decode-step cost of DDTree vs flat DFlash vs the target alone at the product's model size, with
random weights: how much of DDTree's extra acceptance a real-sized hybrid target keeps.

    PYTHONPATH=/opt/vllm-site python3 scripts/gpu_scale_step.py OUTDIR [--shape qwen3.5-27b]
        [--modes ddtree,dflash,target,ddtree-b16k4] [--batches 1,4,8] [--budget-s 900]

The tiny pair (9 M parameters) is launch-bound, so its tok/s say little about a 27 B target, whose
forward reads ~54 GB of bf16 weights per step. No real weights can be downloaded here, so this
writes configs of the product's shape (``SHAPES``: the published Qwen3.5-27B text dims and its
z-lab DFlash drafter's) and lets vLLM fill them with random weights (``load_format="dummy"``, no
files; ``skip_tokenizer_init``: prompts and outputs are token ids). Each mode starts one engine
as ``vllm serve`` runs it (CUDA graphs, FlashInfer tree attention) in a fresh process and times
decode steps (``LLMEngine.step``) at each batch size, like ``gpu_ddtree_profile.py``.

What it measures and what it does not: random drafts are rejected, so tokens/step is ~1 and the
acceptance length (AL) must come from elsewhere (the tiny pair's, or published ones). Per batch
size the result is the step time of each mode; DDTree beats flat DFlash where its AL exceeds
flat DFlash's by more than the ratio of their step times (``break_even_al_ratio``), and beats the
target alone where its AL exceeds its step time over the target's. With more accepted tokens the
commit and the drafter's context grow a little; that is not covered here.

Writes OUTDIR/scale_step.json and prints a table; every record names the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_share import gdn_prefill_config  # noqa: E402

# Shapes: (target text config, drafter config). Qwen3.5-27B: 64 layers, 3 Gated DeltaNet layers per
# full-attention layer, 24 query / 4 kv heads of 256 (full attention), 16 key / 48 value heads of
# 128 (GDN), float32 recurrent state; drafter: 5 Qwen3 layers reading target layers 1, 16, 31,
# 46, 61, block 16. "tiny" is the same structure at toy size (CPU smoke runs and tests).
SHAPES = {
    "qwen3.5-27b": {
        "target": dict(vocab_size=248320, hidden_size=5120, intermediate_size=17408,
                       num_hidden_layers=64, num_attention_heads=24, num_key_value_heads=4,
                       head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48,
                       linear_key_head_dim=128, linear_value_head_dim=128, rope_theta=10_000_000.0),
        "drafter": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=5,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                        target_layer_ids=[1, 16, 31, 46, 61]),
    },
    "tiny": {
        "target": dict(vocab_size=4096, hidden_size=256, intermediate_size=768,
                       num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=64, linear_value_head_dim=64, rope_theta=10_000.0),
        "drafter": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        target_layer_ids=[1, 4, 6]),
    },
}
FULL_ATTENTION_EVERY = 4  # Qwen3.5: layers 3, 7, 11, ... are full attention, the rest GDN
BLOCK_SIZE = 16


def target_config(shape: str) -> dict:
    t = SHAPES[shape]["target"]
    n = t["num_hidden_layers"]
    layer_types = ["full_attention" if (i + 1) % FULL_ATTENTION_EVERY == 0 else "linear_attention"
                   for i in range(n)]
    text = {
        "model_type": "qwen3_5_text", "vocab_size": t["vocab_size"], "hidden_size": t["hidden_size"],
        "intermediate_size": t["intermediate_size"], "num_hidden_layers": n,
        "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_key_value_heads"], "head_dim": t["head_dim"],
        "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": t["rope_theta"],
                            "partial_rotary_factor": 0.25},
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": t["linear_key_head_dim"],
        "linear_value_head_dim": t["linear_value_head_dim"],
        "linear_num_key_heads": t["linear_num_key_heads"],
        "linear_num_value_heads": t["linear_num_value_heads"], "layer_types": layer_types,
        "mamba_ssm_dtype": "float32", "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
        "dtype": "bfloat16",
    }
    v = t["vocab_size"]
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
        "text_config": text,
        # language_model_only=True skips the vision tower; its config must still parse
        "vision_config": {"model_type": "qwen3_5_vision", "depth": 1, "hidden_size": 32,
                          "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": t["hidden_size"], "patch_size": 16,
                          "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                          "num_position_embeddings": 64},
        "image_token_id": v - 1, "video_token_id": v - 2, "vision_start_token_id": v - 3,
        "vision_end_token_id": v - 4, "tie_word_embeddings": False, "dtype": "bfloat16",
        "eos_token_id": 0,
    }


def drafter_config(shape: str) -> dict:
    t, d = SHAPES[shape]["target"], SHAPES[shape]["drafter"]
    if max(d["target_layer_ids"]) >= t["num_hidden_layers"]:
        raise ValueError(f"{shape}: drafter reads a target layer past {t['num_hidden_layers']}")
    return {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "vocab_size": t["vocab_size"],
        "hidden_size": d["hidden_size"], "intermediate_size": d["intermediate_size"],
        "num_hidden_layers": d["num_hidden_layers"], "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d["num_key_value_heads"], "head_dim": d["head_dim"],
        "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
        "attention_bias": False, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": t["rope_theta"]},
        "dtype": "bfloat16", "block_size": BLOCK_SIZE, "target_hidden_size": t["hidden_size"],
        "num_target_layers": t["num_hidden_layers"],
        "dflash_config": {"mask_token_id": 1, "target_layer_ids": d["target_layer_ids"]},
        "eos_token_id": 0,
    }


def write_pair(root: Path, shape: str) -> Path:
    """``root/target`` and ``root/drafter``: config files only (weights are vLLM's dummy init)."""
    for name, cfg in (("target", target_config(shape)), ("drafter", drafter_config(shape))):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return root


def mode_configs(pair: Path) -> dict[str, dict]:
    drafter = str(pair / "drafter")
    return {
        "target": None,
        "dflash": {"method": "dflash", "model": drafter, "num_speculative_tokens": BLOCK_SIZE - 1},
        # the product's default tree (config defaults: budget 32, top_k 8)
        "ddtree": {"method": "dflash_ddtree", "model": drafter},
        "ddtree-b16k4": {"method": "dflash_ddtree", "model": drafter, "ddtree_budget": 16,
                         "ddtree_top_k": 4},
    }


def tokens_per_request(spec: dict | None) -> int:
    """Tokens one decode request schedules per step in a mode (1 + drafts)."""
    if spec is None:
        return 1
    if spec["method"] == "dflash_ddtree":
        from vllm.config.ddtree import DEFAULT_DDTREE_BUDGET  # the overlay's config module

        return 1 + spec.get("ddtree_budget", DEFAULT_DDTREE_BUDGET)
    return 1 + spec["num_speculative_tokens"]


def break_even(report: dict) -> dict:
    """Per batch size: each DDTree mode's step time over flat DFlash's and over the target's, i.e.
    the AL ratio DDTree needs to beat each (AL_ddtree / AL_dflash, resp. AL_ddtree / 1)."""
    modes = report.get("modes", {})
    out: dict = {}
    for mode, rec in modes.items():
        if not mode.startswith("ddtree"):
            continue
        for c, step in rec.get("steps", {}).items():
            row = out.setdefault(mode, {}).setdefault(c, {})
            for base in ("dflash", "target"):
                b = modes.get(base, {}).get("steps", {}).get(c, {}).get("ms_per_step_median")
                m = step.get("ms_per_step_median")
                if b and m:
                    row[f"vs_{base}"] = round(m / b, 3)
    return out


# ----------------------------------------------------------------------------- child: one engine


def run_child(cfg: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import torch
    from vllm import LLM, SamplingParams

    from gpu_ddtree_profile import _timed_steps, _wrap_glue, profiled_steps

    cuda = torch.cuda.is_available()
    if cfg.get("profile_steps") and (cfg["spec"] or {}).get("method") == "dflash_ddtree":
        _wrap_glue()  # ddtree::* ranges in the profile
    batches = cfg["batches"]
    t0 = time.monotonic()
    kwargs: dict = {}
    if cuda:
        kwargs = dict(gpu_memory_utilization=cfg["mem_util"], additional_config=gdn_prefill_config(),
                      compilation_config={"max_cudagraph_capture_size": cfg["max_graph_tokens"]})
    llm = LLM(model=cfg["target"], load_format="dummy", skip_tokenizer_init=True,
              enforce_eager=not cuda, max_model_len=cfg["max_model_len"], language_model_only=True,
              enable_prefix_caching=False, seed=0, max_num_seqs=max(batches),
              speculative_config=cfg["spec"], disable_log_stats=True, **kwargs)
    startup_s = time.monotonic() - t0
    engine = llm.llm_engine
    prompts = cfg["prompts"]
    llm.generate([{"prompt_token_ids": p} for p in prompts[: max(batches)]],
                 SamplingParams(max_tokens=cfg["warmup_tokens"], temperature=0.0, ignore_eos=True,
                                detokenize=False), use_tqdm=False)
    out: dict = {"startup_s": round(startup_s, 1),
                 "device": torch.cuda.get_device_name() if cuda else "cpu", "steps": {}}
    if cuda:  # weights + KV cache + everything else torch holds (the log has the weights alone)
        out["gpu_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 1)
    for c in batches:
        if time.time() > cfg["deadline"]:
            out["steps"][f"c{c}"] = {"error": "skipped: budget spent"}
            continue
        out["steps"][f"c{c}"] = _timed_steps(engine, prompts[:c], cfg["max_tokens"], cfg["steps"],
                                             f"c{c}")
    if cfg.get("profile_steps") and time.time() < cfg["deadline"]:
        out["profile"], prof = profiled_steps(engine, prompts[:1], cfg["max_tokens"],
                                              cfg["profile_steps"], cuda)
        if cfg.get("trace"):
            prof.export_chrome_trace(cfg["trace"])
    return out


# ----------------------------------------------------------------------------- driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", default="qwen3.5-27b", choices=sorted(SHAPES))
    ap.add_argument("--modes", default="ddtree,dflash,target,ddtree-b16k4")
    ap.add_argument("--batches", default="1,4,8", help="decode batch sizes timed per mode")
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--mem-util", type=float, default=0.92)
    ap.add_argument("--budget-s", type=float, default=900.0,
                    help="wall budget of the whole run; a mode past it is skipped or stopped")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="c1 steps of each mode under torch.profiler (0: none)")
    ap.add_argument("--trace", action="store_true", help="also write trace-<mode>.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from gpu_ddtree_check import child_env, report_failure, run_mode_process, serve_child

    if args.child:
        return serve_child(args.child, run_child)

    batches = sorted({int(b) for b in args.batches.split(",") if b})
    if not batches or batches[0] < 1:
        ap.error("--batches: positive integers")
    pair = write_pair(args.out / "pair", args.shape)
    configs = mode_configs(pair)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in configs]
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {', '.join(configs)}")
    vocab = SHAPES[args.shape]["target"]["vocab_size"]
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(2, vocab - 8) for _ in range(args.prompt_len)]
               for _ in range(max(batches))]
    run_start = time.time()
    report: dict = {"shape": args.shape, "shape_dims": SHAPES[args.shape], "batches": batches,
                    "steps": args.steps, "prompt_len": args.prompt_len, "weights": "random (dummy)",
                    "modes": {}}
    for mode in modes:
        remaining = run_start + args.budget_s - time.time()
        if remaining < 30:
            report["modes"][mode] = {"error": "skipped: budget spent"}
            continue
        cfg = {"spec": configs[mode], "target": str(pair / "target"), "prompts": prompts,
               "batches": batches, "steps": args.steps,
               # enough that no request ends inside the timed steps (<= 16 tokens per step)
               "max_tokens": BLOCK_SIZE * (args.steps + 6), "warmup_tokens": 24,
               "max_model_len": args.prompt_len + BLOCK_SIZE * (args.steps + 8) + 64,
               "mem_util": args.mem_util,
               # every verify block of the largest batch in graphs, and no more sizes than that
               "max_graph_tokens": max(batches) * tokens_per_request(configs[mode]) + 8,
               "deadline": run_start + args.budget_s - 20, "profile_steps": args.profile_steps,
               "trace": str(args.out / f"trace-{mode}.json") if args.trace else None}
        log = args.out / f"scale-{mode}.log"
        t0 = time.monotonic()
        res, status = run_mode_process(__file__, args.out, mode, cfg, child_env(), log, remaining)
        rec: dict = {"wall_s": round(time.monotonic() - t0, 1), "spec": configs[mode]}
        if res is None:
            rec["error"] = report_failure(mode, status, log)
        else:
            rec.update(res)
            report["device"] = rec.get("device")
        report["modes"][mode] = rec
        report["break_even_al_ratio"] = break_even(report)
        (args.out / "scale_step.json").write_text(json.dumps(report, indent=2))
        print(f"[{mode}] {json.dumps(rec.get('steps', rec.get('error')))}", flush=True)
    print_table(report)
    return 0 if all("error" not in r for r in report["modes"].values()) else 1


def print_table(report: dict) -> None:
    batches = report["batches"]
    print(f"\nDecode step, {report['shape']} shape, random weights, on {report.get('device')} "
          f"(median ms per engine step; {report['steps']} steps)")
    print(f"{'mode':<14}" + "".join(f"{'c' + str(c):>10}" for c in batches))
    for mode, rec in report["modes"].items():
        steps = rec.get("steps", {})
        print(f"{mode:<14}" + "".join(
            f"{steps.get(f'c{c}', {}).get('ms_per_step_median', '-')!s:>10}" for c in batches))
    for mode, rows in report.get("break_even_al_ratio", {}).items():
        print(f"{mode}: AL ratio needed to beat flat DFlash / the target: " + ", ".join(
            f"c{c[1:]} {r.get('vs_dflash', '-')} / {r.get('vs_target', '-')}"
            for c, r in rows.items()))


if __name__ == "__main__":
    sys.exit(main())
