"""Benchmark profiles: which modes, concurrencies, prompt categories and lengths one run covers.

A mode is a name, the ``--speculative-config`` of the server it runs on (None = no speculation) and,
for DDTree, the per-request tree shape it sends (the request body's ``vllm_xargs``: ``ddtree_budget``,
``ddtree_top_k``; see docs/ddtree-vllm.md). DDTree modes that differ only in budget / top_k share
one server started at the profile's maxima (the server's values are the per-request maxima), so a
budget x top_k sweep costs one server start instead of one per point. On CUDA the V1 runner verifies
trees (docs/ddtree-vllm.md); where tree verify is unavailable the server runs flat DFlash and rejects
per-request shapes, and the runner records the server's own log line saying why.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DFLASH_DEPTH = 15          # L = block_size - 1 for the block-16 drafters


@dataclass(frozen=True)
class Mode:
    name: str
    spec: dict | None                 # speculative config without the drafter path (added at run time)
    xargs: dict | None = None         # per-request settings, sent as the request body's vllm_xargs
    pick_best: bool = False           # DDTree shape chosen at run time (see Profile.best_of)

    def speculative_config(self, drafter: str) -> dict | None:
        return None if self.spec is None else {**self.spec, "model": drafter}

    @property
    def server(self) -> str:
        """Name of the server this mode runs on; modes with the same name share one server."""
        if self.spec is None:
            return "nospec"
        if self.spec.get("method") == "dflash_ddtree":
            return f"ddtree-server-b{self.spec['ddtree_budget']}-k{self.spec['ddtree_top_k']}"
        return self.spec.get("method", "spec")

    def dedicated(self) -> "Mode":
        """The same tree shape on a server of its own (server-level budget / top_k, no xargs)."""
        if not self.xargs:
            return self
        return Mode(self.name, {**(self.spec or {}), **self.xargs}, None, self.pick_best)


def nospec() -> Mode:
    return Mode("nospec", None)


def dflash(depth: int = DFLASH_DEPTH) -> Mode:
    return Mode("dflash", {"method": "dflash", "num_speculative_tokens": depth})


def ddtree_server_spec(budget: int, top_k: int) -> dict:
    return {"method": "dflash_ddtree", "ddtree_budget": budget, "ddtree_top_k": top_k}


def ddtree(budget: int, top_k: int, server: tuple[int, int] | None = None) -> Mode:
    """DDTree with tree shape (budget, top_k). ``server`` = (budget, top_k) of the shared server it
    runs on (>= the shape); None: a server of exactly this shape (no per-request settings)."""
    name = f"ddtree-b{budget}-k{top_k}"
    if server is None or tuple(server) == (budget, top_k):
        spec = ddtree_server_spec(*(server or (budget, top_k)))
        return Mode(name, spec, {"ddtree_budget": budget, "ddtree_top_k": top_k} if server else None)
    if budget > server[0] or top_k > server[1]:
        raise ValueError(f"ddtree({budget}, {top_k}): the shared server's shape {server} is the maximum")
    return Mode(name, ddtree_server_spec(*server), {"ddtree_budget": budget, "ddtree_top_k": top_k})


def ddtree_grid(budgets, top_ks) -> tuple[Mode, ...]:
    """Every (budget, top_k) on one shared server started at (max budget, max top_k)."""
    server = (max(budgets), max(top_ks))
    return tuple(ddtree(b, k, server) for b in budgets for k in top_ks)


def ddtree_best(server: tuple[int, int]) -> Mode:
    """The best (budget, top_k) measured earlier in the same run (Profile.best_of), on ``server``."""
    return Mode("ddtree-best", ddtree_server_spec(*server), None, pick_best=True)


@dataclass(frozen=True)
class Stage:
    """More points after the profile's main grid: these modes x categories x concurrencies."""
    modes: tuple[Mode, ...]
    concurrency: tuple[int, ...]
    categories: tuple[str, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    about: str
    modes: tuple[Mode, ...]
    concurrency: tuple[int, ...]
    categories: tuple[str, ...]
    output_len: int = 128
    prompt_chars: int = 800
    requests_per_slot: int = 3        # requests per point = max(min_requests, concurrency * this)
    min_requests: int = 12
    max_requests: int = 256
    warmups: int = 2
    server: str = "gpu"               # flag set: "gpu" or "cpu" (see run_profile.SERVER_FLAGS)
    max_num_seqs: int = 64
    extra_server_args: tuple[str, ...] = field(default_factory=tuple)
    stages: tuple[Stage, ...] = ()    # more points after the main grid (same servers where possible)
    # ddtree-best: the DDTree mode of the main grid with the highest geometric mean of output tok/s
    # over these (category, concurrency) points
    best_of: tuple[tuple[str, int], ...] = ()
    budget_s: float | None = None     # default --budget-s: skip what no longer fits (recorded)
    server_start_s: float = 120.0     # the guard's estimate of one server start
    server_reserve_s: float = 0.0     # kept free for each server still to come (> its start: + points)

    def requests(self, concurrency: int) -> int:
        return min(self.max_requests, max(self.min_requests, concurrency * self.requests_per_slot))

    def points(self) -> list[tuple[Mode, str, int, int]]:
        """Every (mode, category, concurrency, stage) in run order within a server: the main grid
        (stage 0: mode, then category, then concurrency), then each stage the same way."""
        out = [(m, cat, c, 0) for m in self.modes for cat in self.categories for c in self.concurrency]
        for i, st in enumerate(self.stages, 1):
            out += [(m, cat, c, i) for m in st.modes for cat in st.categories for c in st.concurrency]
        return out

    def all_modes(self) -> list[Mode]:
        seen: dict[str, Mode] = {}
        for m, _, _, _ in self.points():
            seen.setdefault(m.name, m)
        return list(seen.values())

    def servers(self) -> list[str]:
        return list(dict.fromkeys(m.server for m, _, _, _ in self.points()))


DOUBLING = (1, 2, 4, 8, 16, 32, 64)
BUDGETS = (8, 16, 32, 64)
TOP_KS = (1, 2, 4, 8)
ALL_CATEGORIES = ("code", "prose", "docmath")
SWEEP_SERVER = (max(BUDGETS), max(TOP_KS))
#: vLLM 0.26 picks FlashInfer's GDN prefill on SM90, which the offline bundle lacks (needs
#: nvidia-cutlass-dsl): the GPU servers pass gdn_prefill_backend=triton (run_profile.SERVER_FLAGS).
EAGER = ("--enforce-eager",)

PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("cpu-smoke", "CPU: flat DFlash on the tiny models, a handful of short requests (the test)",
            modes=(dflash(),), concurrency=(1, 2), categories=("code",), output_len=8,
            prompt_chars=300, requests_per_slot=1, min_requests=2, warmups=0, server="cpu",
            max_num_seqs=4),
    Profile("cpu-quick", "CPU: no speculation vs flat DFlash, two concurrencies",
            modes=(nospec(), dflash()), concurrency=(1, 4), categories=("code", "prose"),
            output_len=32, prompt_chars=400, requests_per_slot=2, min_requests=4, warmups=1,
            server="cpu", max_num_seqs=8),
    Profile("cpu-sweep-smoke", "CPU: the gpu-sweep-12min logic at CPU size, one server start: DDTree "
            "budget 4/8 x top_k 1/2 on one shared server (per-request vllm_xargs), then the best of "
            "them at concurrency 1/2 (the slow test; several servers: the runner's unit tests)",
            modes=ddtree_grid((4, 8), (1, 2)), concurrency=(1,), categories=("code",),
            stages=(Stage((ddtree_best((8, 2)),), (1, 2), ("code",)),),
            best_of=(("code", 1),), output_len=8, prompt_chars=300, requests_per_slot=1,
            min_requests=2, warmups=0, server="cpu", max_num_seqs=4, server_start_s=60.0),
    Profile("cpu-ddtree", "CPU: the tree verify path (CPU backend) at budget 8/16/32, top_k 4 (one "
            "shared server, per-request shapes), beside flat DFlash; concurrency 1, code",
            modes=(dflash(), *ddtree_grid((8, 16, 32), (4,))), concurrency=(1,),
            categories=("code",), output_len=32, prompt_chars=400, requests_per_slot=4,
            min_requests=4, warmups=1, server="cpu", max_num_seqs=4),
    Profile("gpu-check", "GPU: a short check of the pipeline (no speculation + flat DFlash, c=1/4)",
            modes=(nospec(), dflash()), concurrency=(1, 4), categories=("code",), output_len=64,
            requests_per_slot=2, min_requests=4, warmups=1),
    Profile("gpu-quick", "GPU: no speculation vs flat DFlash, concurrency 1/4/16/64, code + prose",
            modes=(nospec(), dflash()), concurrency=(1, 4, 16, 64), categories=("code", "prose")),
    Profile("gpu-nospec", "GPU: no speculation only (the gpu-quick grid)",
            modes=(nospec(),), concurrency=(1, 4, 16, 64), categories=("code", "prose")),
    Profile("gpu-dflash", "GPU: flat DFlash only (the gpu-quick grid)",
            modes=(dflash(),), concurrency=(1, 4, 16, 64), categories=("code", "prose")),
    Profile("gpu-ddtree-sweep", "GPU: DDTree budget 8..64 x top_k 1..8 on one server (b64, k8; "
            "per-request shapes) beside flat DFlash, concurrency 1 and 16, code",
            modes=(dflash(), *ddtree_grid(BUDGETS, TOP_KS)),
            concurrency=(1, 16), categories=("code",)),
    Profile("gpu-sweep-12min", "GPU, eager, ~12 min with 3 server starts: DDTree budget 8..64 x "
            "top_k 1..8 on one server (b64, k8; per-request shapes) at concurrency 1 and 8 on code; "
            "then concurrency 1..64 on code/prose/docmath for the best of those shapes, flat DFlash "
            "and no speculation. Runs as two device calls (--servers, each < 10 min)",
            modes=ddtree_grid(BUDGETS, TOP_KS), concurrency=(1, 8), categories=("code",),
            stages=(Stage((ddtree_best(SWEEP_SERVER), dflash(), nospec()), DOUBLING, ALL_CATEGORIES),),
            best_of=(("code", 1), ("code", 8)), output_len=96, requests_per_slot=2,
            min_requests=6, max_requests=128, warmups=1, extra_server_args=EAGER,
            # per device call (--servers splits it in two): a start ~1-2.5 min (eager; more on a
            # fresh host while Triton compiles the GDN kernels), points ~2-8 s each
            budget_s=360.0, server_start_s=90.0, server_reserve_s=150.0),
    Profile("gpu-ddtree-curve", "GPU, eager: one DDTree shape (budget 32, top_k 8: the best of the "
            "H100 grid of 2026-11-23) at concurrency 1..64 on code/prose/docmath, per request on a "
            "b64-k8 server like gpu-sweep-12min's, so its points compare with that sweep's flat DFlash "
            "and no-spec curves without re-running the grid (one device call)",
            modes=(ddtree(32, 8, SWEEP_SERVER),), concurrency=DOUBLING, categories=ALL_CATEGORIES,
            output_len=96, requests_per_slot=2, min_requests=6, max_requests=128, warmups=1,
            extra_server_args=EAGER, budget_s=420.0, server_start_s=90.0),
    Profile("gpu-full", "GPU: every mode, concurrency 1..64 doubling, all three categories",
            modes=(nospec(), dflash(), *ddtree_grid(BUDGETS, (1, 8))),
            concurrency=DOUBLING, categories=ALL_CATEGORIES),
]}

#: the same sweep with CUDA graphs (the product setting: vLLM's default graph mode, PIECEWISE for
#: DDTree): gpu-sweep-12min's points without --enforce-eager, so the two compare point for point.
#: Graph capture makes each server start longer; the DDTree server alone is one device call.
PROFILES["gpu-sweep-graphs"] = replace(
    PROFILES["gpu-sweep-12min"], name="gpu-sweep-graphs",
    about="GPU, CUDA graphs: the gpu-sweep-12min grid and curves without --enforce-eager "
                "(vLLM's default graph mode; PIECEWISE for DDTree)",
    extra_server_args=(), budget_s=480.0, server_start_s=180.0)
