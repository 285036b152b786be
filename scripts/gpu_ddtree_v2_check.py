"""DDTree in vLLM's V2 model runner on a CUDA GPU, one command: greedy equality + tree path proof.

    python3 scripts/gpu_ddtree_v2_check.py OUTDIR [--models models/tiny-pair] [--modes ...]
        [--budget-s 170] [--quick]

Runs on a host with the offline bundle installed (PYTHONPATH=/opt/vllm-site: vLLM 0.26 with our
overlays, this branch's series applied); the repo checkout is the working directory. vLLM's V2 model
runner does not run on the CPU wheel ("Model Runner V2 requires Triton"), so this is its only check.
Every mode is a fresh process with ``VLLM_USE_V2_MODEL_RUNNER=1`` (in-process engine, eager):

- ``target``: the target alone (the equality reference, top-4 logprobs per position);
- ``dflash``: flat DFlash, 15 speculative tokens;
- ``ddtree``: DDTree tree verify with the real drafter (budget 16, top-k 4);
- ``ddtree-oracle``: tree verify with the test drafter whose top-1 is wrong and top-2 right at every
  depth (tests/support/oracle_drafter.py, via DDTREE_TEST_DRAFT_HOOK): accepted paths must leave
  the top-1 chain, so ``sibling_taken > 0`` proves siblings were verified and committed;
- ``ddtree-logprobs``: ``ddtree`` asking for top-4 logprobs (committed tokens' rows laid out along
  the accepted path) - compared with the target's logprobs;
- ``ddtree-fallback``: ``ddtree`` with ``DDTREE_V2_TREE=0``: flat DFlash over the top-1 chain, the
  fallback logged and counted (``vllm:ddtree_fallback_total``);
- ``ddtree-graphs``: ``ddtree`` with CUDA graphs (lowered to PIECEWISE for tree verify).

Checks per mode: the engine really ran the V2 runner (its class lives under vllm.v1.worker.gpu);
greedy outputs equal to the target under the team rule (tests/support/equality.py); tree modes:
DDTree stats show tree nodes verified (``nodes_verified > 0``, more than one node per step), the
oracle mode ``sibling_taken > 0``; fallback mode: no tree state, fallback log line + metric.
A budget guard skips the modes that would not finish within ``--budget-s`` (default 170 s).
Writes OUTDIR/ddtree_v2_gpu.json (every record names the GPU) and prints a table; exit 0 iff all
checks of the modes that ran pass.
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

from gpu_share import engine_memory_kwargs, gdn_prefill_config  # noqa: E402

from gpu_ddtree_check import (_counters, _tree_stats, child_env, greedy_equality,  # noqa: E402
                              oracle_env, prompts_for, report_failure,
                              run_mode_process, serve_child)

FALLBACK_LOG = "tree verify is not available here"
ALL_MODES = "target,dflash,ddtree,ddtree-oracle,ddtree-logprobs,ddtree-fallback,ddtree-graphs"


def mode_configs(models: Path) -> dict[str, dict]:
    drafter = str(models / "drafter")
    tree = {"method": "dflash_ddtree", "model": drafter, "ddtree_budget": 16, "ddtree_top_k": 4}
    return {
        "target": {"spec": None, "logprobs": True},
        "dflash": {"spec": {"method": "dflash", "model": drafter, "num_speculative_tokens": 15}},
        "ddtree": {"spec": tree, "tree": True},
        "ddtree-oracle": {"spec": dict(tree, ddtree_budget=32), "tree": True, "oracle": True},
        "ddtree-logprobs": {"spec": tree, "tree": True, "logprobs": True},
        "ddtree-fallback": {"spec": tree, "env": {"DDTREE_V2_TREE": "0"}, "fallback": True},
        "ddtree-graphs": {"spec": tree, "tree": True, "graphs": True},
    }


# ----------------------------------------------------------------------------- one engine (child)


def _runner(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def _fallback_counts() -> dict[str, float]:
    """``vllm:ddtree_fallback_total`` samples in this process's metrics (``LLM.get_metrics()``'s
    view), by reason label. The config counts the fallback before vLLM's stat logger starts; the
    counter stays readable after the logger clears vLLM's collectors
    (``vllm.config.ddtree._FallbackMetric``; tests/config/test_fallback_metric.py)."""
    try:
        from vllm.v1.metrics.reader import get_metrics_snapshot
    except ImportError:
        return {}
    out: dict[str, float] = {}
    for m in get_metrics_snapshot():
        if m.name == "vllm:ddtree_fallback":
            reason = m.labels.get("reason", "")
            out[reason] = out.get(reason, 0) + m.value
    return out


def run_one(cfg: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    import torch
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(model=cfg["model"], enforce_eager=not cfg.get("graphs"), max_model_len=2048,
              language_model_only=True, enable_prefix_caching=False, seed=0, max_num_seqs=8,
              speculative_config=cfg.get("spec"), disable_log_stats=False,
              logprobs_mode="processed_logits", max_logprobs=4, **engine_memory_kwargs(0.5),
              additional_config=gdn_prefill_config())
    startup_s = time.monotonic() - t0
    runner = _runner(llm)
    before = _counters(llm)
    params = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0, ignore_eos=True,
                            logprobs=4 if cfg.get("logprobs") else None)
    t1 = time.monotonic()
    outs = llm.generate([{"prompt_token_ids": p} for p in cfg["prompts"]], params, use_tqdm=False)
    gen_s = time.monotonic() - t1
    after = _counters(llm)
    result = []
    for o in outs:
        c = o.outputs[0]
        top = None
        if c.logprobs:
            top = [[(int(t), float(lp.logprob)) for t, lp in d.items()] for d in c.logprobs]
        result.append({"tokens": list(c.token_ids), "top2": top})
    generated = sum(len(r["tokens"]) for r in result)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    drafts = delta.get("vllm:spec_decode_num_drafts", 0.0)
    accepted = delta.get("vllm:spec_decode_num_accepted_tokens", 0.0)
    sc = llm.llm_engine.vllm_config.speculative_config
    return {"outputs": result, "startup_s": round(startup_s, 1), "generate_s": round(gen_s, 2),
            "tok_s_c8": round(generated / gen_s, 1) if gen_s > 0 else None,
            "acceptance_length": round(1 + accepted / drafts, 3) if drafts else None,
            "runner_class": f"{type(runner).__module__}.{type(runner).__qualname__}",
            "speculator_class": type(getattr(runner, "speculator", None)).__qualname__,
            "spec_config": repr(sc) if sc is not None else None,
            "ddtree_fallback_reason": getattr(sc, "ddtree_fallback", None),
            "fallback_metric": _fallback_counts(), "ddtree_counters": _tree_stats(llm),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


# ----------------------------------------------------------------------------- checks


def mode_checks(mode: str, cfg: dict, res: dict, log_text: str) -> dict[str, bool]:
    """Named pass/fail checks of one mode's record (equality is added by the driver)."""
    checks = {"v2_runner": res.get("runner_class", "").startswith("vllm.v1.worker.gpu.")}
    tree = res.get("ddtree_counters") or {}
    if cfg.get("tree"):
        steps, verified = tree.get("steps", 0), tree.get("nodes_verified", 0)
        checks["tree_path"] = (res.get("ddtree_fallback_reason") is None
                               and res.get("speculator_class") == "DDTreeSpeculator"
                               and steps > 0 and verified > steps)  # > 1 node per verify block
        if cfg.get("oracle"):
            checks["siblings_taken"] = tree.get("sibling_taken", 0) > 0
    if cfg.get("fallback"):
        checks["fallback_path"] = (not tree and bool(res.get("ddtree_fallback_reason"))
                                   and "V2 model runner" in res["ddtree_fallback_reason"])
        checks["fallback_logged"] = FALLBACK_LOG in log_text
        checks["fallback_metric"] = sum(res.get("fallback_metric", {}).values()) > 0
    return checks


def logprob_agreement(ref: list[dict], got: list[dict], tol: float = 0.1, ulps: float = 4.0) -> dict:
    """The logprob (engine mode: processed logits) of every committed token of DDTree vs the target
    alone (same token, same position), up to the first token divergence. Allowed difference: bf16
    noise, max(tol, ulps bf16 ulps of the value). A row not laid out along the accepted path gives
    another node's logits: the token is then usually missing from the top-4 or far off."""
    from tests.support.equality import bf16_ulp

    compared = worst = 0.0
    bad = 0
    for r, o in zip(ref, got):
        for i, (a, b) in enumerate(zip(r["tokens"], o["tokens"])):
            if a != b or not r["top2"] or not o["top2"] or i >= len(r["top2"]) or i >= len(o["top2"]):
                break
            ra, ob = dict(map(tuple, r["top2"][i])), dict(map(tuple, o["top2"][i]))
            if a not in ra or a not in ob:
                bad += 1
                continue
            d = abs(ra[a] - ob[a])
            worst = max(worst, d)
            bad += d > max(tol, ulps * bf16_ulp(abs(ra[a])))
            compared += 1
    return {"compared": int(compared), "max_abs_diff": round(worst, 4), "over_tol": int(bad)}


# ----------------------------------------------------------------------------- driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", type=Path, default=REPO / "models" / "tiny-pair")
    ap.add_argument("--modes", default=ALL_MODES)
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="skip modes once this much wall time is spent (each needs ~15-40 s)")
    ap.add_argument("--quick", action="store_true", help="fewer prompts/tokens")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return serve_child(args.child, run_one)


    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    n_eq, eq_tokens = (4, 16) if args.quick else (12, 48)
    prompts = prompts_for(args.models, n_eq, 48, 96 if args.quick else 400)
    configs = mode_configs(args.models)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in configs]
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {list(configs)}")
    if "target" not in modes:
        modes.insert(0, "target")
    modes = ["target"] + [m for m in modes if m != "target"]
    import torch

    report: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "runner": "V2 (VLLM_USE_V2_MODEL_RUNNER=1)", "models": str(args.models),
                    "equality_prompts": len(prompts), "equality_tokens": eq_tokens, "modes": {}}
    out_json = args.out / "ddtree_v2_gpu.json"
    ref = None
    slowest = 0.0
    for mode in modes:
        spent = time.monotonic() - t_start
        if mode != "target" and spent + max(slowest, 15.0) > args.budget_s:
            report["modes"][mode] = {"skipped": f"budget guard ({spent:.0f} s of {args.budget_s:.0f} s spent)"}
            print(f"[{mode}] skipped (budget guard)", flush=True)
            continue
        base = configs[mode]
        cfg = {"spec": base["spec"], "graphs": base.get("graphs", False),
               "logprobs": base.get("logprobs", False), "model": str(args.models / "target"),
               "prompts": prompts, "max_tokens": eq_tokens}
        # V2 tree verify is opt-in (config/ddtree.py) until this check passes
        env = child_env(VLLM_USE_V2_MODEL_RUNNER="1", DDTREE_V2_TREE="1")
        env.update(base.get("env", {}))  # the fallback mode turns the tree path off again
        if base.get("oracle"):
            env.update(oracle_env(args.out, prompts, ref["outputs"]))
        t0 = time.monotonic()
        log = args.out / f"v2-{mode}.log"
        timeout = max(30.0, args.budget_s + 60.0 - (time.monotonic() - t_start))
        res, status = run_mode_process(__file__, args.out, mode, cfg, env, log, timeout)
        wall = time.monotonic() - t0
        slowest = max(slowest, wall)
        rec: dict = {"wall_s": round(wall, 1)}
        if res is None:
            rec["error"] = report_failure(mode, status, log, lines=30)
            report["modes"][mode] = rec
            out_json.write_text(json.dumps(report, indent=2))
            if mode == "target":
                break
            continue
        rec.update({k: v for k, v in res.items() if k != "outputs"})
        checks = mode_checks(mode, base, res, log.read_text(errors="replace"))
        if mode == "target":
            ref = res
        else:
            rec.update(greedy_equality(ref["outputs"], res["outputs"]))
            checks["greedy_equal"] = not rec["failures"]
            if base.get("logprobs"):
                rec["logprobs_vs_target"] = logprob_agreement(ref["outputs"], res["outputs"])
                checks["logprobs_match"] = (rec["logprobs_vs_target"]["compared"] > 0
                                            and rec["logprobs_vs_target"]["over_tol"] == 0)
        rec["checks"] = checks
        report["modes"][mode] = rec
        report["device"] = res.get("device")
        out_json.write_text(json.dumps(report, indent=2))
        print(f"[{mode}] {json.dumps(rec)[:700]}", flush=True)
    report["total_wall_s"] = round(time.monotonic() - t_start, 1)
    print(f"\nDDTree V2-runner check on {report.get('device')} ({len(prompts)} prompts x {eq_tokens} "
          f"greedy tokens; {report['total_wall_s']} s)")
    print(f"{'mode':<17}{'equal':>6}{'ties':>5}{'fail':>5}{'AL':>7}{'steps':>7}{'nodes':>7}"
          f"{'sibl':>6}{'tok/s':>8}  checks")
    ok = True
    for mode, rec in report["modes"].items():
        if "skipped" in rec:
            print(f"{mode:<17}  skipped: {rec['skipped']}")
            continue
        tree = rec.get("ddtree_counters") or {}
        fails = len(rec.get("failures", [])) if "error" not in rec else "ERR"
        checks = rec.get("checks", {})
        mode_ok = "error" not in rec and all(checks.values())
        ok &= mode_ok
        bad = [k for k, v in checks.items() if not v]
        print(f"{mode:<17}{rec.get('equal', '-')!s:>6}{rec.get('tie_divergences', '-')!s:>5}"
              f"{fails!s:>5}{rec.get('acceptance_length') or '-'!s:>7}{tree.get('steps', '-')!s:>7}"
              f"{tree.get('nodes_verified', '-')!s:>7}{tree.get('sibling_taken', '-')!s:>6}"
              f"{rec.get('tok_s_c8') or '-'!s:>8}  {'ok' if mode_ok else 'FAIL ' + (','.join(bad) or rec.get('error', ''))}")
    report["ok"] = ok
    out_json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
