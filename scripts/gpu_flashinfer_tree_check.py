"""FlashInfer tree-verify attention on a CUDA GPU, one command: kernel vs reference, speed vs the
portable path, and greedy equality end to end.

    python3 scripts/gpu_flashinfer_tree_check.py OUTDIR [--quick] [--skip-e2e] [--with-portable]
                                                 [--models models/tiny-pair] [--cpu]

Runs where the offline bundle is installed (PYTHONPATH=/opt/vllm-site: vLLM 0.26 with our overlays,
flashinfer-python 0.6.14, nvcc for its JIT); the repo checkout is the working directory.

1. JIT: builds the FlashInfer fa2 paged-prefill modules it needs in one parallel ninja run (cold:
   minutes; warm cache: about a second). Reported as ``jit_s``.
2. Kernel check (``ddtree.attention.flashinfer_tree``): random trees in a batch with other rows,
   GQA, head dim 128 and 256, block size 16 and 32, NHD and HND cache memory, windows none / 24 / 6,
   prefix lengths 0 .. 2500: max |FlashInfer - fp32 reference| (``tree_sdpa.tree_attention``) per
   case, bf16 bound 3e-2; the portable path (``batched.paged_tree_attention_chunked``) alongside.
3. Timing, Qwen3.5-27B-like full-attention layer (24 q heads, 4 kv heads, head dim 256, page 16),
   batch 1/8/32 x prefix 512/4096 x budget 16/64: per layer, CUDA events, median of 20 -
   FlashInfer tree run, portable run, and FlashInfer causal over the same blocks (what a chain
   verify pays; the floor); per step, host wall time of each path's plan.
4. End to end (``scripts/gpu_ddtree_check.py``'s child driver): modes ``target`` and ``ddtree``
   with ``DDTREE_TREE_ATTENTION=flashinfer`` on the tiny pair; greedy equality by
   tests/support/equality.py, and the engine log must show the FlashInfer path was taken.

Writes OUTDIR/flashinfer_tree_gpu.json (every record names the GPU) and prints a short table. Exit
0 iff every kernel case is within bounds and the end-to-end run is equal and used FlashInfer.
Without CUDA (or with --cpu) it runs the planning part only: plan arrays and mask against the
per-request reference, and ``run`` through the emulated FlashInfer wrapper.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

from timing import median_ms  # noqa: E402  (benchmarks/timing.py)

TOL = 3e-2  # bf16 output: a few ulps at |x| ~ 2, far below what a wrong mask does (~0.1 .. 1)
PATH_LOG_LINE = "DDTree tree attention path: flashinfer"


# ----------------------------------------------------------------------------- planning (any device)


def planning_check() -> dict:
    """Plan arrays and packed masks against the per-request construction, and ``run`` through the
    emulated wrapper against the reference, on CPU (no flashinfer needed)."""
    import numpy as np
    import torch

    from ddtree.attention.flashinfer_tree import FlashInferTreeAttention, plan_flashinfer_tree
    from ddtree.attention.flashinfer_tree_naive import (EmulatedPagedPrefillWrapper, naive_tree_plan,
                                                        plan_args, random_tree_step, reference_rows)

    failures, checked = [], 0
    t0 = time.monotonic()
    for seed, (prefixes, qlens, bs, contiguous) in enumerate([
            ([0, 13, 40, 5], [5, 9, 17, 1], 16, True), ([31, 0, 64, 100], [17, 17, 3, 17], 32, False),
            ([3, 70], [8, 12], 5, True)]):
        step = random_tree_step(seed, prefixes, qlens, bs, contiguous, pad_nodes=seed % 2)
        plan = plan_flashinfer_tree(*plan_args(step))
        for window in (None, 1, 6):
            ref = naive_tree_plan(*plan_args(step), window=window)
            mask = plan.mask(window)
            ok = (plan.qo_indptr.tolist() == ref["qo_indptr"]
                  and plan.kv_indptr.tolist() == ref["kv_indptr"]
                  and plan.kv_indices.tolist() == ref["kv_indices"]
                  and plan.kv_last_page_len.tolist() == ref["kv_last_page_len"]
                  and plan.block_slots.tolist() == ref["block_slots"]
                  and mask.byte_indptr_host == ref["byte_indptr"]
                  and np.array_equal(mask.packed.numpy(), ref["packed"]))
            checked += 1
            if not ok:
                failures.append(f"plan arrays seed {seed} window {window}")
    for window in (None, 4):
        step = random_tree_step(9, [0, 19, 45], [9, 13, 6], 16, contiguous=False, order="HND")
        runner = FlashInferTreeAttention("cpu", workspace_bytes=16,
                                         wrapper_factory=EmulatedPagedPrefillWrapper)
        out = torch.zeros_like(step["query"])
        runner.plan(*plan_args(step)).run(step["query"], step["cache"], out, 0.25, window)
        for e, (s, ref) in reference_rows(step, window, 0.25).items():
            err = float((out[s:s + ref.shape[0]].float() - ref.float()).abs().max())
            checked += 1
            if err > TOL:
                failures.append(f"emulated run window {window} request {e}: {err:.3g}")
    return {"checked": checked, "failures": failures, "wall_s": round(time.monotonic() - t0, 2)}


# ----------------------------------------------------------------------------- kernel check (CUDA)


KERNEL_CASES = [
    # head_dim, block size, cache memory, q heads, kv heads
    (128, 16, "NHD", 16, 2),
    (128, 32, "HND", 16, 2),
    (256, 32, "HND", 24, 4),
    (256, 16, "NHD", 24, 4),
]
WINDOWS = (None, 24, 6)


def kernel_check(quick: bool) -> list[dict]:
    import torch

    from ddtree.attention.batched import (paged_kv_rows, paged_tree_attention_chunked,
                                          plan_tree_attention)
    from ddtree.attention.flashinfer_tree import tree_attention_runner
    from ddtree.attention.flashinfer_tree_naive import plan_args, random_tree_step, reference_rows

    runner = tree_attention_runner("cuda")
    records = []
    cases = KERNEL_CASES[::2] if quick else KERNEL_CASES
    for k, (D, bs, order, heads, kvh) in enumerate(cases):
        for contiguous in (False, True):
            step = random_tree_step(100 + k, [0, 70, 300, 1000, 2500], [17, 33, 9, 33, 65], bs,
                                    contiguous, kv_heads=kvh, heads=heads, head_dim=D, order=order,
                                    device="cuda", pad_nodes=2)
            plan = runner.plan(*plan_args(step), group_key=("check", k, contiguous))
            pplan = plan_tree_attention(*plan_args(step))
            scale = D ** -0.5
            for window in WINDOWS:
                out = torch.full_like(step["query"], 5.0)
                plan.run(step["query"], step["cache"], out, scale, window)
                port = torch.full_like(step["query"], 5.0)
                paged_tree_attention_chunked(step["query"], port,
                                             lambda s: paged_kv_rows(step["cache"], D, s), pplan,
                                             scale, window)
                err = err_port = 0.0
                written = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
                for _, (s, ref) in reference_rows(step, window, scale).items():
                    n = ref.shape[0]
                    err = max(err, float((out[s:s + n].float() - ref.float()).abs().max()))
                    err_port = max(err_port, float((port[s:s + n].float() - ref.float()).abs().max()))
                    written[s:s + n] = True
                untouched = bool((out[~written] == 5.0).all())
                records.append({"head_dim": D, "block_size": bs, "memory": order, "heads": heads,
                                "kv_heads": kvh, "contiguous_rows": contiguous, "window": window,
                                "max_abs_err": round(err, 5), "portable_max_abs_err": round(err_port, 5),
                                "other_rows_untouched": untouched,
                                "ok": err <= TOL and untouched})
    return records


# ----------------------------------------------------------------------------- timing (CUDA)


def _median_ms(fn, reps: int) -> float:
    return median_ms(fn, reps, warmup=1, device="cuda")


def _host_ms(fn, reps: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


TIMING_LAYER = {"heads": 24, "kv_heads": 4, "head_dim": 256, "block_size": 16}  # Qwen3.5-27B-like


def timing(quick: bool, reps: int = 20) -> list[dict]:
    import flashinfer
    import torch

    from ddtree.attention.flashinfer_tree import tree_attention_runner

    runner = tree_attention_runner("cuda")
    causal = flashinfer.BatchPrefillWithPagedKVCacheWrapper(runner.workspace, "NHD", backend="fa2")
    shapes = [(b, p, n) for b in (1, 8, 32) for p in (512, 4096) for n in (16, 64)]
    if quick:
        shapes = [(1, 512, 16), (8, 4096, 64)]
    records = []
    for batch, prefix, budget in shapes:
        records.append(_time_shape(runner, causal, batch, prefix, budget, reps))
        torch.cuda.empty_cache()
    return records


def _time_shape(runner, causal, batch: int, prefix: int, budget: int, reps: int) -> dict:
    import torch

    from ddtree.attention.batched import (paged_kv_rows, paged_tree_attention_chunked,
                                          plan_tree_attention)
    from ddtree.attention.flashinfer_tree import paged_kv_views
    from ddtree.attention.flashinfer_tree_naive import plan_args, random_tree_step

    heads, kvh, D, bs = (TIMING_LAYER[k] for k in ("heads", "kv_heads", "head_dim", "block_size"))
    scale = D ** -0.5
    step = random_tree_step(7, [prefix] * batch, [budget + 1] * batch, bs, True, kv_heads=kvh,
                            heads=heads, head_dim=D, order="NHD", device="cuda")
    query, cache = step["query"], step["cache"]
    out = torch.empty_like(query)

    def fi_plan():  # what a step pays once per KV group (index arrays, mask, wrapper plan)
        p = runner.plan(*plan_args(step), group_key=("timing",))
        runner.prepare(p, query, cache, scale, None)
        return p

    rec = {"batch": batch, "prefix": prefix, "budget": budget,
           "fi_plan_ms": round(_host_ms(fi_plan, 5), 3)}
    plan = fi_plan()
    rec["fi_run_ms"] = round(_median_ms(lambda: plan.run(query, cache, out, scale, None), reps), 4)
    pplan = plan_tree_attention(*plan_args(step))
    rec["portable_plan_ms"] = round(_host_ms(lambda: plan_tree_attention(*plan_args(step)), 5), 3)
    rec["portable_run_ms"] = round(_median_ms(lambda: paged_tree_attention_chunked(
        query, out, lambda s: paged_kv_rows(cache, D, s), pplan, scale, None), max(5, reps // 4)), 4)
    # the chain's cost over the same blocks (the causal pass a plain verify pays): the floor
    _, k_cache, v_cache = paged_kv_views(cache, D)
    causal.plan(plan.qo_indptr, plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len, heads, kvh,
                D, bs, causal=True, sm_scale=scale, q_data_type=query.dtype, kv_data_type=query.dtype)
    a, b = plan.row_range
    rec["causal_run_ms"] = round(_median_ms(
        lambda: causal.run(query[a:b], (k_cache, v_cache), out=out[a:b]), reps), 4)
    rec["speedup_vs_portable"] = round(rec["portable_run_ms"] / rec["fi_run_ms"], 2)
    rec["tree_over_causal"] = round(rec["fi_run_ms"] / rec["causal_run_ms"], 2)
    return rec


# ----------------------------------------------------------------------------- end to end (CUDA)


def end_to_end(out: Path, models: Path, quick: bool, with_portable: bool = False) -> dict:
    from gpu_ddtree_check import (child_env, greedy_equality, mode_configs, prompts_for,
                                  run_mode_process)


    script = str(REPO / "scripts" / "gpu_ddtree_check.py")
    n_eq, eq_tokens = (4, 24) if quick else (12, 48)
    prompts = prompts_for(models, n_eq, 48, 400)
    speed_prompts = prompts_for(models, 8, 64, 128)
    configs = mode_configs(models)
    report: dict = {"prompts": len(prompts), "tokens": eq_tokens}
    ref = None
    speed_tokens = 64 if with_portable else 16
    for mode in ("target", "ddtree") + (("ddtree-portable",) if with_portable else ()):
        cfg = dict(configs[mode.replace("-portable", "")], model=str(models / "target"),
                   prompts=prompts, max_tokens=eq_tokens, logprobs=(mode == "target"),
                   speed_prompts=speed_prompts, speed_tokens=speed_tokens)
        env = child_env(DDTREE_TREE_ATTENTION="portable" if mode == "ddtree-portable" else "flashinfer")
        log = out / f"e2e-{mode}.log"
        t0 = time.monotonic()
        res, status = run_mode_process(script, out, mode, cfg, env, log, timeout=600)
        rec: dict = {"wall_s": round(time.monotonic() - t0, 1), "log": log.name}
        if res is None:
            rec["error"] = f"exit {status}"
            tail = log.read_text(errors="replace").splitlines()[-25:]
            print(f"[e2e {mode}] FAILED\n" + "\n".join(tail), flush=True)
            report[mode] = rec
            break
        rec.update({k: v for k, v in res.items() if k not in ("outputs",)})
        if mode == "target":
            ref = res
        else:
            rec.update(greedy_equality(ref["outputs"], res["outputs"]))
            text = log.read_text(errors="replace")
            rec["flashinfer_path_logged"] = PATH_LOG_LINE in text
            rec["tree_steps"] = (res.get("ddtree_counters") or {}).get("steps", 0)
            if mode == "ddtree-portable":  # the comparison run must not have taken FlashInfer
                rec["flashinfer_path_logged_by_mistake"] = rec.pop("flashinfer_path_logged")
        report[mode] = rec
    dd = report.get("ddtree", {})
    report["ok"] = bool(dd and "error" not in dd and not dd.get("failures")
                        and dd.get("flashinfer_path_logged") and dd.get("tree_steps", 0) > 0)
    port = report.get("ddtree-portable")
    if port is not None:
        report["ok"] &= "error" not in port and not port.get("failures")
    return report


# ----------------------------------------------------------------------------- driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", type=Path, default=REPO / "models" / "tiny-pair")
    ap.add_argument("--quick", action="store_true", help="fewer cases, shapes and prompts")
    ap.add_argument("--skip-e2e", action="store_true", help="kernel check and timing only")
    ap.add_argument("--cpu", action="store_true", help="planning part only, even with a GPU")
    ap.add_argument("--with-portable", action="store_true",
                    help="also run ddtree on the portable path (tok/s side by side; ~1 min more)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    report: dict = {"device": torch.cuda.get_device_name() if cuda else f"cpu-{platform.machine()}",
                    "torch": torch.__version__, "quick": args.quick}
    path = args.out / "flashinfer_tree_gpu.json"

    def save():
        path.write_text(json.dumps(report, indent=2))

    t0 = time.monotonic()
    report["planning"] = planning_check()
    save()
    ok = not report["planning"]["failures"]
    print(f"planning: {report['planning']['checked']} checks, failures: "
          f"{report['planning']['failures'] or 'none'} ({report['planning']['wall_s']} s)", flush=True)
    if not cuda:
        print("no CUDA: kernel check, timing and end-to-end skipped")
        report["ok"] = ok
        save()
        return 0 if ok else 1

    import flashinfer

    from ddtree.attention.flashinfer_tree import precompile

    report["flashinfer"] = getattr(flashinfer, "__version__", "?")
    t1 = time.monotonic()
    # head dims of the kernel check / timing (with and without window) and the tiny pair's (64)
    precompile([(128, False), (128, True), (256, False), (256, True), (64, False)])
    report["jit_s"] = round(time.monotonic() - t1, 1)
    print(f"JIT (fa2 paged prefill, 5 variants): {report['jit_s']} s", flush=True)
    save()

    report["kernel"] = kernel_check(args.quick)
    save()
    bad = [r for r in report["kernel"] if not r["ok"]]
    ok &= not bad
    worst = max(r["max_abs_err"] for r in report["kernel"])
    worst_port = max(r["portable_max_abs_err"] for r in report["kernel"])
    print(f"kernel: {len(report['kernel']) - len(bad)}/{len(report['kernel'])} cases within {TOL} "
          f"(worst FlashInfer {worst:.4f}, portable {worst_port:.4f})", flush=True)
    for r in bad:
        print(f"  FAIL {r}")

    report["timing"] = timing(args.quick)
    save()
    print(f"\nper layer, 24/4 heads, head dim 256, page 16, bf16, {report['device']} (ms):")
    print(f"{'batch':>5}{'prefix':>7}{'budget':>7}{'flashinfer':>11}{'portable':>10}{'causal':>8}"
          f"{'x port':>8}{'/causal':>8}{'plan fi':>9}{'plan port':>10}")
    for r in report["timing"]:
        print(f"{r['batch']:>5}{r['prefix']:>7}{r['budget']:>7}{r['fi_run_ms']:>11.3f}"
              f"{r['portable_run_ms']:>10.3f}{r['causal_run_ms']:>8.3f}{r['speedup_vs_portable']:>8.2f}"
              f"{r['tree_over_causal']:>8.2f}{r['fi_plan_ms']:>9.2f}{r['portable_plan_ms']:>10.2f}")

    if not args.skip_e2e:
        report["e2e"] = end_to_end(args.out, args.models, args.quick, args.with_portable)
        save()
        print(f"\nend to end, tiny pair ({report['e2e']['prompts']} prompts x {report['e2e']['tokens']} "
              f"tokens):")
        print(f"{'mode':<16}{'path':<11}{'equal':>6}{'ties':>6}{'fail':>6}{'steps':>7}{'AL':>7}"
              f"{'tok/s c1':>10}{'tok/s c8':>10}")
        for mode in ("target", "ddtree", "ddtree-portable"):
            r = report["e2e"].get(mode)
            if r is None:
                continue
            sp = r.get("speed", {})
            fails = "ERR" if "error" in r else len(r.get("failures", [])) if mode != "target" else "-"
            path_used = ("-" if mode == "target" else "flashinfer" if r.get("flashinfer_path_logged")
                         else "portable")
            print(f"{mode:<16}{path_used:<11}{r.get('equal', '-')!s:>6}{r.get('tie_divergences', '-')!s:>6}"
                  f"{fails!s:>6}{r.get('tree_steps', '-')!s:>7}{r.get('equality_acceptance_length', '-')!s:>7}"
                  f"{sp.get('c1_tok_s', '-')!s:>10}{sp.get('c8_tok_s', '-')!s:>10}")
        ok &= report["e2e"]["ok"]
    report["ok"] = bool(ok)
    report["wall_s"] = round(time.monotonic() - t0, 1)
    save()
    print(f"\n{'PASS' if ok else 'FAIL'} in {report['wall_s']} s -> {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
