"""Median time of a callable, the one way every micro-benchmark here measures it.

On CUDA: CUDA events around each call on the current stream (so the time is the device's, with the
launch included), after ``warmup`` calls and a synchronize; L2 is not flushed. On CPU: wall time of
each call. Returns milliseconds (the median over ``reps``).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 1, device: str = "cuda") -> float:
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
