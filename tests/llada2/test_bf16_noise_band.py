"""scripts/llada2_bf16_noise_band.py: the bf16 engine vs the bf16 reference, each against float32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from llada2_bf16_noise_band import first_diff, noise_band  # noqa: E402


def _row(ref, eng=None, p=4, m=4):
    return {"prompt_len": p, "max_tokens": m, "reference": ref, "concurrency_8": eng or ref,
            "sampling": {"temperature": 0.0}}


def test_first_diff():
    assert first_diff([1, 2, 3], [1, 2, 3]) is None
    assert first_diff([1, 2, 3], [1, 5, 3]) == 1
    assert first_diff([1, 2], [1, 2, 3]) == 2  # a shorter output differs where it stops


def test_noise_band_counts_each_side_against_float32():
    f32 = {"strict_equal": True, "rows": [_row([1, 2, 3, 4]), _row([5, 6, 7, 8])]}
    b16 = {"device": "x", "rows": [_row([1, 2, 9, 9], [1, 2, 3, 4]),   # reference strays at 2
                                   _row([5, 6, 7, 8], [5, 0, 0, 0])]}  # engine strays at 1
    doc = noise_band(f32, b16)
    assert doc["engine_bf16_equal"] == 1 and doc["reference_bf16_equal"] == 1
    assert doc["engine_bf16_matched_prefix"] == pytest.approx((1.0 + 0.25) / 2, abs=1e-3)
    assert doc["reference_bf16_matched_prefix"] == pytest.approx((0.5 + 1.0) / 2, abs=1e-3)


def test_noise_band_refuses_different_requests():
    with pytest.raises(ValueError, match="different request sets"):
        noise_band({"rows": [_row([1], p=3)]}, {"rows": [_row([1], p=4)]})
