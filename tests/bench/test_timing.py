"""benchmarks/timing.py: the shared median timer (CPU branch here; CUDA events on a GPU)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from timing import median_ms  # noqa: E402


def test_median_of_the_timed_calls_after_the_warmup():
    calls = []
    delays = iter([0.0, 0.0] + [0.001, 0.030, 0.002])  # two warm-up calls, then three timed ones

    def fn():
        calls.append(1)
        time.sleep(next(delays))

    ms = median_ms(fn, reps=3, warmup=2, device="cpu")
    assert len(calls) == 5
    assert 1.5 <= ms < 25  # the median (~2 ms), not the mean (~11 ms) nor the 30 ms outlier


def test_reps_must_be_positive():
    with pytest.raises(ValueError, match="reps"):
        median_ms(lambda: None, reps=0, device="cpu")
