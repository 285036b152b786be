#!/usr/bin/env python3
"""How far the bf16 LLaDA2 engine and the bf16 plain-torch reference each stray from float32 math,
from two parts of ``gpu_llada2_check.py`` run on the same device (same tiny model, same requests):

    python scripts/llada2_bf16_noise_band.py FLOAT32_PART.json BFLOAT16_PART.json [--out X.json]

The float32 part's reference is the "exact" answer (the float32 engine equals it token for token).
Rounding alone keeps the bf16 engine about as close to it as the bf16 reference (a near-tie flips in
one implementation or the other); an engine defect (mask, KV, positions, graphs) pushes the engine
much further. The check itself now computes this inside its bf16 part (``vs_float32``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def first_diff(a: list[int], b: list[int]) -> int | None:
    n = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), None)
    return n if n is not None or len(a) == len(b) else min(len(a), len(b))


def noise_band(f32: dict, b16: dict) -> dict:
    if len(f32["rows"]) != len(b16["rows"]):
        raise ValueError("the two parts ran different request sets")
    rows, eng, ref = [], [], []
    for r32, r16 in zip(f32["rows"], b16["rows"]):
        if (r32["prompt_len"], r32["max_tokens"]) != (r16["prompt_len"], r16["max_tokens"]):
            raise ValueError("the two parts ran different request sets")
        exact = r32["reference"]
        e, r = first_diff(r16["concurrency_8"], exact), first_diff(r16["reference"], exact)
        n = max(len(exact), 1)
        eng.append(1.0 if e is None else e / n)
        ref.append(1.0 if r is None else r / n)
        rows.append({"prompt_len": r32["prompt_len"], "temperature": r16["sampling"]["temperature"],
                     "tokens": len(exact), "engine_bf16_first_diff": e,
                     "reference_bf16_first_diff": r})
    return {"device": b16.get("device"), "requests": len(rows),
            "engine_bf16_equal": sum(x == 1.0 for x in eng),
            "reference_bf16_equal": sum(x == 1.0 for x in ref),
            "engine_bf16_matched_prefix": round(sum(eng) / len(eng), 3),
            "reference_bf16_matched_prefix": round(sum(ref) / len(ref), 3),
            "float32_engine_strict_equal": f32.get("strict_equal"), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("float32_part", type=Path)
    ap.add_argument("bfloat16_part", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    doc = noise_band(json.loads(a.float32_part.read_text()), json.loads(a.bfloat16_part.read_text()))
    print(f"{doc['device']}: vs float32 math over {doc['requests']} requests - bf16 engine "
          f"{doc['engine_bf16_equal']} identical, matched prefix {doc['engine_bf16_matched_prefix']}; "
          f"bf16 reference {doc['reference_bf16_equal']} identical, matched prefix "
          f"{doc['reference_bf16_matched_prefix']}")
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
