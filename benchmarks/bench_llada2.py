#!/usr/bin/env python3
"""LLaDA2 block-decode throughput and tokens per forward at several concurrencies (in-process engine).

    python benchmarks/bench_llada2.py --model build/tiny-llada2 --concurrency 1 2 4 8
    python benchmarks/bench_llada2.py --mini-shaped --concurrency 1 2 4 8 16 32   # GPU

``--mini-shaped`` serves LLaDA2.0-mini's shapes (20 layers, hidden 2048, 256 experts top-8, vocab
157184; bf16) with vLLM's dummy weights made on the device (a config-only folder; seconds, not a
32 GB checkpoint) and random routers, so the forward cost is real; ``--reduced`` shrinks the same
family for a CPU dry run. Random weights never reach the 0.95 threshold, so the benchmark fixes the
step count instead: threshold 1.0 and ``--steps`` steps per block (block_length / steps tokens per
denoising forward). Prints a table and saves JSON under benchmarks/results/<device>/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

MINI = dict(hidden_size=2048, intermediate_size=5120, num_hidden_layers=20, num_attention_heads=16,
            num_key_value_heads=4, head_dim=128, num_experts=256, num_experts_per_tok=8,
            n_group=8, topk_group=4, moe_intermediate_size=512, num_shared_experts=1,
            first_k_dense_replace=1, routed_scaling_factor=2.5, partial_rotary_factor=0.5,
            rope_theta=600000.0, rms_norm_eps=1e-6, max_position_embeddings=16384)


# The same family at toy size: a CPU dry run of the --mini-shaped path (dummy weights, no tokenizer).
REDUCED = dict(MINI, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
               num_experts_per_tok=4, n_group=4, topk_group=2, moe_intermediate_size=64)
MINI_VOCAB, REDUCED_VOCAB = 157184, 4096


def make_shaped_config(out: Path, reduced: bool = False) -> Path:
    """A config-only LLaDA2.0-mini-shaped checkpoint folder: vLLM makes the weights itself on the
    device (``load_format="dummy"``), so nothing of the ~32 GB bf16 model is written or read."""
    shape, vocab = (REDUCED, REDUCED_VOCAB) if reduced else (MINI, MINI_VOCAB)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": vocab,
           "hidden_act": "silu", "use_qkv_bias": False, "use_bias": False, "use_qk_norm": True,
           "tie_word_embeddings": False, "score_function": "sigmoid", "router_dtype": "fp32",
           "moe_router_enable_expert_bias": True, "norm_topk_prob": True,
           # the released checkpoints' ids (mask 156895, EOS 156892); the reduced vocab's last ids
           "mask_token_id": 156895 if not reduced else vocab - 2,
           "eos_token_id": 156892 if not reduced else vocab - 3,
           "pad_token_id": 156892 if not reduced else vocab - 3,
           "dtype": "bfloat16", "torch_dtype": "bfloat16", **shape}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def spread_router(worker) -> int:
    """Dummy weights are tiny uniform values, so the expert bias would pick the same experts for
    every token; real routing spreads tokens over experts. Give each router N(0, 4) weights and a
    zero bias (in place: CUDA graphs keep their addresses). Runs inside the worker."""
    import torch
    n = 0
    g = torch.Generator(device="cpu").manual_seed(0)
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model = model.unwrap() if hasattr(model, "unwrap") else model  # a full-graph wrapper
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate") and hasattr(mod, "weight"):
            w = torch.randn(mod.weight.shape, generator=g) * 4.0
            mod.weight.data.copy_(w.to(mod.weight.device, mod.weight.dtype))
            if getattr(mod, "expert_bias", None) is not None:
                mod.expert_bias.data.zero_()
            n += 1
    return n


def device_name() -> tuple[str, str]:
    import torch
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return name, "h100" if "H100" in name else name.lower().replace(" ", "-")
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores)", "cpu-" + (platform.machine() or "x86")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--mini-shaped", action="store_true")
    ap.add_argument("--reduced", action="store_true",
                    help="with --mini-shaped: a toy-sized model of the same family (CPU dry run)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--cudagraph-capture-sizes", type=int, nargs="+", default=None,
                    help="token counts to capture CUDA graphs for (default: vLLM's list)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per block (fixed)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per concurrency after one untimed pass (median reported); "
                         "1 = a single timed run, no warm-up pass")
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    if a.mini_shaped:
        model = make_shaped_config(a.model or REPO / "build" / (
            "llada2-mini-shaped" + ("-reduced" if a.reduced else "")), a.reduced)
    else:
        import tiny_llada2
        model = a.model or tiny_llada2.make(REPO / "build" / "tiny-llada2")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    dev_name, dev_dir = device_name()
    kw = dict(model=str(model), max_model_len=a.prompt_len + a.max_tokens + 2 * a.block_length,
              seed=0, max_num_seqs=max(a.concurrency),
              diffusion_config={"canvas_length": a.block_length, "max_denoising_steps": a.steps},
              enforce_eager=a.enforce_eager or "cpu" in dev_dir, disable_log_stats=False)
    if a.dtype:
        kw["dtype"] = a.dtype
    if a.gpu_memory_utilization:
        kw["gpu_memory_utilization"] = a.gpu_memory_utilization
    if a.mini_shaped:
        kw.update(load_format="dummy", skip_tokenizer_init=True)
    if "cpu" not in dev_dir:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        from gpu_llada2_check import llada2_cuda_attention_backend
        kw["attention_config"] = {"backend": llada2_cuda_attention_backend()}
    if a.cudagraph_capture_sizes and not kw["enforce_eager"]:
        kw["compilation_config"] = {"cudagraph_capture_sizes": a.cudagraph_capture_sizes}
    os.environ["VLLM_LLADA2_THRESHOLD"] = "1.0"  # fixed step count: never early-commit
    t0 = time.time()
    llm = LLM(**kw)
    startup = time.time() - t0
    if a.mini_shaped:
        print("routers re-initialised:", llm.collective_rpc(spread_router)[0])
    detok = not a.mini_shaped
    vocab = 1000
    rows = []
    llm.generate([TokensPrompt(prompt_token_ids=list(range(5, 5 + a.prompt_len)))],
                 SamplingParams(max_tokens=a.block_length, temperature=0, ignore_eos=True,
                                detokenize=detok))
    def counters() -> dict[str, float]:
        # The block decoder's own counters, read from the worker (the offline LLM records
        # Prometheus stats only on steps that emit output, so /metrics-style counters undercount
        # denoising steps there; `vllm serve` exposes them correctly on /metrics).
        def read(worker):
            dec = worker.model_runner.__dict__.get("_llada2_decoder")
            return dict(dec.stats) if dec else {}
        return llm.collective_rpc(read)[0]

    for c in a.concurrency:
        before = counters()
        prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % vocab + 5
                                                  for j in range(a.prompt_len)]) for i in range(c)]
        sp = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True,
                            detokenize=detok)
        if a.repeats > 1:  # an untimed pass first: the batch's first shapes pay one-off costs
            llm.generate(prompts, sp, use_tqdm=False)
        times = []
        for _ in range(a.repeats):
            before = counters()
            t = time.time()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            times.append(time.time() - t)
            after = counters()
        dt = sorted(times)[len(times) // 2]  # the median run
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        d = {k: after[k] - before[k] for k in after}  # the last run's counters (all runs alike)
        rows.append({"concurrency": c, "seconds": round(dt, 3),
                     "seconds_all": [round(x, 3) for x in times], "generated_tokens": gen,
                     "tokens_per_s": round(gen / dt, 2),
                     # measured from the engine's /metrics counters (denoising forwards only;
                     # each finished block costs one more forward to refresh its KV)
                     "tokens_per_denoising_forward": round(
                         d["committed"] / max(d["denoising_steps"], 1), 3),
                     "tokens_per_forward_incl_refresh": round(
                         d["committed"] / max(d["denoising_steps"] + d["blocks"], 1), 3),
                     "denoising_steps_per_block": round(
                         d["denoising_steps"] / max(d["blocks"], 1), 3),
                     "batched_forwards": d["forwards"],
                     "counters": d})
    base = rows[0]["tokens_per_s"]
    print(f"LLaDA2 block decode on {dev_name}: block {a.block_length}, {a.steps} steps/block, "
          f"prompt {a.prompt_len}, {a.max_tokens} new tokens (startup {startup:.0f}s)")
    print(f"{'conc':>5} {'tok/s':>9} {'scale':>6} {'tok/fwd':>8} {'steps/blk':>9} {'seconds':>8}")
    for r in rows:
        r["scaling_vs_1"] = round(r["tokens_per_s"] / base, 2)
        print(f"{r['concurrency']:>5} {r['tokens_per_s']:>9.1f} {r['scaling_vs_1']:>6.2f} "
              f"{r['tokens_per_denoising_forward']:>8.2f} {r['denoising_steps_per_block']:>9.2f} "
              f"{r['seconds']:>8.2f}")
    label = ("mini-reduced" if a.reduced else "mini") if a.mini_shaped else "tiny"
    out = a.out or REPO / "benchmarks" / "results" / dev_dir / (
        f"llada2_{label}_b{a.block_length}_s{a.steps}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch
    import vllm
    out.write_text(json.dumps({"device": dev_name, "model": str(model), "model_label": label,
                               "weights": "vllm dummy + N(0,4) routers" if a.mini_shaped
                               else "tiny random checkpoint",
                               "torch": torch.__version__, "vllm": vllm.__version__,
                               "args": vars(a) | {"model": str(a.model), "out": str(a.out)},
                               "startup_s": startup, "rows": rows}, indent=2))
    print("saved", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
