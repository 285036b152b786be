"""Replay a host-bound sequence of small device ops from a CUDA graph, one graph per input shape.

The DDTree commit is ~100 small launches per step at a 27B target: a conv-history commit and a state
copy per Gated DeltaNet layer, a KV row move per full-attention cache. Each costs the host far more
than the GPU, and on an H200 the commit took ~15 ms of host time per step (profile of 24 Nov 2026).
Replayed from a graph, it is one launch.

``ReplayCache.run(key, fn, inputs)`` with ``fn(*inputs)`` doing only device work that reads
``inputs`` and writes tensors living as long as the cache (persistent buffers such as KV caches),
bound into ``fn`` itself: the inputs are copied into the graph's static buffers, so anything ``fn``
writes into an input would land in the copy.
- the first call of a key runs ``fn`` eagerly (it also compiles any Triton kernel in it);
- the second captures ``fn`` on static copies of the inputs and replays the graph (capturing runs
  nothing, so ``fn`` executes exactly once per call even though it updates buffers in place and is
  not idempotent);
- later calls copy the inputs into the static copies and replay.

``fn`` must not read device values on the host, must not depend on anything the key does not fix
(shapes, dtypes, which persistent buffers it touches), and may allocate only its own temporaries
(they come from the graph's pool). CPU inputs always run eagerly. At most ``max_graphs`` keys keep
a graph (least recently used dropped).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import torch


class _Entry:
    __slots__ = ("graph", "static")

    def __init__(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[torch.Tensor] = []


class ReplayCache:
    def __init__(self, max_graphs: int = 16) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs: expected >= 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self._entries: collections.OrderedDict[Any, _Entry] = collections.OrderedDict()
        self._pool = None
        self.eager_runs = 0
        self.captures = 0
        self.replays = 0

    def run(self, key: Any, fn: Callable[..., None], inputs: Sequence[torch.Tensor]) -> None:
        inputs = list(inputs)
        if not inputs or not all(t.is_cuda for t in inputs):
            self.eager_runs += 1
            fn(*inputs)
            return
        key = (key, tuple((tuple(t.shape), t.dtype, t.device) for t in inputs))
        entry = self._entries.get(key)
        if entry is None:  # first sight: eager (compiles kernels, warms the allocator)
            while len(self._entries) >= self.max_graphs:
                self._entries.popitem(last=False)
            self._entries[key] = _Entry()
            self.eager_runs += 1
            fn(*inputs)
            return
        self._entries.move_to_end(key)
        if entry.graph is None:
            static = [t.clone() for t in inputs]
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # capture records the launches without running them; the replay below runs them once
            with torch.cuda.graph(graph, pool=self._pool):
                fn(*static)
            entry.graph, entry.static = graph, static
            self.captures += 1
        else:
            for dst, src in zip(entry.static, inputs):
                dst.copy_(src, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
