"""Benchmark profiles: which modes, concurrencies, prompt categories and lengths one run covers.

A mode is a name and the ``--speculative-config`` it serves with (None = no speculation). On this
build ``dflash_ddtree`` runs its chain form (the tree verifier is not wired yet): ``min(L, budget)``
drafter tokens per step, i.e. flat DFlash whatever ``ddtree_top_k`` says; the runner records the
server's own log line saying so next to every DDTree number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DFLASH_DEPTH = 15          # L = block_size - 1 for the block-16 drafters


@dataclass(frozen=True)
class Mode:
    name: str
    spec: dict | None                 # speculative config without the drafter path (added at run time)

    def speculative_config(self, drafter: str) -> dict | None:
        return None if self.spec is None else {**self.spec, "model": drafter}


def nospec() -> Mode:
    return Mode("nospec", None)


def dflash(depth: int = DFLASH_DEPTH) -> Mode:
    return Mode("dflash", {"method": "dflash", "num_speculative_tokens": depth})


def ddtree(budget: int, top_k: int) -> Mode:
    return Mode(f"ddtree-b{budget}-k{top_k}",
                {"method": "dflash_ddtree", "ddtree_budget": budget, "ddtree_top_k": top_k})


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

    def requests(self, concurrency: int) -> int:
        return min(self.max_requests, max(self.min_requests, concurrency * self.requests_per_slot))


DOUBLING = (1, 2, 4, 8, 16, 32, 64)
BUDGETS = (8, 16, 32, 64)
TOP_KS = (1, 2, 4, 8)

PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("cpu-smoke", "CPU: flat DFlash on the tiny models, a handful of short requests (the test)",
            modes=(dflash(),), concurrency=(1, 2), categories=("code",), output_len=8,
            prompt_chars=300, requests_per_slot=1, min_requests=2, warmups=0, server="cpu",
            max_num_seqs=4),
    Profile("cpu-quick", "CPU: no speculation vs flat DFlash, two concurrencies",
            modes=(nospec(), dflash()), concurrency=(1, 4), categories=("code", "prose"),
            output_len=32, prompt_chars=400, requests_per_slot=2, min_requests=4, warmups=1,
            server="cpu", max_num_seqs=8),
    Profile("cpu-ddtree", "CPU: the tree verify path (CPU backend) at budget 8/16/32, top_k 4, beside "
            "flat DFlash; concurrency 1, code",
            modes=(dflash(), ddtree(8, 4), ddtree(16, 4), ddtree(32, 4)), concurrency=(1,),
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
    Profile("gpu-ddtree-sweep", "GPU: DDTree budget 8..64 x top_k 1..8 (chain form on this build) "
            "beside flat DFlash, concurrency 1 and 16, code",
            modes=(dflash(), *[ddtree(b, k) for b in BUDGETS for k in TOP_KS]),
            concurrency=(1, 16), categories=("code",)),
    Profile("gpu-full", "GPU: every mode, concurrency 1..64 doubling, all three categories",
            modes=(nospec(), dflash(), *[ddtree(b, k) for b in BUDGETS for k in (1, 8)]),
            concurrency=DOUBLING, categories=("code", "prose", "docmath")),
]}
