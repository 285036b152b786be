#!/usr/bin/env python3
"""The main job on an embedded default: the patched vLLM server on CPU with the tiny models.

Starts `vllm serve` on 127.0.0.1 with the tiny hybrid target and DDTree speculative decoding
(method="dflash_ddtree"), asks for a completion through the `openai` client, prints it with the
spec-decode statistics from /metrics, and stops the server.

    make demo                       # or: .venv/bin/python scripts/demo.py [--mode ddtree|dflash|baseline]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servertools import CPU_TINY_FLAGS, REPO, VllmServer, spec_decode_stats, speculative_args  # noqa: E402
import tiny_models  # noqa: E402

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
# The committed pair is tiny and trained for minutes on the standard library: expect Python-looking,
# repetitive text, not a working function.


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["ddtree", "dflash", "baseline"], default="ddtree")
    ap.add_argument("--models", type=Path, default=REPO / "models" / "tiny-pair",
                    help="a folder with target/ and drafter/ (default: the committed trained pair)")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    models = args.models
    if not (models / "target" / "config.json").exists():  # e.g. build/tiny-models: make them
        models = tiny_models.make_all(models)
    spec = {
        "ddtree": {"method": "dflash_ddtree", "model": str(models / "drafter"), "ddtree_budget": 16,
                   "ddtree_top_k": 4},
        "dflash": {"method": "dflash", "model": str(models / "drafter"), "num_speculative_tokens": 15},
        "baseline": None,
    }[args.mode]
    log = REPO / "build" / f"demo-{args.mode}.log"
    server = VllmServer(models / "target", CPU_TINY_FLAGS + speculative_args(spec), log)
    print("$ vllm " + " ".join(server.command()[3:]), flush=True)
    t0 = time.monotonic()
    with server:
        print(f"server ready in {time.monotonic() - t0:.0f}s (log: {log})", flush=True)
        from openai import OpenAI

        client = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        t1 = time.monotonic()
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=args.max_tokens,
                                      temperature=0.0, extra_body={"ignore_eos": True})
        dt = time.monotonic() - t1
        stats = spec_decode_stats(server.metrics())
        for line in server.log_text().splitlines():
            if "tree verify" in line or "[ddtree" in line:
                print("server:", line.split("] ", 1)[-1])
                break
    print("--- prompt ---\n" + PROMPT + "--- completion (tiny model trained on the stdlib) ---")
    text = r.choices[0].text
    # the tiny pair likes blank lines and repeats: show the text as a literal so it stays readable
    print(text if len(text.strip()) > len(text) // 2 else repr(text))
    print("--- stats ---")
    print(f"mode={args.mode} tokens={r.usage.completion_tokens} time={dt:.2f}s")
    if spec is not None:
        per_pos = ", ".join(f"{v:.0f}" for v in stats["accepted_per_position"])
        print(f"spec decode: drafts={stats['drafts']:.0f} draft_tokens={stats['draft_tokens']:.0f} "
              f"accepted={stats['accepted_tokens']:.0f} "
              f"acceptance_length={stats['acceptance_length']:.2f} per_position=[{per_pos}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
