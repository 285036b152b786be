"""Per-decode-step cost of the DDTree core: build + flatten + walk, for batch 1..256 and budget 16..64.

Input path: the realistic top-K-only one -- the drafter hands over per-depth top-K log-probs and ids
[B, L=15, K=8] (its vocab-wide log-softmax + top-K is timed separately as `draft_topk`), and the walk
gets the target's token per node slot [B, N] (the vocab-wide argmax / sampling over the verifier's
[B*N, V] logits is timed separately as `greedy_vocab` / `sample_vocab`, V = 151936, and is the same
pass vLLM's chain sampler already makes over [B*(k+1), V]).

step = build_tree + flatten_tree (positions, ancestor mask, child table, logits rows, packed tree mask)
+ tree_walk, each with backend "torch" (batched torch ops) or "triton" (one launch each). On CUDA the
step is captured in one CUDA graph (`step_graph_*`; also `pre_graph_triton` = build + flatten, the part
before the verifier, and `walk_graph_triton`, the part after it), which is how the glue would run it;
eager per-part columns on CUDA are bound by Python launch overhead. Times are medians of CUDA-event
timings (CUDA) or perf_counter (CPU, torch backend only: the Triton interpreter is not a CPU backend).
FlashInfer's full-kv mask (`fi_mask_p1024`, prefix 1024, data-dependent size, eager) is extra.

Usage: python benchmarks/bench_tree_core.py [--device cuda|cpu] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import median_ms  # noqa: E402  (benchmarks/timing.py)
from ddtree.tree import (build_tree, draft_topk, flashinfer_custom_mask, flatten_tree,  # noqa: E402
                         sample_target_tokens, tree_walk)


def device_label(dev: str) -> tuple[str, str]:
    if dev == "cuda":
        name = torch.cuda.get_device_name()
        short = "h100" if "H100" in name else "h200" if "H200" in name else re.sub(r"\W+", "-", name.lower())
        return short, name
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40]
    return f"cpu-{slug}", model


def timer(dev: str, fn, iters: int, warmup: int = 3) -> float:
    return median_ms(fn, iters, warmup=warmup, device=dev)


def make_inputs(B, L, K, budget, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, L, 64, generator=g) * 2).log_softmax(-1).topk(K, -1).values
    ids = torch.randint(0, 151936, (B, L, K), generator=g)
    root = torch.randint(0, 151936, (B,), generator=g)
    root_pos = torch.randint(100, 4000, (B,), generator=g)
    return lp.to(dev), ids.to(dev), root.to(dev), root_pos.to(dev)


def graph_time(fn, iters):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return timer("cuda", g.replay, iters, warmup=5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--budgets", default="16,32,64")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--depth", type=int, default=15)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--vocab-max-batch", type=int, default=None,
                    help="largest batch for the vocab-wide ops (default 64 on CUDA, 1 on CPU)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: stable numbers on a shared machine)")
    args = ap.parse_args()
    dev = args.device
    if dev == "cpu":
        torch.set_num_threads(args.threads)
    iters = args.iters or (100 if dev == "cuda" else 10)
    vmax = args.vocab_max_batch if args.vocab_max_batch is not None else (64 if dev == "cuda" else 1)
    batches = [int(x) for x in args.batches.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    if args.quick:
        batches, budgets = [1, 64], [32]
    label, name = device_label(dev)
    L, K, V = args.depth, args.top_k, args.vocab
    backends = ["torch", "triton"] if dev == "cuda" else ["torch"]
    rows = []
    print(f"device: {name}  torch {torch.__version__}  L={L} K={K} V={V}  (ms, median of {iters})")
    hdr = ["batch", "budget"]
    for part in ("build", "flatten", "walk"):
        hdr += [f"{part}_{b}" for b in backends]
    if dev == "cuda":
        hdr += [f"step_graph_{b}" for b in backends] + ["pre_graph_triton", "walk_graph_triton"]
    else:
        hdr += ["step_torch"]
    hdr += ["fi_mask_p1024", "draft_topk", "greedy_vocab", "sample_vocab"]
    print(" ".join(f"{h:>16}" for h in hdr))
    eager_iters = max(10, iters // 5) if dev == "cuda" else iters
    for budget in budgets:
        for B in batches:
            lp, ids, root, root_pos = make_inputs(B, L, K, budget, dev)
            N = budget + 1
            row = {"batch": B, "budget": budget, "top_k": K, "depth": L}
            tree = build_tree(root_token_ids=root, budget=budget, top_k=K, topk_logprobs=lp, topk_ids=ids)
            # target tokens agreeing with the draft most of the time (long accepted paths)
            tgt = torch.where(torch.rand(B, N, device=dev) < 0.8, tree.token_ids.roll(-1, 1).clamp(min=0), 0)

            def build(be):
                return build_tree(root_token_ids=root, budget=budget, top_k=K, topk_logprobs=lp, topk_ids=ids,
                                  backend=be)

            def pre(be):
                t = build(be)
                return t, flatten_tree(t, root_pos, backend=be)

            def step(be):
                t, f = pre(be)
                return t, f, tree_walk(t, tgt, backend=be)

            for be in backends:
                row[f"build_{be}"] = timer(dev, lambda: build(be), eager_iters)
                row[f"flatten_{be}"] = timer(dev, lambda: flatten_tree(tree, root_pos, backend=be), eager_iters)
                row[f"walk_{be}"] = timer(dev, lambda: tree_walk(tree, tgt, backend=be), eager_iters)
            if dev == "cuda":
                for be in backends:
                    row[f"step_graph_{be}"] = graph_time(lambda be=be: step(be), iters)
                row["pre_graph_triton"] = graph_time(lambda: pre("triton"), iters)
                row["walk_graph_triton"] = graph_time(lambda: tree_walk(tree, tgt, backend="triton"), iters)
            else:
                row["step_torch"] = timer(dev, lambda: step("torch"), iters)
            if B <= vmax:
                vis = flatten_tree(tree, root_pos).ancestor_mask
                prefix = torch.full((B,), 1024, dtype=torch.long)  # host-side lengths, as vLLM has them
                row["fi_mask_p1024"] = timer(dev, lambda: flashinfer_custom_mask(vis, prefix), max(5, iters // 5))
                dlogits = torch.randn(B, L, V, device=dev, dtype=torch.bfloat16)
                row["draft_topk"] = timer(dev, lambda: draft_topk(dlogits, K), max(5, iters // 5))
                del dlogits
                tlogits = torch.randn(B, N, V, device=dev, dtype=torch.bfloat16)
                temp = torch.ones(B, device=dev)
                row["greedy_vocab"] = timer(dev, lambda: tree_walk(tree, tlogits.argmax(-1)), max(5, iters // 5))
                row["sample_vocab"] = timer(
                    dev, lambda: tree_walk(tree, sample_target_tokens(tlogits, temp)), max(5, iters // 5))
                del tlogits
                if dev == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(" ".join(f"{row[h]:>16.4f}" if isinstance(row.get(h), float) else f"{str(row.get(h, '-')):>16}"
                           for h in hdr), flush=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", label, "tree_core.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {"device": name, "device_label": label, "torch": torch.__version__,
            "triton": getattr(sys.modules.get("triton"), "__version__", None),
            "input_path": "top-K only: draft [B, L, K] log-probs/ids in, target token per node in; "
                          "vocab-wide ops timed separately (bf16 logits, V=%d)" % V,
            "timing": "CUDA events median" if dev == "cuda" else "perf_counter median",
            "iters": iters, "units": "ms", "rows": rows,
            "cpu_threads": torch.get_num_threads() if dev == "cpu" else None,
            "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    with open(out, "w") as f:
        json.dump(meta, f, indent=1)
    print("saved", out)


if __name__ == "__main__":
    main()
