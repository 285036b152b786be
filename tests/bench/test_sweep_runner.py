"""The benchmark runner's sweep logic without servers: DDTree shapes sharing one server through
per-request vllm_xargs, the best shape picked from the main grid, the --budget-s guard, and the
client arguments (parsed by vLLM's own `vllm bench serve` parser)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import profiles  # noqa: E402
import run_profile  # noqa: E402


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """run_profile.run with servers, the client, prompts and model sizes replaced by fakes on a
    fake clock: a server start costs ``start_s``, a point ``point_s`` x (1 + concurrency / 32)."""
    clock = FakeClock()
    started: list[dict] = []
    calls: list[dict] = []
    # die_after: the first server's engine dies after that many points (None: never)
    cost = {"start_s": 100.0, "point_s": 5.0, "die_after": None}
    dead: set[int] = set()

    class FakeServer:
        base_url = "http://127.0.0.1:1"

        def __init__(self, model, args, log_path):
            self.args = args
            self.spec = (json.loads(args[args.index("--speculative-config") + 1])
                         if "--speculative-config" in args else None)

        def command(self):
            return ["python", "-m", "vllm", "serve", *self.args]

        def start(self, timeout):
            clock.t += cost["start_s"]
            started.append(self.spec)

        def stop(self):
            pass

        def log_text(self):
            return cost.get("log_text", "")

        def alive(self):
            return id(self) not in dead

        def metrics(self):
            if id(self) in dead:
                raise ConnectionRefusedError(111, "Connection refused")
            return {}

    def fake_bench(base_url, model, tokenizer, dataset, requests, concurrency, output_len, warmups,
                   log, xargs=None):
        clock.t += cost["point_s"] * (1 + concurrency / 32)
        calls.append({"xargs": xargs, "concurrency": concurrency, "spec": started[-1]})
        if cost["die_after"] is not None and len(calls) > cost["die_after"] and len(started) == 1:
            dead.add(servers[-1])  # the engine dies during this point: every request fails
            return {"output_throughput": 0.0, "completed": 0, "failed": requests}
        b = (xargs or {}).get("ddtree_budget", 0)
        k = (xargs or {}).get("ddtree_top_k", 0)
        # a made-up optimum at budget 16, top_k 4
        tput = 100.0 * concurrency / (1 + abs(b - 16) / 16 + abs(k - 4) / 4)
        short = cost.get("short_tokens", {}).get(concurrency, 0)
        return {"output_throughput": tput, "completed": requests, "failed": 0,
                "total_output_tokens": requests * output_len - short}

    servers: list[int] = []

    class TrackedServer(FakeServer):
        def __init__(self, *a):
            super().__init__(*a)
            servers.append(id(self))

    monkeypatch.setattr(run_profile, "clock", clock)
    monkeypatch.setattr(run_profile, "time", type("T", (), {"sleep": staticmethod(lambda s: None),
                                                            "strftime": run_profile.time.strftime,
                                                            "gmtime": run_profile.time.gmtime}))
    monkeypatch.setattr(run_profile, "VllmServer", TrackedServer)
    monkeypatch.setattr(run_profile, "run_bench", fake_bench)
    monkeypatch.setattr(run_profile, "spec_delta", lambda before, after: {
        "acceptance_length": 2.0, "drafts": 0, "accepted_per_position": []})
    monkeypatch.setattr(run_profile, "model_bytes", lambda t, d: {
        "target_weight_bytes": 1e6, "drafter_weight_bytes": 1e5})
    monkeypatch.setattr(run_profile.prompt_sets, "build", lambda d, max_chars, categories: {
        c: {"path": str(d / f"{c}.jsonl")} for c in categories})
    models = tmp_path / "models"
    for sub in ("target", "drafter"):
        (models / sub).mkdir(parents=True)
        (models / sub / "config.json").write_text("{}")

    def go(profile_name, budget_s=None, points=None):
        profile = profiles.PROFILES[profile_name]
        return run_profile.run(profile, models, "fake", tmp_path / "out", {"device": "fake", "kind": "gpu"},
                               tmp_path / "prompts", points or profile.points(), None, 10.0, [],
                               budget_s)

    return go, started, calls, cost, clock


def test_shared_ddtree_server_best_shape_and_records(fake_run):
    go, started, calls, _, _ = fake_run
    profile = profiles.PROFILES["gpu-sweep-12min"]
    doc = go("gpu-sweep-12min")
    # three servers, DDTree first at the sweep's maxima
    assert [s and {k: v for k, v in s.items() if k != "model"} for s in started] == [
        {"method": "dflash_ddtree", "ddtree_budget": 64, "ddtree_top_k": 8},
        {"method": "dflash", "num_speculative_tokens": 15}, None]
    assert list(doc["servers"]) == ["ddtree-server-b64-k8", "dflash", "nospec"]
    assert len(doc["points"]) == len(profile.points()) and not doc["skipped"]
    grid = [p for p in doc["points"] if p["stage"] == 0]
    assert len(grid) == 16 * 2
    for p in grid:  # every sweep point on the shared server, its shape sent per request
        b, k = (int(x) for x in p["mode"][len("ddtree-b"):].split("-k"))
        assert p["server"] == "ddtree-server-b64-k8"
        assert p["xargs"] == {"ddtree_budget": b, "ddtree_top_k": k}
    assert sum(1 for c in calls if c["spec"] and c["spec"]["method"] == "dflash_ddtree") == 32 + 21
    best = doc["best_ddtree"]["ddtree-server-b64-k8"]
    assert best["xargs"] == {"ddtree_budget": 16, "ddtree_top_k": 4} and best["candidates"] == 16
    curve = [p for p in doc["points"] if p["mode"].startswith("ddtree-best")]
    assert len(curve) == 21 and {p["mode"] for p in curve} == {"ddtree-best-b16-k4"}
    assert all(p["xargs"] == best["xargs"] and p["server"] == "ddtree-server-b64-k8" for p in curve)
    assert {(p["category"], p["concurrency"]) for p in curve} == {
        (c, n) for c in profiles.ALL_CATEGORIES for n in profiles.DOUBLING}
    assert all(p["xargs"] is None for p in doc["points"] if p["server"] in ("dflash", "nospec"))
    summary = (Path(doc["prompts"]["code"]["path"]).parent.parent / "out" / "summary.md").read_text()
    assert "budget=16,top_k=4" in summary and "ddtree-server-b64-k8" in summary


def test_a_dead_server_costs_only_its_own_points(fake_run):
    """The H100 sweep of 2026-11-23: the DDTree server's engine died mid-stage and the runner
    crashed on /metrics, losing the next servers and the summary. Now the point is recorded as
    failed, the server's remaining points as skipped, and the other servers still run."""
    go, started, calls, cost, _ = fake_run
    profile = profiles.PROFILES["gpu-sweep-12min"]
    cost["die_after"] = 35
    doc = go("gpu-sweep-12min")
    dd = doc["servers"]["ddtree-server-b64-k8"]
    assert dd["died"].startswith("during ddtree-best-") and "Connection refused" in dd["died"]
    measured = [p for p in doc["points"] if p["server"] == "ddtree-server-b64-k8" and "error" not in p]
    failed = [p for p in doc["points"] if "error" in p]
    assert len(measured) == 35 and len(failed) == 1 and failed[0]["completed"] == 0
    skipped = [s for s in doc["skipped"] if s["server"] == "ddtree-server-b64-k8"]
    assert len(skipped) == 32 + 21 - 36 and all(s["reason"].startswith("server died") for s in skipped)
    # flat DFlash and no speculation still ran in full
    for name in ("dflash", "nospec"):
        assert sum(1 for p in doc["points"] if p["server"] == name and "error" not in p) == 21
    summary = (Path(doc["prompts"]["code"]["path"]).parent.parent / "out" / "summary.md").read_text()
    assert "**server died**" in summary and "failed: during ddtree-best-" in summary
    assert len(doc["points"]) + len(doc["skipped"]) == len(profile.points())


def test_log_excerpt_keeps_the_first_error():
    sys.path.insert(0, str(REPO / "scripts"))
    from servertools import log_excerpt

    short = "a\nb\n"
    assert log_excerpt(short) == short
    lines = [f"INFO line {i}" for i in range(1000)]
    lines[300] = "(EngineCore pid=1) ERROR 11-23 engine core failed"
    lines[301] = "Traceback (most recent call last):"
    lines[302] = "ValueError: the cause"
    lines += [f"(APIServer) ERROR echo {i}" for i in range(600)]
    out = log_excerpt("\n".join(lines), tail=400, after_first_error=50).splitlines()
    assert "ValueError: the cause" in out and out[-1] == "(APIServer) ERROR echo 599"
    assert "INFO line 280" in out and "INFO line 279" not in out  # 20 lines of context before it
    assert "INFO line 349" in out and "INFO line 350" not in out  # 50 lines from it
    assert len(out) == 400 + 70 + 2
    no_error = log_excerpt("\n".join(f"x{i}" for i in range(500)), tail=10).splitlines()
    assert no_error[0].startswith("[log_excerpt: the last 10") and len(no_error) == 11


ENGINE_DEATH_LOG = """\
(EngineCore_DP0 pid=7) INFO 11-23 22:47:50 [ddtree.py:1215] DDTree stats: steps=9
(EngineCore_DP0 pid=7) ERROR 11-23 22:48:03 [core.py:1100] EngineCore encountered a fatal error.
(EngineCore_DP0 pid=7) ERROR 11-23 22:48:03 [core.py:1100] Traceback (most recent call last):
(EngineCore_DP0 pid=7) ERROR 11-23 22:48:03 [core.py:1100]   File "ddtree.py", line 1, in sample
(EngineCore_DP0 pid=7) ERROR 11-23 22:48:03 [core.py:1100] RuntimeError: the root cause
""" + "(APIServer pid=6) ERROR 11-23 22:48:04 [serving.py:495]   raise output\n" * 500


def test_engine_failure_and_cut_short_points_are_recorded(fake_run, tmp_path):
    """A sweep where the engine died mid-point (GPU sweep of 23 Nov: the c=64 point lacked 1193
    tokens but counted every request as completed; the 400-line log tail held only the API
    server's EngineDeadError tracebacks): the point records its missing tokens and the server's
    entry keeps the engine core's own traceback."""
    go, _, _, cost, _ = fake_run
    cost["log_text"] = ENGINE_DEATH_LOG
    cost["short_tokens"] = {64: 1193}
    doc = go("gpu-sweep-12min")
    short = [p for p in doc["points"] if p.get("missing_output_tokens")]
    assert short and all(p["concurrency"] == 64 and p["missing_output_tokens"] == 1193 for p in short)
    entry = doc["servers"]["ddtree-server-b64-k8"]
    assert entry["engine_error"][0].endswith("EngineCore encountered a fatal error.")
    assert entry["engine_error"][-1].endswith("RuntimeError: the root cause")
    saved = (tmp_path / "out" / "server-ddtree-server-b64-k8.engine-error.log").read_text()
    assert "RuntimeError: the root cause" in saved and "APIServer" not in saved


def test_budget_guard_skips_and_keeps_room_for_later_servers(fake_run):
    go, started, calls, cost, clock = fake_run
    profile = profiles.PROFILES["gpu-sweep-12min"]
    t0 = clock.t
    budget = 700.0
    doc = go("gpu-sweep-12min", budget_s=budget)
    elapsed = clock.t - t0
    done = [(p["mode"].split("-best")[0] if "best" in p["mode"] else p["mode"], p["category"],
             p["concurrency"]) for p in doc["points"]]
    skipped = doc["skipped"]
    assert skipped and all(s["reason"].startswith("budget") for s in skipped)
    assert len(done) + len(skipped) == len(profile.points())
    # never past the budget by more than one point; every server started (the reserve kept room)
    assert elapsed <= budget + cost["point_s"] * 3
    assert len(started) == 3
    assert any(p["server"] == "nospec" for p in doc["points"])
    # a budget too small for anything: every server skipped before starting
    started.clear()
    doc = go("gpu-sweep-12min", budget_s=50.0)
    assert not started and not doc["points"] and len(doc["skipped"]) == len(profile.points())


def test_server_per_mode_and_filters():
    sweep = profiles.PROFILES["gpu-ddtree-sweep"]
    assert sweep.servers() == ["dflash", "ddtree-server-b64-k8"]
    modes = {m.name: m for m in sweep.all_modes()}
    m = modes["ddtree-b16-k2"]
    assert m.xargs == {"ddtree_budget": 16, "ddtree_top_k": 2}
    assert m.dedicated().spec == {"method": "dflash_ddtree", "ddtree_budget": 16, "ddtree_top_k": 2}
    assert m.dedicated().xargs is None and m.dedicated().server == "ddtree-server-b16-k2"
    with pytest.raises(ValueError, match="maximum"):
        profiles.ddtree(32, 2, server=(16, 8))
    assert run_profile.main(["--profile", "gpu-sweep-12min", "--servers", "dflash,nospec", "--list"]) == 0
    with pytest.raises(SystemExit, match="--servers"):
        run_profile.main(["--profile", "gpu-sweep-12min", "--servers", "ddtree-b8-k1", "--list"])


def test_bench_argv_sends_vllm_xargs_through_the_clients_extra_body(tmp_path):
    pytest.importorskip("vllm.benchmarks.serve")
    argv = run_profile.bench_argv("http://x", "m", "m", tmp_path / "d.jsonl", 4, 2, 8, 1,
                                  {"ddtree_budget": 8, "ddtree_top_k": 2})
    args = run_profile.bench_parser().parse_args(argv)
    assert args.extra_body == {"vllm_xargs": {"ddtree_budget": 8, "ddtree_top_k": 2}}
    plain = run_profile.bench_parser().parse_args(
        run_profile.bench_argv("http://x", "m", "m", tmp_path / "d.jsonl", 4, 2, 8, 1))
    assert plain.extra_body is None


@pytest.mark.slow
def test_cpu_sweep_smoke_end_to_end(tiny_models, tmp_path):
    """gpu-sweep-12min's logic at CPU size through a real server and vLLM's client: the four DDTree
    shapes run on ONE server (budget 8, top_k 2) and each point's verify blocks carry exactly its
    own budget of drafts (the per-request shape reached the engine); then the best shape."""
    pytest.importorskip("pandas", reason="vllm bench serve's custom dataset reads JSONL with pandas")
    out = tmp_path / "out"
    rc = run_profile.main(["--profile", "cpu-sweep-smoke", "--models", str(tiny_models), "--out", str(out),
                           "--prompts-dir", str(tmp_path / "prompts"), "--model-label", "tiny (test)",
                           "--budget-s", "900"])
    doc = json.loads((out / "results.json").read_text())
    assert rc == 0, json.dumps(doc.get("servers"), indent=1)[-3000:]
    assert list(doc["servers"]) == ["ddtree-server-b8-k2"]
    assert all("startup_s" in s for s in doc["servers"].values())
    tree = [p for p in doc["points"] if p["server"] == "ddtree-server-b8-k2"]
    assert [p["mode"] for p in tree[:4]] == ["ddtree-b4-k1", "ddtree-b4-k2", "ddtree-b8-k1", "ddtree-b8-k2"]
    best = doc["best_ddtree"]["ddtree-server-b8-k2"]
    assert [p["mode"] for p in tree[4:]] == [best["mode"].replace("ddtree-", "ddtree-best-")] * 2
    for p in doc["points"]:
        assert p["completed"] == p["requests"] and p["failed"] == 0, p
        sd = p["spec_decode"]
        assert sd["drafts"] > 0
        want = p["xargs"]["ddtree_budget"] if p["xargs"] else profiles.DFLASH_DEPTH
        assert sd["draft_tokens"] == sd["drafts"] * want, (p["mode"], sd)
        assert sd["drafts_per_block"] == want
        if p["xargs"]:
            assert p["bench"]["client_argv"][-2:] == ["--extra-body", json.dumps(
                {"vllm_xargs": p["xargs"]}, sort_keys=True)]
    assert not doc["skipped"]
    assert "ddtree-server-b8-k2" in (out / "summary.md").read_text()


def test_graphs_sweep_is_the_eager_sweep_with_graphs():
    """gpu-sweep-graphs must measure the same points as gpu-sweep-12min (so the two compare), only
    without --enforce-eager."""
    eager, graphs = profiles.PROFILES["gpu-sweep-12min"], profiles.PROFILES["gpu-sweep-graphs"]
    key = lambda p: [(m.name, cat, c, st) for m, cat, c, st in p.points()]  # noqa: E731
    assert key(graphs) == key(eager)
    assert graphs.servers() == eager.servers()
    assert "--enforce-eager" in eager.extra_server_args
    assert "--enforce-eager" not in graphs.extra_server_args
    assert (graphs.output_len, graphs.best_of) == (eager.output_len, eager.best_of)
