"""A test drafter for DDTree: drafts built from the target's own greedy continuation.

The engine process loads it through ``DDTREE_TEST_DRAFT_HOOK=tests.support.oracle_drafter:draft_logits``
and reads the reference continuations from ``DDTREE_ORACLE_FILE`` (JSON: [{"prompt": [...],
"completion": [...]}]). ``DDTREE_ORACLE_MODE`` chooses the draft shape:

* ``top1``: the true next tokens ranked first at every depth (a perfect chain),
* ``top2``: the true token ranked second and a wrong token first at every depth (a chain drafter
  accepts nothing; a tree with top_k >= 2 follows the siblings),
* ``mixed``: top-1 right at even depths, top-2 right at odd depths.

Everything else gets a fixed random order, so the trees also hold branches that are never taken.
"""

from __future__ import annotations

import json
import os

import torch

_REFS: list[tuple[list[int], list[int]]] | None = None


def _refs() -> list[tuple[list[int], list[int]]]:
    global _REFS
    if _REFS is None:
        with open(os.environ["DDTREE_ORACLE_FILE"]) as f:
            _REFS = [(r["prompt"], r["completion"]) for r in json.load(f)]
    return _REFS


def _future(history: list[int]) -> list[int] | None:
    for prompt, completion in _refs():
        n = len(prompt)
        if len(history) > n and history[:n] == prompt:
            done = history[n:]
            if completion[: len(done)] == done:
                return completion[len(done):]
            return None
    return None


def draft_logits(history: list[int], depth: int, vocab: int) -> torch.Tensor | None:
    future = _future(history)
    if future is None:
        return None
    mode = os.environ.get("DDTREE_ORACLE_MODE", "top2")
    g = torch.Generator().manual_seed(len(history))
    logits = torch.randn(depth, vocab, generator=g)
    for d in range(min(depth, len(future))):
        true = future[d]
        wrong = (true + 1 + d) % vocab
        second = mode == "top2" or (mode == "mixed" and d % 2 == 1)
        if second:
            logits[d, wrong] = 20.0
            logits[d, true] = 19.0
        else:
            logits[d, true] = 20.0
            logits[d, wrong] = 19.0
    return logits
