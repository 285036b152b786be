#!/usr/bin/env python3
"""Run one benchmark profile: `vllm serve` per mode, `vllm bench serve` per (category, concurrency).

    python benchmarks/run_profile.py --profile gpu-quick --models models/tiny-pair \
        --model-label "trained tiny pair" [--out DIR] [--modes nospec,dflash]
    make bench PROFILE=gpu-quick MODELS=models/tiny-pair

For every mode of the profile (benchmarks/profiles.py) it starts the patched vLLM server on
127.0.0.1 (scripts/servertools.py), and for every prompt category and concurrency drives vLLM's own
benchmark client (`vllm.benchmarks.serve`, what `vllm bench serve` runs; in this process, so the
client's start-up is paid once) with the category's custom-dataset JSONL (benchmarks/prompt_sets.py),
greedy, fixed output length (ignore_eos). Around each point it reads the server's /metrics and
takes the spec-decode counters' difference: acceptance length (accepted/drafts + 1) and accepted
tokens per draft position.

Writes into --out (default benchmarks/results/<device>/<profile>/), few files on purpose (the GPU
tool returns at most 8):
  results.json   device, models, copy bandwidth, every point (the bench client's JSON + spec stats
                 + the physical bound), server start-up times and DDTree log lines; rewritten after
                 every point, so a run cut short keeps what it measured
  summary.md     the table, device named in the title
  bench.log      the client's own output; server-<mode>.log tails of each server log
PNG plots come from benchmarks/plot_results.py, run wherever matplotlib is.

The physical bound printed next to each point: a verify step must at least read the target's and
the drafter's weights once plus each request's attention KV and GDN state, so
    tok/s <= concurrency x acceptance_length x copy_bandwidth / bytes_read_per_step
with copy_bandwidth measured on the device in the same run (device-to-device copy, bytes read +
written) and bytes_read_per_step computed from the checkpoints (benchmarks/physical_bound.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(HERE))

from servertools import (CPU_TINY_FLAGS, VllmServer, ddtree_lines, engine_error_lines,  # noqa: E402
                         log_excerpt,
                         spec_decode_stats)
from physical_bound import bound_tokens_per_s, model_bytes  # noqa: E402
import profiles as prof  # noqa: E402
import prompt_sets  # noqa: E402

#: Server flags per machine kind. GPU: prefix caching off (unique prompts; hybrid + spec decode +
#: prefix caching is a separate question), GDN prefill on the Triton kernels (FlashInfer's GDN
#: prefill would JIT-compile for minutes on a fresh host; decode speed is what is measured here).
SERVER_FLAGS = {
    "cpu": [f for f in CPU_TINY_FLAGS],
    "gpu": ["--language-model-only", "--max-model-len", "4096", "--no-enable-prefix-caching",
            "--seed", "0", "--gpu-memory-utilization", "0.5",
            "--additional-config", json.dumps({"gdn_prefill_backend": "triton"})],
}


# ------------------------------------------------------------------------------------- the device

def device_info() -> dict:
    info = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info.update(kind="gpu", device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                        sm=".".join(map(str, torch.cuda.get_device_capability(0))),
                        memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
            return info
    except ImportError:
        pass
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info.update(kind="cpu", device=f"CPU {cpu} ({os.cpu_count()} cores)")
    return info


def device_slug(info: dict) -> str:
    name = info["device"]
    for key in ("H100", "H200", "B200", "GB10", "A100", "L40S"):
        if key in name:
            return key.lower()
    if info["kind"] == "gpu":
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    model = re.sub(r"\(.*?\)|CPU|@.*", "", name).strip()
    return "cpu-" + re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40]


def copy_bandwidth(gib: float = 1.0, iters: int = 20) -> dict | None:
    """Device-to-device copy bandwidth (bytes read + written per second), median of ``iters``."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    t = times[len(times) // 2]
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_per_s": 2 * n / t, "GBps": round(2 * n / t / 1e9, 1), "buffer_gib": gib,
            "method": f"torch copy_ of {gib:g} GiB uint8, median of {iters}, read+write counted"}


#: the run's clock (tests replace it to exercise the --budget-s guard without waiting)
clock = time.monotonic


# ----------------------------------------------------------------------------------- the client

def bench_argv(base_url: str, model: str, tokenizer: str, dataset: Path, requests: int,
               concurrency: int, output_len: int, warmups: int, xargs: dict | None = None) -> list[str]:
    """The `vllm bench serve` arguments of one point. ``xargs``: per-request settings, sent in
    every request body (warm-ups included) as ``vllm_xargs`` through the client's ``--extra-body``."""
    argv = ["--backend", "vllm", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
            "--custom-output-len", str(output_len), "--ignore-eos", "--temperature", "0",
            "--num-prompts", str(requests), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--num-warmups", str(warmups), "--seed", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90",
            "--disable-tqdm"]
    if xargs:
        argv += ["--extra-body", json.dumps({"vllm_xargs": xargs}, sort_keys=True)]
    return argv


def bench_parser():
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser


def run_bench(base_url: str, model: str, tokenizer: str, dataset: Path, requests: int,
              concurrency: int, output_len: int, warmups: int, log,
              xargs: dict | None = None) -> dict:
    """One point through vLLM's benchmark client (the code `vllm bench serve` runs)."""
    from vllm.benchmarks.serve import main as bench_main

    argv = bench_argv(base_url, model, tokenizer, dataset, requests, concurrency, output_len,
                      warmups, xargs)
    args = bench_parser().parse_args(argv)
    with contextlib.redirect_stdout(log):
        result = bench_main(args)
    result["client_argv"] = ["vllm", "bench", "serve", *argv]
    return result


def missing_output_tokens(res: dict, output_len: int) -> int:
    """Output tokens a point lacks: ignore_eos requests all run to output_len (0: none missing)."""
    completed = int(res.get("completed") or 0)
    total = int(res.get("total_output_tokens") or 0)
    return max(0, completed * output_len - total)


def metrics(server: VllmServer) -> dict[str, float]:
    return server.metrics()


def spec_delta(before: dict, after: dict) -> dict:
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if k.startswith("vllm:spec_decode")}
    return spec_decode_stats(diff)


SUMMARY_KEYS = ("output_throughput", "total_token_throughput", "request_throughput", "duration",
                "completed", "failed", "total_input_tokens", "total_output_tokens",
                "median_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "p50_tpot_ms",
                "p90_tpot_ms", "median_itl_ms", "p90_itl_ms", "p50_e2el_ms", "p90_e2el_ms")


# ---------------------------------------------------------------------------------------- runner

def best_ddtree(doc: dict, profile: prof.Profile, server: str) -> dict | None:
    """The per-request DDTree shape of the main grid (on ``server``) with the highest geometric
    mean of output tok/s over ``profile.best_of``; None when no shape has all those points."""
    want = set(profile.best_of)
    scores: dict[str, dict] = {}
    for p in doc["points"]:
        if (p.get("server") != server or not p.get("xargs") or p.get("stage") != 0
                or (p["category"], p["concurrency"]) not in want or not p.get("output_throughput")):
            continue
        e = scores.setdefault(p["mode"], {"xargs": p["xargs"], "tok_s": {}})
        e["tok_s"][f"{p['category']}@c{p['concurrency']}"] = p["output_throughput"]
    ranked = []
    for mode, e in scores.items():
        vals = list(e["tok_s"].values())
        if len(vals) == len(want):
            geo = 1.0
            for v in vals:
                geo *= v
            ranked.append((geo ** (1 / len(vals)), mode, e))
    if not ranked:
        return None
    geo, mode, e = max(ranked, key=lambda t: t[0])
    return {"mode": mode, "xargs": e["xargs"], "score_tok_s": round(geo, 2), "tok_s": e["tok_s"],
            "rule": f"highest geometric mean of output tok/s over {sorted(want)} (main grid)",
            "candidates": len(ranked)}


class Deadline:
    """The --budget-s guard: a point or a server start runs only if it still fits, keeping
    ``reserve_s`` free for every server still to come; what does not fit is recorded as skipped."""

    def __init__(self, budget_s: float | None, reserve_s: float, start_s: float,
                 t0: float | None = None):
        self.t0 = clock() if t0 is None else t0
        self.budget_s, self.reserve_s, self.start_s = budget_s, reserve_s, start_s
        self.point_s: dict[tuple[str, int], float] = {}  # (server, concurrency) -> longest point

    def left(self, servers_after: int) -> float:
        if self.budget_s is None:
            return float("inf")
        return self.budget_s - (clock() - self.t0) - servers_after * self.reserve_s

    def server_fits(self, servers_after: int) -> bool:
        return self.left(servers_after) >= self.start_s + 10.0  # a start and at least one point

    def point_fits(self, server: str, concurrency: int, servers_after: int) -> bool:
        same_c = self.point_s.get((server, concurrency))
        guess = same_c if same_c is not None else max(
            [v for (srv, _), v in self.point_s.items() if srv == server] or [10.0])
        return self.left(servers_after) >= guess

    def record(self, server: str, concurrency: int, wall_s: float) -> None:
        key = (server, concurrency)
        self.point_s[key] = max(self.point_s.get(key, 0.0), wall_s)


def run(profile: prof.Profile, models: Path, model_label: str, out: Path, device: dict,
        prompts_dir: Path, points: list[tuple[prof.Mode, str, int, int]], bandwidth: dict | None,
        server_timeout: float, extra_server_args: list[str], budget_s: float | None = None,
        t_start: float | None = None) -> dict:
    """Run ``points`` ((mode, category, concurrency, stage)), one server per distinct server
    (modes differing only in per-request DDTree shape share one), servers in order of first use."""
    out.mkdir(parents=True, exist_ok=True)
    target, drafter = models / "target", models / "drafter"
    for p in (target, drafter):
        if not (p / "config.json").is_file():
            raise ValueError(f"--models: {p} has no config.json (expected target/ and drafter/)")
    categories = tuple(dict.fromkeys(cat for _, cat, _, _ in points))
    prompt_info = prompt_sets.build(prompts_dir, max_chars=profile.prompt_chars, categories=categories)
    sizes = model_bytes(target, drafter)
    guard = Deadline(budget_s, profile.server_reserve_s, profile.server_start_s, t_start)
    doc = {
        "profile": profile.name, "about": profile.about, "device": device,
        "models": {"dir": str(models), "label": model_label, **sizes},
        "copy_bandwidth": bandwidth, "prompts": prompt_info,
        "settings": {"output_len": profile.output_len, "temperature": 0, "ignore_eos": True,
                     "server_flags": SERVER_FLAGS[profile.server] + list(profile.extra_server_args)
                     + extra_server_args,
                     "max_num_seqs": profile.max_num_seqs, "budget_s": budget_s,
                     "server_start_estimate_s": profile.server_start_s,
                     "server_reserve_s": profile.server_reserve_s},
        "servers": {}, "points": [], "skipped": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results_path = out / "results.json"
    log = open(out / "bench.log", "a")

    def save():
        results_path.write_text(json.dumps(doc, indent=1) + "\n")

    by_server: dict[str, list] = {}
    for pt in points:
        by_server.setdefault(pt[0].server, []).append(pt)
    server_names = list(by_server)

    def skip(mode_name, cat, c, server, reason, xargs=None):
        doc["skipped"].append({"mode": mode_name, "category": cat, "concurrency": c,
                               "server": server, "xargs": xargs, "reason": reason,
                               "at_s": round(clock() - guard.t0, 1)})

    for si, name in enumerate(server_names):
        later = len(server_names) - si - 1
        server_points = by_server[name]
        spec = server_points[0][0].speculative_config(str(drafter))
        if not guard.server_fits(later):
            for mode, cat, c, _ in server_points:
                skip(mode.name, cat, c, name, "budget: no time left to start this server", mode.xargs)
            save()
            print(f"[{name}] skipped: --budget-s leaves no time to start it", flush=True)
            continue
        args = SERVER_FLAGS[profile.server] + ["--max-num-seqs", str(profile.max_num_seqs)]
        args += list(profile.extra_server_args) + extra_server_args
        if spec is not None:
            args += ["--speculative-config", json.dumps(spec)]
        server_log = out / f"server-{name}.log"
        server = VllmServer(target, args, server_log)
        t0 = clock()
        entry = {"command": " ".join(server.command()[3:]), "spec": spec,
                 "modes": list(dict.fromkeys(m.name for m, _, _, _ in server_points))}
        doc["servers"][name] = entry
        try:
            server.start(timeout=server_timeout)
        except (RuntimeError, TimeoutError) as e:
            entry["error"] = str(e)[-3000:]
            save()
            print(f"[{name}] server failed: {str(e)[-800:]}", flush=True)
            continue
        entry["startup_s"] = round(clock() - t0, 1)
        print(f"[{name}] server ready in {entry['startup_s']}s", flush=True)
        try:
            for mode, cat, c, stage in server_points:
                xargs = mode.xargs
                mode_name = mode.name
                if mode.pick_best:
                    best = doc.setdefault("best_ddtree", {}).get(name) or best_ddtree(doc, profile, name)
                    if best is None:
                        skip(mode.name, cat, c, name, "no measured DDTree shape to pick the best from")
                        save()
                        continue
                    doc["best_ddtree"][name] = best
                    xargs = best["xargs"]
                    mode_name = f"ddtree-best-b{xargs['ddtree_budget']}-k{xargs['ddtree_top_k']}"
                if not guard.point_fits(name, c, later):
                    skip(mode_name, cat, c, name, "budget: --budget-s reached", xargs)
                    save()
                    continue
                if entry.get("died"):
                    skip(mode_name, cat, c, name, f"server died: {entry['died']}", xargs)
                    save()
                    continue
                n = profile.requests(c)
                try:
                    before = metrics(server)
                except OSError as e:  # the server is gone: keep the sweep's other servers
                    entry["died"] = _death(server, e, before_point=f"{mode_name} {cat} c={c}")
                    skip(mode_name, cat, c, name, f"server died: {entry['died']}", xargs)
                    save()
                    print(f"[{name}] server died: {entry['died']}", flush=True)
                    continue
                t1 = clock()
                try:
                    res = run_bench(server.base_url, str(target), str(target),
                                    Path(prompt_info[cat]["path"]), n, c, profile.output_len,
                                    min(profile.warmups, n), log, xargs=xargs)
                except Exception as e:  # one bad point must not lose the rest of the sweep
                    doc["points"].append({"mode": mode_name, "category": cat, "concurrency": c,
                                          "server": name, "xargs": xargs, "stage": stage,
                                          "error": repr(e)[-2000:]})
                    save()
                    print(f"[{mode_name}] {cat} c={c}: client failed: {e!r}", flush=True)
                    continue
                wall = clock() - t1
                guard.record(name, c, wall)
                try:
                    after = metrics(server)
                except OSError as e:
                    after = None
                    entry["died"] = _death(server, e, before_point=None, during=f"{mode_name} {cat} c={c}")
                    print(f"[{name}] server died: {entry['died']}", flush=True)
                if after is None or not res.get("completed"):
                    doc["points"].append({"mode": mode_name, "category": cat, "concurrency": c,
                                          "server": name, "xargs": xargs, "stage": stage,
                                          "error": entry.get("died") or "no request completed",
                                          **{k: res.get(k) for k in SUMMARY_KEYS if k in res}})
                    save()
                    print(f"[{mode_name}] {cat} c={c}: failed ({doc['points'][-1]['error']})", flush=True)
                    continue
                stats = spec_delta(before, after) if spec is not None else None
                if stats and stats.get("drafts"):
                    # drafts scheduled per verify block: the point's own budget (fewer only where
                    # the scheduler shortened blocks to fit its token budget)
                    stats["drafts_per_block"] = round(stats["draft_tokens"] / stats["drafts"], 3)
                al = stats["acceptance_length"] if stats else 1.0
                point = {"mode": mode_name, "category": cat, "concurrency": c, "requests": n,
                         "server": name, "xargs": xargs, "stage": stage,
                         "wall_s": round(wall, 2),
                         **{k: res.get(k) for k in SUMMARY_KEYS if k in res},
                         "spec_decode": stats,
                         "bound": bound_tokens_per_s(sizes, bandwidth, c, al, spec is not None,
                                                     res.get("total_input_tokens", 0) / max(n, 1),
                                                     profile.output_len),
                         "bench": {k: v for k, v in res.items() if k not in SUMMARY_KEYS}}
                short = missing_output_tokens(res, profile.output_len)
                if short:
                    # vllm bench counts a stream that ended in an error chunk (e.g. the engine
                    # died mid-point) as a success: with ignore_eos every request must reach
                    # output_len, so fewer tokens mean requests were cut short
                    point["missing_output_tokens"] = short
                    print(f"[{mode_name}] {cat} c={c}: {short} output tokens missing (requests cut "
                          f"short: engine error?)", flush=True)
                doc["points"].append(point)
                save()
                al_s = f" AL={al:.2f}" if stats else ""
                print(f"[{mode_name}] {cat:7s} c={c:3d} n={n:4d}: "
                      f"{point.get('output_throughput', 0):9.1f} tok/s "
                      f"TTFT p50 {point.get('p50_ttft_ms', 0):8.1f} ms "
                      f"TPOT p50 {point.get('p50_tpot_ms', 0):7.2f} ms{al_s}", flush=True)
        finally:
            server.stop()
            text = server.log_text()
            entry["ddtree_log"] = ddtree_lines(text)
            entry["attention_backend_log"] = [l.split("] ", 1)[-1] for l in text.splitlines()
                                              if "backend" in l.lower() and "using" in l.lower()][:6]
            server_log.write_text(log_excerpt(text))
            engine_error = engine_error_lines(text)
            if engine_error:  # the root cause of an EngineDeadError, lost from the tail above
                entry["engine_error"] = engine_error[:80]
                (out / f"server-{name}.engine-error.log").write_text("\n".join(engine_error) + "\n")
                print(f"[{name}] engine core failed; see server-{name}.engine-error.log", flush=True)
            save()
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc["elapsed_s"] = round(clock() - guard.t0, 1)
    save()
    log.close()
    (out / "summary.md").write_text(summary_markdown(doc))
    return doc


def _death(server: VllmServer, exc: Exception, before_point: str | None,
           during: str | None = None) -> str:
    """One line on a server that stopped answering: where in the sweep, its exit status, the error."""
    time.sleep(2)  # let the process finish exiting, so its status is known
    where = f"before {before_point}" if before_point else f"during {during}"
    proc = getattr(server, "proc", None)
    status = "still running" if server.alive() else f"exited {getattr(proc, 'returncode', '?')}"
    return f"{where}: /metrics failed ({exc!r:.200}); server {status}"


def summary_markdown(doc: dict) -> str:
    dev = doc["device"]["device"]
    bw = doc.get("copy_bandwidth")
    lines = [f"# {doc['profile']} on {dev}", "",
             f"Models: {doc['models']['label']} ({doc['models']['dir']}; target "
             f"{doc['models']['target_weight_bytes'] / 1e6:.1f} MB, drafter "
             f"{doc['models']['drafter_weight_bytes'] / 1e6:.1f} MB bf16). "
             f"Output {doc['settings']['output_len']} tokens, greedy, ignore_eos.",
             f"Copy bandwidth on {dev}: " + (f"{bw['GBps']} GB/s (read+write)" if bw else "not measured"
                                             " (no GPU)"), ""]
    for name, s in doc["servers"].items():
        spec = {k: v for k, v in (s.get("spec") or {}).items() if k != "model"}
        lines.append(f"- server `{name}`: speculative config {json.dumps(spec) if spec else 'none'}"
                     f"; start-up {s.get('startup_s', 'failed')} s; modes {', '.join(s.get('modes', []))}")
        if s.get("ddtree_log"):
            lines.append(f"  - server says: {s['ddtree_log'][0]}")
        if s.get("died"):
            lines.append(f"  - **server died** {s['died']} (its log keeps the first error)")
    for name, b in (doc.get("best_ddtree") or {}).items():
        lines.append(f"- best DDTree shape on `{name}`: {b['mode']} ({b['score_tok_s']} tok/s, "
                     f"{b['rule']})")
    if doc.get("skipped"):
        reasons = sorted({s["reason"] for s in doc["skipped"]})
        lines.append(f"- skipped: {len(doc['skipped'])} points ({'; '.join(reasons)})")
    lines += ["", "| device | mode | request vllm_xargs | category | conc | tok/s | TTFT p50 / p90 ms "
              "| TPOT p50 / p90 ms | AL | accepted per position | bound tok/s |", "|" + "---|" * 11]
    for p in doc["points"]:
        xa = (",".join(f"{k.replace('ddtree_', '')}={v}" for k, v in sorted(p["xargs"].items()))
              if p.get("xargs") else "-")
        if "error" in p:
            lines.append(f"| {dev} | {p['mode']} | {xa} | {p['category']} | {p['concurrency']} | "
                         f"failed: {p['error'][:80]} | | | | | |")
            continue
        sd = p.get("spec_decode")
        al = f"{sd['acceptance_length']:.2f}" if sd else "1"
        drafts = sd["drafts"] if sd else 0
        pos = (" ".join(f"{v / drafts:.2f}" for v in sd["accepted_per_position"][:8])
               if sd and drafts else "")
        b = p.get("bound")
        bound = f"{b['tokens_per_s']:.3g}" if b else "n/a"
        lines.append(f"| {dev} | {p['mode']} | {xa} | {p['category']} | {p['concurrency']} | "
                     f"{p.get('output_throughput', 0):.1f} | {p.get('p50_ttft_ms', 0):.1f} / "
                     f"{p.get('p90_ttft_ms', 0):.1f} | {p.get('p50_tpot_ms', 0):.2f} / "
                     f"{p.get('p90_tpot_ms', 0):.2f} | {al} | {pos} | {bound} |")
    lines += ["", "AL = acceptance length (accepted drafts per verify step + 1). Accepted per "
              "position = fraction of verify steps whose draft position i was accepted (first 8).",
              "Bound = concurrency x AL x copy bandwidth / bytes read per verify step (weights + "
              "per-request KV and GDN state); see benchmarks/physical_bound.py."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, choices=sorted(prof.PROFILES))
    ap.add_argument("--models", type=Path, default=REPO / "build" / "tiny-models",
                    help="folder with target/ and drafter/")
    ap.add_argument("--model-label", default=None,
                    help="what the models are (default: 'random tiny models' for build/tiny-models)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device-name", default=None, help="results folder name (default from the device)")
    ap.add_argument("--modes", default=None, help="comma list: run only these modes of the profile")
    ap.add_argument("--prompts-dir", type=Path, default=REPO / "build" / "bench-prompts")
    ap.add_argument("--server-timeout", type=float, default=600.0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra vllm serve argument")
    ap.add_argument("--no-bandwidth", action="store_true")
    ap.add_argument("--servers", default=None,
                    help="comma list: run only the points of these servers (names as in "
                         "--list; e.g. to split a profile over several device calls)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole run: points and server starts that no "
                         "longer fit are skipped and recorded (default: the profile's)")
    ap.add_argument("--server-per-mode", action="store_true",
                    help="run every DDTree shape on a server of its own shape instead of sharing "
                         "one server through per-request settings")
    ap.add_argument("--list", action="store_true", help="print the profile's servers and points, run nothing")
    args = ap.parse_args(argv)

    profile = prof.PROFILES[args.profile]
    points = profile.points()
    if args.server_per_mode:
        points = [(m.dedicated(), cat, c, st) for m, cat, c, st in points]
    if args.modes:
        wanted = args.modes.split(",")
        unknown = sorted(set(wanted) - {m.name for m, _, _, _ in points})
        if unknown:
            raise SystemExit(f"--modes: {unknown} not in profile {profile.name} "
                             f"({', '.join(m.name for m in profile.all_modes())})")
        points = [pt for pt in points if pt[0].name in wanted]
    if args.servers:
        wanted = args.servers.split(",")
        names = list(dict.fromkeys(m.server for m, _, _, _ in points))
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"--servers: {unknown} not in profile {profile.name} ({', '.join(names)})")
        points = [pt for pt in points if pt[0].server in wanted]
    if args.list:
        for name in dict.fromkeys(m.server for m, _, _, _ in points):
            mine = [pt for pt in points if pt[0].server == name]
            print(f"{name}: {len(mine)} points, modes "
                  f"{', '.join(dict.fromkeys(m.name for m, _, _, _ in mine))}")
        return 0
    budget_s = args.budget_s if args.budget_s is not None else profile.budget_s
    t_start = clock()  # the budget counts from here (bandwidth, prompts, servers, points)
    if args.model_label is None:
        tiny = (REPO / "build" / "tiny-models").resolve()
        args.model_label = ("random tiny models (scripts/tiny_models.py)"
                            if args.models.resolve() == tiny else str(args.models))
    device = device_info()
    if profile.server == "gpu" and device["kind"] != "gpu":
        raise SystemExit(f"--profile {profile.name} needs a GPU; this machine has none")
    slug = args.device_name or device_slug(device)
    out = args.out or HERE / "results" / slug / profile.name
    bw = None if args.no_bandwidth else copy_bandwidth()
    print(f"device: {device['device']}; copy bandwidth: {bw['GBps'] if bw else 'n/a'} GB/s; "
          f"models: {args.model_label}; out: {out}", flush=True)
    doc = run(profile, args.models.resolve(), args.model_label, out, device, args.prompts_dir,
              points, bw, args.server_timeout, args.server_arg, budget_s, t_start)
    print(summary_markdown(doc))
    failed = [p for p in doc["points"] if "error" in p] + [
        m for m, s in doc["servers"].items() if "error" in s]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
