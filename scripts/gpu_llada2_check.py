#!/usr/bin/env python3
"""One-command LLaDA2 block-decode check for a GPU host with the offline bundle (about 4 minutes).

    bash scripts/gpu_llada2_check.sh OUTDIR                  # on the GPU host, repo checkout as cwd
    python scripts/gpu_llada2_check.py OUTDIR --device cpu --quick   # CPU dry run of every part

Parts, each in its own process (a fresh engine and a clean GPU each time):

1. ``env``: device, versions, and the vLLM overlays of this checkout on the imported vllm (checked;
   applied first when the installed copy is stale, e.g. a bundle installed before this branch).
2. ``equality`` float32, eager (and again with compile + PIECEWISE CUDA graphs, same gate, on CUDA): the tiny random LLaDA2 (scripts/tiny_llada2.py with head_dim 64,
   peaked logits, made here in seconds) through ``LLM.generate`` vs the plain-torch reference ``generate()`` on the same
   device, token for token, for 12 requests: prompt lengths 1..24 around block 8 (block-aligned and
   not), per-request block length / threshold / max_steps, a stop token, 8 greedy and 4 seeded
   sampled (temperature, top-k, top-p) requests; all at once with 8 running (concurrency 8) and
   one by one (concurrency 1). On CUDA float32 rules FlashAttention out, so vLLM picks another
   non-causal backend (logged in the part's log); ``TRITON_F32_DEFAULT=ieee`` keeps Triton's
   float32 dots out of TF32. Gate: every request equal at both concurrencies.
3. ``equality`` bfloat16 with vLLM's compile + PIECEWISE CUDA graphs (the LLaDA2 config hook
   downgrades full graphs, see llada2_block.py) and FlashAttention with causal=False: the same
   requests against the reference run in bf16 on the device. The two implementations round
   differently, so a near-tie (argmax margin, confidence next to the threshold) can flip a token
   and everything after it; each divergence is reported (request @ first differing position).
   Gate (coarse, catches real defects, which corrupt nearly every request from its first block):
   at least half of the requests identical and a mean matched-prefix fraction >= 0.5.
4. ``bench``: benchmarks/bench_llada2.py --mini-shaped (LLaDA2.0-mini shapes, dummy weights made
   on the device, random routers) at concurrency 1 2 4 8 16 32, block 32, 8 fixed steps per block:
   throughput and tokens per forward.

Writes OUTDIR/summary.json (device = torch.cuda.get_device_name()), OUTDIR/summary.md, one JSON and
one log per part, and prints a short table. Needs only this checkout (tracked files) plus vllm,
torch, transformers/tokenizers and safetensors on PYTHONPATH; no network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_share import engine_memory_kwargs  # noqa: E402

TINY_BLOCK = 8


def _device_name(device: str) -> str:
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def llada2_cuda_attention_backend() -> str:
    """Non-causal blocks need FlashAttention 4 (CuTe DSL, the ``cutlass`` package) under vLLM's
    FLASH_ATTN backend; the offline bundle does not carry it (the session-4 H100 run failed with
    ``No module named 'cutlass'``), so use TRITON_ATTN unless FA4 imports
    (``LLADA2_ATTENTION_BACKEND`` overrides)."""
    want = os.environ.get("LLADA2_ATTENTION_BACKEND")
    if want:
        return want
    try:
        import cutlass  # noqa: F401
        return "FLASH_ATTN"
    except ImportError:
        return "TRITON_ATTN"


# ------------------------------------------------------------------------------------ parts


def part_env(args) -> dict:
    import torch
    import vllm

    site = Path(vllm.__file__).resolve().parent.parent
    tool = [sys.executable, str(REPO / "scripts" / "apply_overlays.py"), "--tree", str(site)]
    check = subprocess.run(tool + ["--check", "--require-applied"], capture_output=True, text=True)
    doc = {"device": _device_name(args.device), "torch": torch.__version__,
           "cuda": torch.version.cuda, "vllm": vllm.__version__, "vllm_path": str(site),
           "overlay_check_rc": check.returncode}
    if check.returncode != 0:
        # A bundle installed from an older checkout: bring its overlays up to this one.
        applied = subprocess.run(tool, capture_output=True, text=True)
        recheck = subprocess.run(tool + ["--check", "--require-applied"], capture_output=True,
                                 text=True)
        doc.update(overlay_apply_rc=applied.returncode, overlay_recheck_rc=recheck.returncode,
                   overlay_apply_output=(applied.stdout + applied.stderr)[-3000:])
    doc["ok"] = check.returncode == 0 or doc.get("overlay_recheck_rc") == 0
    return doc


def part_equality(args) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import tiny_llada2
    from ddtree.llada2.reference import LLaDA2Reference
    from tests.llada2.engine_check import batch_requests, reference_tokens

    # head_dim 64 (the CPU tests' tiny model has 32): a head size every FlashAttention build has
    model = tiny_llada2.make(REPO / "build" / "tiny-llada2-hd64", overrides={"head_dim": 64})
    cfg = json.loads((model / "config.json").read_text())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    kw = dict(model=str(model), dtype=args.dtype, max_model_len=512, seed=0, max_num_seqs=8,
              diffusion_config={"canvas_length": TINY_BLOCK}, enforce_eager=args.eager)
    if args.device == "cuda":
        kw.update(engine_memory_kwargs(0.25))
        kw["attention_config"] = {"backend": llada2_cuda_attention_backend()}
        if not args.eager:  # steps here are <= 8 requests x 8 tokens
            kw["compilation_config"] = {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]}
    t0 = time.time()
    llm = LLM(**kw)
    startup = time.time() - t0
    reqs = batch_requests(cfg)
    if args.quick:  # the CPU dry run: a few greedy and sampled requests
        reqs = reqs[:3] + reqs[8:10]

    def params(r):
        p, m, x, s, samp = r
        return SamplingParams(max_tokens=m, extra_args=x, stop_token_ids=s or [], **samp)

    t1 = time.time()
    batched = llm.generate([TokensPrompt(prompt_token_ids=r[0]) for r in reqs],
                           [params(r) for r in reqs], use_tqdm=False)
    t_batched = time.time() - t1
    t1 = time.time()
    single = [llm.generate([TokensPrompt(prompt_token_ids=r[0])], [params(r)], use_tqdm=False)[0]
              for r in reqs]
    t_single = time.time() - t1
    del llm
    ref = LLaDA2Reference.from_pretrained(model, dtype=dtype, device=args.device)
    # bf16: the float32 reference as well, the "exact math" both bf16 implementations approximate
    ref32 = (LLaDA2Reference.from_pretrained(model, dtype=torch.float32, device=args.device)
             if dtype != torch.float32 else None)

    def first_diff(a, b):
        n = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), None)
        return n if n is not None or len(a) == len(b) else min(len(a), len(b))

    rows = []
    for r, b, s1 in zip(reqs, batched, single):
        p, m, x, stop, samp = r
        want = reference_tokens(ref, cfg, TINY_BLOCK, p, m, x, stop, samp)
        got8, got1 = list(b.outputs[0].token_ids), list(s1.outputs[0].token_ids)
        rows.append({"prompt_len": len(p), "max_tokens": m, "settings": x or {},
                     "sampling": samp, "stop": stop, "reference": want,
                     "concurrency_8": got8, "concurrency_1": got1,
                     "equal_c8": got8 == want, "equal_c1": got1 == want,
                     "first_diff_c8": first_diff(got8, want), "first_diff_c1": first_diff(got1, want)})
        if ref32 is not None:
            want32 = reference_tokens(ref32, cfg, TINY_BLOCK, p, m, x, stop, samp)
            rows[-1].update(reference_float32=want32,
                            first_diff_reference_vs_float32=first_diff(want, want32),
                            first_diff_c8_vs_float32=first_diff(got8, want32))
    n = len(rows)

    def agreement(key):  # mean fraction of the reference matched before the first divergence
        fr = [1.0 if r[f"equal_{key}"] else (r[f"first_diff_{key}"] or 0) / max(len(r["reference"]), 1)
              for r in rows]
        return round(sum(fr) / len(fr), 3)

    strict = all(r["equal_c8"] and r["equal_c1"] for r in rows)
    agree = {"c8": agreement("c8"), "c1": agreement("c1")}
    extra = {}
    if ref32 is not None:
        # The noise band of bf16 itself: how far the bf16 *reference* strays from float32 math,
        # next to how far the bf16 engine strays. An engine defect makes the engine stray further;
        # rounding alone keeps them alike (a near-tie flips in one implementation or the other).
        def matched(key):
            fr = [1.0 if r[key] is None else r[key] / max(len(r["reference_float32"]), 1)
                  for r in rows]
            return round(sum(fr) / len(fr), 3)
        extra = {"vs_float32": {
            "engine_matched_prefix": matched("first_diff_c8_vs_float32"),
            "reference_matched_prefix": matched("first_diff_reference_vs_float32"),
            "engine_equal": sum(r["first_diff_c8_vs_float32"] is None for r in rows),
            "reference_equal": sum(r["first_diff_reference_vs_float32"] is None for r in rows)}}
    if args.dtype == "float32":
        ok = strict
    else:
        # bf16: the two implementations round differently, so a near-tie (an argmax margin or a
        # confidence next to the threshold) can flip a token. A real defect (mask, KV, positions)
        # corrupts nearly every request from its first block; this coarse gate catches that.
        ok = (min(sum(r["equal_c8"] for r in rows), sum(r["equal_c1"] for r in rows)) >= n / 2
              and min(agree.values()) >= 0.5)
        if extra:  # and the engine no further from float32 than the bf16 reference (0.1 slack)
            v = extra["vs_float32"]
            ok = ok and v["engine_matched_prefix"] >= v["reference_matched_prefix"] - 0.1
    return {"device": _device_name(args.device), "dtype": args.dtype, "eager": args.eager,
            "strict_equal": strict, "prefix_agreement": agree,
            "block_length": TINY_BLOCK, "startup_s": round(startup, 1),
            "generate_s": {"concurrency_8": round(t_batched, 2), "concurrency_1": round(t_single, 2)},
            "equal_c8": sum(r["equal_c8"] for r in rows), "equal_c1": sum(r["equal_c1"] for r in rows),
            "requests": n, "ok": ok, **extra, "rows": rows}


# ------------------------------------------------------------------------------------ driver


def _run_part(name: str, argv: list[str], out: Path, timeout: float, deadline: float,
              env: dict | None = None) -> dict:
    """Run one part in a fresh process; its JSON lands in out/<name>.json, its log beside it.
    The part gets at most ``timeout`` seconds and never runs past ``deadline``."""
    log = out / f"{name}.log"
    t0 = time.time()
    timeout = max(5.0, min(timeout, deadline - t0))
    with log.open("w") as f:
        try:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                timeout=timeout, env=dict(os.environ, **(env or {}))).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    doc = {"rc": rc, "wall_s": round(time.time() - t0, 1), "timeout_s": round(timeout)}
    js = out / f"{name}.json"
    if js.exists():
        doc["result"] = json.loads(js.read_text())
    else:
        doc["log_tail"] = log.read_text()[-3000:]
    return doc


def _pack_logs(out: Path) -> None:
    """Logs and per-part JSONs (already inside summary.json) into one logs.tgz: the device tool
    returns only a few files from $OUT."""
    import tarfile
    loose = sorted(p for p in out.iterdir() if p.suffix == ".log" or (
        p.suffix == ".json" and p.name not in ("summary.json", "bench_mini.json")))
    if not loose:
        return
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        for p in loose:
            tar.add(p, arcname=p.name)
    for p in loose:
        p.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="default: cuda when available")
    ap.add_argument("--quick", action="store_true",
                    help="reduced sizes (the CPU dry run): fewer requests, a toy-sized mini")
    ap.add_argument("--part", choices=["env", "equality"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-bf16", action="store_true", help="no bfloat16 equality part")
    ap.add_argument("--skip-fp32-graphs", action="store_true",
                    help="no float32 compile + CUDA graphs equality part")
    ap.add_argument("--skip-equality", action="store_true",
                    help="no equality parts (env + bench only: a second device call)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for everything (default 560 on cuda, 2400 on cpu); parts that "
                         "would run past it are cut and reported")
    ap.add_argument("--part-timeout", type=float, default=None,
                    help="seconds for each equality part instead of the defaults (240 on cuda): "
                         "more when the GPU is shared with other jobs (scripts/gpu_jobs.sh)")
    args = ap.parse_args()
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    else:
        # vLLM's FlashInfer top-k/top-p sampler is compiled by FlashInfer's JIT (nvcc) on first
        # use: minutes on a fresh host, silent in the log. The session-4 H100 run timed out in
        # that silence in all three parts. The block decode samples in its own code
        # (llada2_block.py), so the torch sampler changes nothing measured here.
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

    if args.part:
        fn = {"env": part_env, "equality": part_equality}[args.part]
        doc = fn(args)
        name = args.part if args.part == "env" else f"equality_{args.dtype}" + (
            "_graphs" if args.dtype == "float32" and not args.eager else "")
        (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
        return 0

    t0 = time.time()
    me = [sys.executable, str(Path(__file__).resolve()), str(out), "--device", args.device]
    if args.quick:
        me.append("--quick")
    cpu = args.device == "cpu"
    deadline = t0 + (args.budget or (2400 if cpu else 560))
    summary: dict = {"device": _device_name(args.device), "quick": args.quick, "parts": {}}
    parts = summary["parts"]
    parts["env"] = _run_part("env", me + ["--part", "env"], out, 90, deadline)
    # float32 eager: the strict check (no graphs; vLLM picks a float32-capable backend). Triton
    # would run float32 dots in TF32 by default: IEEE keeps the engine at float32 round-off.
    if args.skip_equality:
        args.skip_bf16 = True
    else:
        parts["equality_float32"] = _run_part(
            "equality_float32", me + ["--part", "equality", "--dtype", "float32", "--eager"], out,
            args.part_timeout or (600 if cpu else 240), deadline, env={"TRITON_F32_DEFAULT": "ieee"})
    # float32 again with vLLM's compile + PIECEWISE CUDA graphs, same strict gate: separates a
    # graph/compile defect from bf16 rounding (the bf16 part below changes both at once).
    if not args.skip_equality and not cpu and not args.skip_fp32_graphs:
        parts["equality_float32_graphs"] = _run_part(
            "equality_float32_graphs", me + ["--part", "equality", "--dtype", "float32"], out,
            args.part_timeout or 240, deadline, env={"TRITON_F32_DEFAULT": "ieee"})
    # bf16 with vLLM's compile + CUDA graphs (eager on CPU, where vLLM has no graphs anyway).
    if not args.skip_bf16:
        parts["equality_bfloat16"] = _run_part(
            "equality_bfloat16", me + ["--part", "equality", "--dtype", "bfloat16"]
            + (["--eager"] if cpu else []), out, args.part_timeout or (600 if cpu else 240), deadline)
    if not args.skip_bench:
        bench = [sys.executable, str(REPO / "benchmarks" / "bench_llada2.py"), "--mini-shaped",
                 "--out", str(out / "bench_mini.json")]
        if args.quick:
            bench += ["--reduced", "--repeats", "1", "--concurrency", "1", "2", "--prompt-len", "40",
                      "--max-tokens", "32", "--dtype", "bfloat16"]
        else:
            # 0.85: the decode's logits (up to 1024 rows x 157k vocab, float32 copies) live
            # outside vLLM's memory profile
            bench += ["--concurrency", "1", "2", "4", "8", "16", "32", "--prompt-len", "100",
                      "--max-tokens", "128", "--block-length", "32", "--steps", "8",
                      "--dtype", "bfloat16", "--gpu-memory-utilization", "0.85"]
            # every step of this run is <= 32 requests x 32 tokens: capture just these sizes
            bench += ["--cudagraph-capture-sizes", "1", "2", "4", "8", "16", "32", "64", "128",
                      "256", "512", "1024"]
        parts["bench"] = _run_part("bench_mini", bench, out, 900 if cpu else 420, deadline)
    summary["total_s"] = round(time.time() - t0, 1)

    lines = [f"# LLaDA2 block decode check on {summary['device']}", "",
             f"total {summary['total_s']} s" + (" (quick)" if args.quick else ""), ""]
    env = parts["env"].get("result", {})
    lines.append(f"- overlays: check rc {env.get('overlay_check_rc')}"
                 + (f", re-applied (recheck rc {env.get('overlay_recheck_rc')})"
                    if "overlay_apply_rc" in env else "") + f"; vllm {env.get('vllm')}, "
                 f"torch {env.get('torch')}")
    lines += ["", "| check | dtype | graphs | equal c=8 | equal c=1 | startup s | verdict |",
              "|---|---|---|---|---|---|---|"]
    ok = bool(env.get("ok"))
    for key in ("equality_float32", "equality_float32_graphs", "equality_bfloat16"):
        if key not in parts:
            continue
        r = parts[key].get("result")
        if r is None:
            lines.append(f"| {key} | | | | | | FAILED rc={parts[key]['rc']} (see {key}.log) |")
            ok = False
            continue
        diffs = ", ".join(f"req{i}@{row['first_diff_c8']}/{row['first_diff_c1']}"
                          for i, row in enumerate(r["rows"])
                          if not (row["equal_c8"] and row["equal_c1"]))
        vs32 = r.get("vs_float32")
        verdict = ("PASS" if r["strict_equal"] else
                   ("AGREE" if r["ok"] else "FAIL") + f" (prefix agreement {r['prefix_agreement']};"
                   f" first diffs c8/c1: {diffs}"
                   + (f"; vs float32 math: engine {vs32['engine_equal']}/{r['requests']} equal, "
                      f"matched {vs32['engine_matched_prefix']}, bf16 reference "
                      f"{vs32['reference_equal']}/{r['requests']}, matched "
                      f"{vs32['reference_matched_prefix']}" if vs32 else "") + ")")
        ok = ok and r["ok"]
        lines.append(f"| engine == reference | {r['dtype']} | {'no' if r['eager'] else 'yes'} | "
                     f"{r['equal_c8']}/{r['requests']} | {r['equal_c1']}/{r['requests']} | "
                     f"{r['startup_s']} | {verdict} |")
    b = parts.get("bench", {}).get("result")
    if b:
        lines += ["", f"Benchmark: {b['model_label']} shapes, {b['weights']}, block "
                  f"{b['args']['block_length']}, {b['args']['steps']} steps/block, prompt "
                  f"{b['args']['prompt_len']}, {b['args']['max_tokens']} new tokens, startup "
                  f"{b['startup_s']:.0f} s", "",
                  "| concurrency | tok/s | scaling | tok/denoising fwd | tok/fwd incl refresh | s |",
                  "|---|---|---|---|---|---|"]
        for r in b["rows"]:
            lines.append(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['scaling_vs_1']} | "
                         f"{r['tokens_per_denoising_forward']} | "
                         f"{r['tokens_per_forward_incl_refresh']} | {r['seconds']} |")
    elif "bench" in parts:
        lines.append(f"\nbenchmark FAILED rc={parts['bench']['rc']} (see bench_mini.log)")
        ok = False
    summary["ok"] = ok
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _pack_logs(out)
    print("\n".join(lines))
    print("overall:", "PASS" if ok else "FAIL", f"({out / 'summary.json'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
