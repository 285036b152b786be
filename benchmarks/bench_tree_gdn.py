"""Tree GDN kernels vs vLLM 0.26's chain kernels at equal token count, and vs the HBM roofline.

Shapes: one Qwen3.5/3.6-27B GDN layer (16 qk heads, 48 v heads, head dims 128, conv width 4,
10240 conv channels), B requests x N tokens (N = budget + 1). vLLM's chain kernels are compiled from
its python sources at run time (ddtree.ops.gdn.vllm_source; DDTREE_VLLM_SRC points at a copy when
vLLM is not installed).

Roofline: the recurrence must at least read each request's initial state once and write one state
per token (plus q/k/v/a/b in, o out); tree nodes whose parent is not the previous node also re-read
the parent's state. Bytes / measured device copy bandwidth (torch copy_ of a 2 GiB buffer) gives the
floor; "roofline %" = floor time / measured time (reads of reloads counted in "bytes actual").

    python benchmarks/bench_tree_gdn.py --out benchmarks/results/h100/tree_gdn.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

_DRY = not torch.cuda.is_available()
if _DRY:  # CPU dry run of the script's logic (interpreted kernels, tiny shapes, meaningless times)
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import median_ms  # noqa: E402  (benchmarks/timing.py, beside this script)
from ddtree.ops.gdn import (commit_conv_state, commit_recurrent_state,  # noqa: E402
                            make_conv_commit_plan, tree_conv1d_update)
from ddtree.ops.gdn.tree_delta_rule import tree_gated_delta_rule_triton  # noqa: E402
from ddtree.ops.gdn.vllm_source import load_vllm_chain_op  # noqa: E402

H, HV, K, V, D, W = (1, 2, 16, 16, 64, 4) if _DRY else (16, 48, 128, 128, 10240, 4)
DEV = "cpu" if _DRY else "cuda"


def bench(fn, reps=30, warmup=5):
    """Median wall time (ms) of fn on the current stream, CUDA events, L2 not flushed."""
    if _DRY:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return median_ms(fn, reps, warmup=warmup, device="cuda")


def copy_bandwidth():
    n = 1 << 20 if _DRY else 1 << 29  # 2 GiB of fp32
    a = torch.empty(n, dtype=torch.float32, device=DEV)
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), reps=20)
    return 2 * a.numel() * 4 / (ms * 1e-3)  # bytes read + written per second


def tree_parents(shape, B, N, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(B):
        if shape == "chain":
            p = [-1] + list(range(N - 1))
        elif shape == "star":
            p = [-1] + [0] * (N - 1)
        elif shape == "random":
            p = [-1] + [rng.randrange(0, n) for n in range(1, N)]
        elif shape == "ddtree":  # chain seed of depth 15, then a best-first-like bushy remainder
            depth = min(15, N - 1)
            p = [-1] + list(range(depth))
            while len(p) < N:  # siblings near the root are the likeliest extra branches
                p.append(rng.choice(list(range(min(len(p), 6))) + [rng.randrange(0, len(p))]))
        else:
            raise ValueError(shape)
        rows.append(p)
    par = torch.tensor(rows, dtype=torch.int32, device=DEV)
    reloads = sum(1 for p in rows for n in range(1, N) if p[n] != n - 1)
    return par, reloads


REC_VARIANTS = [  # (prefetch_parent, block_v, num_warps); the first is the library default
    (True, 32, 4), (False, 32, 4), (True, 16, 4), (False, 16, 4),
    (True, 32, 8), (False, 32, 8), (True, 16, 8), (False, 16, 8),
]
CONV_VARIANTS = [(None, 4), (16, 4), (32, 4), (16, 8), (32, 8), (64, 8)]  # (block_d, num_warps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/h100/tree_gdn.json")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--budgets", default="32,16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep-budget", type=int, default=32, help="budget at which variants are swept")
    args = ap.parse_args()
    dev = torch.device(DEV)
    torch.manual_seed(0)
    vllm_rec = load_vllm_chain_op("fused_sigmoid_gating_delta_rule_update")
    vllm_conv = load_vllm_chain_op("causal_conv1d_update")
    bw = copy_bandwidth()
    name = "cpu-dry-run" if _DRY else torch.cuda.get_device_name()
    print(f"device: {name}  copy bandwidth (r+w): {bw / 1e9:.0f} GB/s")
    results = {"device": name, "torch": torch.__version__,
               "triton": triton.__version__, "copy_bandwidth_GBps": bw / 1e9,
               "shapes": dict(H=H, HV=HV, K=K, V=V, D=D, W=W),
               "notes": "ms = median of CUDA-event timings (L2 not flushed); roofline_pct = "
                        "(bytes_min / copy bandwidth) / ms; vs_chain = ms / vLLM chain ms at the "
                        "same B, N and slot dtype; variant = (prefetch_parent, block_v, num_warps) "
                        "for the recurrence, (block_d, num_warps) for the conv",
               "rows": [], "errors": []}
    rows = results["rows"]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        results["generated_unix"] = time.time()
        out_path.write_text(json.dumps(results, indent=1))

    def section(label, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - keep the other sections' numbers
            msg = f"{label}: {type(e).__name__}: {e}"
            print("ERROR", msg[:500])
            results["errors"].append(msg[:2000])
        save()

    for budget in [int(x) for x in args.budgets.split(",")]:
        N = budget + 1
        sweep = budget == args.sweep_budget
        for B in [int(x) for x in args.batches.split(",")]:
            T = B * N
            q = torch.randn(T, H, K, device=dev, dtype=torch.bfloat16)
            k = torch.randn(T, H, K, device=dev, dtype=torch.bfloat16)
            v = torch.randn(T, HV, V, device=dev, dtype=torch.bfloat16)
            a = torch.randn(T, HV, device=dev, dtype=torch.bfloat16)
            b = torch.randn(T, HV, device=dev, dtype=torch.bfloat16)
            A_log = torch.rand(HV, device=dev) - 0.5
            dt_bias = torch.randn(HV, device=dev) * 0.5
            io_bytes = T * (2 * H * K + HV * V + 2 * HV) * 2 + T * HV * V * 2
            spec = (1 + torch.arange(T, dtype=torch.int32, device=dev)).view(B, N)
            cu = torch.arange(0, T + 1, N, dtype=torch.int32, device=dev)
            nacc = torch.ones(B, dtype=torch.int32, device=dev)
            cache = (1 + T + torch.arange(B, dtype=torch.int32, device=dev))
            num_nodes = torch.full((B,), N, dtype=torch.int32, device=dev)

            def recurrence():
                for slot_dtype in (torch.float32, torch.bfloat16):
                    sbytes = 4 if slot_dtype == torch.float32 else 2
                    pool = torch.randn(1 + T + B, HV, V, K, device=dev).mul_(0.1).to(slot_dtype)
                    min_bytes = B * HV * V * K * sbytes * (1 + N) + io_bytes
                    ms_chain = bench(lambda: vllm_rec(
                        A_log, a, b, dt_bias, q[None], k[None], v[None], initial_state=pool,
                        inplace_final_state=True, cu_seqlens=cu, ssm_state_indices=spec,
                        num_accepted_tokens=nacc, use_qk_l2norm_in_kernel=True), args.reps)
                    base = dict(op="recurrence", budget=budget, N=N, B=B,
                                slot_dtype="fp32" if sbytes == 4 else "bf16")
                    rows.append(dict(base, impl="vllm_chain", tree="chain", variant="vllm", ms=ms_chain,
                                     bytes_min=min_bytes, bytes_actual=min_bytes,
                                     roofline_pct=100 * min_bytes / bw / (ms_chain * 1e-3),
                                     vs_chain=1.0))
                    out = torch.empty_like(v)
                    for shape in ("chain", "ddtree", "random", "star"):
                        par, reloads = tree_parents(shape, B, N)
                        actual = min_bytes + reloads * HV * V * K * sbytes
                        variants = REC_VARIANTS if sweep and shape in ("chain", "ddtree") else REC_VARIANTS[:1]
                        for pf, bv, nw in variants:
                            def run():
                                tree_gated_delta_rule_triton(
                                    q, k, v, a, b, A_log, dt_bias, par, num_nodes, pool, cache, spec,
                                    pool, out, K ** -0.5, True, 1.0, 20.0, block_v=bv, num_warps=nw,
                                    prefetch_parent=pf)
                            ms = bench(run, args.reps)
                            rows.append(dict(base, impl="tree", tree=shape, variant=f"{int(pf)}/{bv}/{nw}",
                                             ms=ms, reloads=reloads, bytes_min=min_bytes,
                                             bytes_actual=actual,
                                             roofline_pct=100 * min_bytes / bw / (ms * 1e-3),
                                             vs_chain=ms / ms_chain))
                    del pool

            def conv():
                x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
                wt = torch.randn(D, W, device=dev, dtype=torch.bfloat16)
                bias = torch.randn(D, device=dev, dtype=torch.bfloat16)
                cs = torch.randn(1 + T, D, W - 2 + N, device=dev, dtype=torch.bfloat16)
                conv_idx = spec[:, 0].contiguous()
                offs = nacc - 1
                conv_bytes = T * D * 2 * 2 + B * D * (W - 1 + W - 2 + N) * 2
                xc = x.clone()
                # vLLM's update writes its output into x: time it on a scratch copy made outside
                ms_cc = bench(lambda: vllm_conv(xc, cs, wt, bias, "silu",
                                                conv_state_indices=conv_idx, num_accepted_tokens=nacc,
                                                query_start_loc=cu, max_query_len=N), args.reps)
                base = dict(op="conv1d", budget=budget, N=N, B=B, slot_dtype="bf16")
                rows.append(dict(base, impl="vllm_chain", tree="chain", variant="vllm", ms=ms_cc,
                                 bytes_min=conv_bytes,
                                 roofline_pct=100 * conv_bytes / bw / (ms_cc * 1e-3), vs_chain=1.0))
                yout = torch.empty_like(x)
                for shape in ("chain", "ddtree"):
                    par, _ = tree_parents(shape, B, N)
                    for bd, nw in (CONV_VARIANTS if sweep else CONV_VARIANTS[:1]):
                        ms = bench(lambda: tree_conv1d_update(
                            x, cs, wt, bias, par, num_nodes, conv_idx, conv_state_offsets=offs,
                            stage_inputs=True, out=yout, check_tree_values=False,
                            kernel_options=dict(block_d=bd, num_warps=nw)), args.reps)
                        rows.append(dict(base, impl="tree", tree=shape, variant=f"{bd}/{nw}", ms=ms,
                                         bytes_min=conv_bytes,
                                         roofline_pct=100 * conv_bytes / bw / (ms * 1e-3),
                                         vs_chain=ms / ms_cc))
                # commit of the conv history along a non-chain path (copy path)
                acc_nodes = torch.tensor([[0, 1, 2, 4]] * B, dtype=torch.int32, device=dev)
                num_acc = torch.full((B,), 4, dtype=torch.int32, device=dev)
                ms_commit = bench(lambda: commit_conv_state(cs, conv_idx, acc_nodes, num_acc, W,
                                                            check_values=False), args.reps)
                rows.append(dict(op="commit_conv", budget=budget, N=N, B=B, impl="tree",
                                 variant="copy", ms=ms_commit))  # plan computed inside
                plan = make_conv_commit_plan(acc_nodes, num_acc, W, cs.shape[2],
                                             check_values=False)
                ms_planned = bench(lambda: commit_conv_state(cs, conv_idx, plan=plan,
                                                             check_values=False), args.reps)
                rows.append(dict(op="commit_conv", budget=budget, N=N, B=B, impl="tree",
                                 variant="copy-planned", ms=ms_planned))  # per-layer cost

            def commit_rec():
                pool = torch.randn(1 + T + B, HV, V, K, device=dev).mul_(0.1)
                last = torch.full((B,), min(4, N - 1), dtype=torch.int32, device=dev)
                ms_rc = bench(lambda: commit_recurrent_state(pool, cache, spec, last), args.reps)
                rows.append(dict(op="commit_recurrent_copy", budget=budget, N=N, B=B, impl="torch",
                                 variant="copy", ms=ms_rc, bytes_min=2 * B * line_f32,
                                 roofline_pct=100 * 2 * B * line_f32 / bw / (ms_rc * 1e-3)))

            line_f32 = HV * V * K * 4
            section(f"recurrence budget={budget} B={B}", recurrence)
            section(f"conv budget={budget} B={B}", conv)
            section(f"commit budget={budget} B={B}", commit_rec)
            if not _DRY:
                torch.cuda.empty_cache()

    hdr = (f"{'op':<22}{'bud':>4}{'B':>4}{'slot':>5}{'impl':>11}{'tree':>7}{'variant':>9}"
           f"{'ms':>9}{'xchain':>7}{'roof%':>6}")
    print(hdr)
    for r in rows:
        print(f"{r['op']:<22}{r['budget']:>4}{r['B']:>4}{r.get('slot_dtype', ''):>5}{r['impl']:>11}"
              f"{r.get('tree', ''):>7}{r.get('variant', ''):>9}{r['ms']:>9.4f}"
              f"{r.get('vs_chain', float('nan')):>7.2f}{r.get('roofline_pct', float('nan')):>6.1f}")
    save()
    print(f"wrote {args.out}; errors: {len(results['errors'])}")


if __name__ == "__main__":
    main()
