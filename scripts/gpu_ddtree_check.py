"""DDTree on a CUDA GPU, one command: greedy equality with the target alone + tokens/s, per mode.

    python3 scripts/gpu_ddtree_check.py OUTDIR [--models models/tiny-pair] [--modes ...] [--quick]

Runs on a host where the offline bundle is installed (PYTHONPATH=/opt/vllm-site: vLLM 0.26 with our
overlays); the repo checkout is the working directory. Every mode runs in a fresh process (several
engines in one process trip over vLLM's kernel registration), in-process engine (no API server):

- ``target``: the target alone, greedy, top-4 logits per position (the equality reference);
- ``dflash``: flat DFlash (15 speculative tokens) - the rollback path, the bar to match;
- ``ddtree``: DDTree tree verify with the real drafter (budget 16, top-k 4);
- ``ddtree-oracle``: tree verify with a test drafter whose top-1 is wrong and top-2 right at every
  depth (tests/support/oracle_drafter.py): accepted paths must leave the top-1 chain;
- ``ddtree-graphs``: ``ddtree`` with CUDA graphs (piecewise; the others run eager).
- ``ddtree-default-graphs``: the product's default shape (budget 32, top_k 8: the config defaults)
  with CUDA graphs and the default tree attention, as ``vllm serve`` runs it.
- ``ddtree-b32k1-graphs``, ``ddtree-b64k8-graphs`` (only when named in ``--modes``): the sweep's
  larger verify blocks (33 / 65 tokens per request) with CUDA graphs.

Equality uses the team rule (tests/support/equality.py: identical up to the first divergence, which
must be a tie of the reference's top-2 logits within bf16 noise). Speed: greedy, ignore_eos,
concurrency 1 (prompts one after another) and 8 (one batch), tokens/s = generated tokens / wall s.
Writes OUTDIR/ddtree_gpu.json and prints a table; every record names the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_share import engine_memory_kwargs, gdn_prefill_config, gpu_shared  # noqa: E402

ORACLE_HOOK = "tests.support.oracle_drafter:draft_logits"
RESULT_PREFIX = "RESULT "  # the line a mode's child prints its result on (run_mode_process)


def mode_configs(models: Path) -> dict[str, dict]:
    drafter = str(models / "drafter")
    tree = {"method": "dflash_ddtree", "model": drafter, "ddtree_budget": 16, "ddtree_top_k": 4}
    return {
        "target": {"spec": None},
        "dflash": {"spec": {"method": "dflash", "model": drafter, "num_speculative_tokens": 15}},
        "ddtree": {"spec": tree},
        "ddtree-oracle": {"spec": dict(tree, ddtree_budget=32), "oracle": True},
        "ddtree-graphs": {"spec": tree, "graphs": True},
        # the product's default shape (config defaults: budget 32, top_k 8) as a server runs it
        "ddtree-default-graphs": {"spec": {"method": "dflash_ddtree", "model": drafter}, "graphs": True},
        # the sweep's larger shapes under graphs (not in the default --modes): on the H100 with
        # graphs + FlashInfer, b32/b64 top_k 1 accepted more than b8/b16 top_k 1 (same chain trees),
        # 24 Nov 2026; these check that the bigger verify blocks still give the target's tokens
        "ddtree-b32k1-graphs": {"spec": dict(tree, ddtree_budget=32, ddtree_top_k=1), "graphs": True},
        "ddtree-b64k8-graphs": {"spec": dict(tree, ddtree_budget=64, ddtree_top_k=8), "graphs": True},
    }


def prompts_for(models: Path, n: int, min_len: int, max_len: int) -> list[list[int]]:
    from measure_tiny_pair import heldout_prompts

    return heldout_prompts(models / "target" / "tokenizer.json", n, min_len, max_len)


# ----------------------------------------------------------------------------- one engine (child)


def run_one(cfg: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(model=cfg["model"], enforce_eager=not cfg.get("graphs"), max_model_len=2048,
              language_model_only=True, enable_prefix_caching=False, seed=0, max_num_seqs=8,
              speculative_config=cfg.get("spec"), disable_log_stats=False,
              logprobs_mode="processed_logits", max_logprobs=4, **engine_memory_kwargs(0.5),
              additional_config=gdn_prefill_config())
    startup_s = time.monotonic() - t0

    def gen(prompts, max_tokens, logprobs=None):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                logprobs=logprobs)
        return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    t1 = time.monotonic()
    outs = gen(cfg["prompts"], cfg["max_tokens"], 4 if cfg.get("logprobs") else None)
    eq_s = time.monotonic() - t1
    result = []
    for o in outs:
        c = o.outputs[0]
        top = None
        if c.logprobs:
            top = [[(int(t), float(lp.logprob)) for t, lp in d.items()] for d in c.logprobs]
        result.append({"tokens": list(c.token_ids), "top2": top})
    before = _counters(llm)
    # acceptance over the equality batch alone: the oracle drafter only knows these prompts' first
    # max_tokens reference tokens, so the speed runs below (longer, and past the reference) measure
    # the drafter's own logits, not the oracle
    eq_drafts = before.get("vllm:spec_decode_num_drafts", 0.0)
    eq_al = (round(1 + before.get("vllm:spec_decode_num_accepted_tokens", 0.0) / eq_drafts, 3)
             if eq_drafts else None)
    speed = {}
    sp, st = cfg["speed_prompts"], cfg["speed_tokens"]
    gen(sp[:1], 8)  # warm-up (kernels, allocator)
    t1 = time.monotonic()
    for p in sp[:4]:
        gen([p], st)
    speed["c1_tok_s"] = round(4 * st / (time.monotonic() - t1), 1)
    t1 = time.monotonic()
    gen(sp[:8], st)
    speed["c8_tok_s"] = round(8 * st / (time.monotonic() - t1), 1)
    after = _counters(llm)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    drafts = delta.get("vllm:spec_decode_num_drafts", 0.0)
    accepted = delta.get("vllm:spec_decode_num_accepted_tokens", 0.0)
    speed["acceptance_length"] = round(1 + accepted / drafts, 3) if drafts else None
    tree = _tree_stats(llm)
    return {"outputs": result, "startup_s": round(startup_s, 1), "equality_batch_s": round(eq_s, 2),
            "speed": speed, "equality_acceptance_length": eq_al, "ddtree_counters": tree,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpu_shared": gpu_shared()}


def _tree_stats(llm) -> dict:
    """The engine's DDTree counters (in-process engine: the model runner lives in this process)."""
    try:
        core = llm.llm_engine.engine_core.engine_core
        state = core.model_executor.driver_worker.worker.model_runner._ddtree
    except AttributeError:
        return {}
    s = state.stats
    return {"steps": s.steps, "nodes_verified": s.nodes_verified, "nodes_wasted": s.nodes_wasted,
            "sibling_taken": s.sibling_taken,
            "accepted_hist": {str(k): v for k, v in sorted(s.accepted_hist.items())},
            "build_s": round(s.build_s, 3), "verify_s": round(s.verify_s, 3),
            "commit_s": round(s.commit_s, 3)}


def _counters(llm) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num") and hasattr(m, "value"):
            out[m.name] = float(m.value)
    return out


# ----------------------------------------------------------------------------- child processes
# (shared by gpu_ddtree_v2_check.py and gpu_ddtree_profile.py)


def greedy_equality(ref_outputs: list[dict], outputs: list[dict]) -> dict:
    """A mode's greedy outputs against the target's under the team rule (tests/support/equality.py):
    identical requests, requests that left the target only at a bf16 tie, and the failures."""
    from tests.support.equality import compare_greedy

    verdicts = [compare_greedy(r["tokens"], r["top2"], o["tokens"])
                for r, o in zip(ref_outputs, outputs)]
    return {"equal": sum(v.ok and v.identical for v in verdicts),
            "tie_divergences": sum(v.ok and not v.identical for v in verdicts),
            "failures": [v.detail for v in verdicts if not v.ok]}


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a mode's engine process: this checkout importable, unbuffered output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def oracle_env(out: Path, prompts: list[list[int]], ref_outputs: list[dict]) -> dict[str, str]:
    """Writes the reference continuations for tests/support/oracle_drafter.py (true token ranked
    second at every depth) and returns the variables that load it in the engine process."""
    oracle = out / "oracle.json"
    oracle.write_text(json.dumps([{"prompt": p, "completion": o["tokens"]}
                                  for p, o in zip(prompts, ref_outputs)]))
    return {"DDTREE_TEST_DRAFT_HOOK": ORACLE_HOOK, "DDTREE_ORACLE_MODE": "top2",
            "DDTREE_ORACLE_FILE": str(oracle)}


def run_mode_process(script: str, out: Path, mode: str, cfg: dict, env: dict[str, str], log: Path,
              timeout: float | None = None) -> tuple[dict | None, str]:
    """Runs ``script OUT --child CFG`` (one engine in a fresh process: several engines in one
    process trip over vLLM's kernel registration). Its stderr and stdout (vLLM logs to stdout) go
    to ``log``. Returns (the child's RESULT dict or None, exit status text)."""
    cfg_file = out / f"cfg-{mode}.json"
    cfg_file.write_text(json.dumps(cfg))
    with open(log, "w") as f:
        try:
            p = subprocess.run([sys.executable, script, str(out), "--child", str(cfg_file)],
                               stdout=subprocess.PIPE, stderr=f, text=True, env=env, cwd=REPO,
                               timeout=timeout)
            stdout, status = p.stdout, str(p.returncode)
        except subprocess.TimeoutExpired as exc:
            stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            status = f"timeout {timeout:.0f} s"
    cfg_file.unlink()
    with open(log, "a") as f:
        f.write("\n--- stdout ---\n" + "\n".join(
            ln for ln in stdout.splitlines() if not ln.startswith(RESULT_PREFIX)))
    line = next((ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)), None)
    return (json.loads(line[len(RESULT_PREFIX):]) if line is not None else None), status


def serve_child(cfg_file: str, fn) -> int:
    """The child side of ``run_mode_process``: ``fn(cfg)`` for the config file it was given,
    printed as the RESULT line the parent reads."""
    cfg = json.loads(Path(cfg_file).read_text())
    print(RESULT_PREFIX + json.dumps(fn(cfg)), flush=True)
    return 0


def report_failure(mode: str, status: str, log: Path, lines: int = 25) -> str:
    """A mode whose child gave no result: prints the tail of its log, returns the record's error."""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    print(f"[{mode}] FAILED\n" + "\n".join(tail), flush=True)
    return f"exit {status}; see {log.name}"


# ----------------------------------------------------------------------------- driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", type=Path, default=REPO / "models" / "tiny-pair")
    ap.add_argument("--modes", default="target,dflash,ddtree,ddtree-oracle,ddtree-graphs,"
                                       "ddtree-default-graphs")
    ap.add_argument("--quick", action="store_true", help="few prompts/tokens (CPU smoke run)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return serve_child(args.child, run_one)


    args.out.mkdir(parents=True, exist_ok=True)
    n_eq, eq_tokens, speed_tokens = (4, 16, 16) if args.quick else (20, 64, 128)
    prompts = prompts_for(args.models, n_eq, 48, 600 if not args.quick else 96)
    speed_prompts = prompts_for(args.models, 8, 64, 256)
    configs = mode_configs(args.models)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in configs]
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {list(configs)}")
    if "target" not in modes:
        modes.insert(0, "target")
    report: dict = {"models": str(args.models), "equality_prompts": len(prompts),
                    "equality_tokens": eq_tokens, "speed_tokens": speed_tokens, "modes": {}}
    ref = None
    for mode in modes:
        cfg = dict(configs[mode], model=str(args.models / "target"), prompts=prompts,
                   max_tokens=eq_tokens, logprobs=(mode == "target"), speed_prompts=speed_prompts,
                   speed_tokens=speed_tokens)
        env = child_env(**(oracle_env(args.out, prompts, ref["outputs"]) if cfg.pop("oracle", False)
                           else {}))
        t0 = time.monotonic()
        log = args.out / f"{mode}.log"
        res, status = run_mode_process(__file__, args.out, mode, cfg, env, log)
        rec: dict = {"wall_s": round(time.monotonic() - t0, 1)}
        if res is None:
            rec["error"] = report_failure(mode, status, log)
            report["modes"][mode] = rec
            if mode == "target":
                break
            continue
        rec.update({k: v for k, v in res.items() if k != "outputs"})
        if mode == "target":
            ref = res
        else:
            rec.update(greedy_equality(ref["outputs"], res["outputs"]))
        report["modes"][mode] = rec
        report["device"] = res.get("device")
        (args.out / "ddtree_gpu.json").write_text(json.dumps(report, indent=2))
        print(f"[{mode}] {json.dumps(rec)[:600]}", flush=True)
    print(f"\nDDTree GPU check on {report.get('device')} ({len(prompts)} prompts x {eq_tokens} tokens;"
          f" speed {speed_tokens} tokens)")
    print(f"{'mode':<15}{'equal':>7}{'ties':>6}{'fail':>6}{'AL eq':>8}{'AL speed':>9}{'tok/s c1':>10}"
          f"{'tok/s c8':>10}")
    ok = True
    for mode, rec in report["modes"].items():
        sp = rec.get("speed", {})
        fails = len(rec.get("failures", [])) if "error" not in rec else "ERR"
        ok &= fails in (0,) or mode == "target"
        print(f"{mode:<15}{rec.get('equal', '-')!s:>7}{rec.get('tie_divergences', '-')!s:>6}"
              f"{fails!s:>6}{rec.get('equality_acceptance_length', '-')!s:>8}"
              f"{sp.get('acceptance_length', '-')!s:>9}{sp.get('c1_tok_s', '-')!s:>10}"
              f"{sp.get('c8_tok_s', '-')!s:>10}")
    (args.out / "ddtree_gpu.json").write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
