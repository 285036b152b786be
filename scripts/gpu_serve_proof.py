#!/usr/bin/env python3
"""Proof that an installed bundle serves: `vllm serve` on 127.0.0.1 answers the `openai` client.

    PYTHONPATH=/opt/vllm-site python3 scripts/gpu_serve_proof.py --models DIR --out OUTDIR \
        [--mode ddtree|dflash|nospec] [--model-label TEXT]

Checks the overlays on the imported vllm (apply_overlays --check --require-applied), starts the
server with the tiny target (+ DFlash drafter; DDTree by default, which runs its chain form on this
build), lists the models and asks for two completions and one chat-less streaming completion through
the `openai` client, reads /metrics, and writes ``proof.json`` (the transcript: device, versions,
server command, start-up time, requests and answers, spec-decode counters) into OUTDIR.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from servertools import (CPU_TINY_FLAGS, VllmServer, ddtree_lines, spec_decode_stats,  # noqa: E402
                         speculative_args)

PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "The Python language reference describes"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--model-label", default="random tiny models (scripts/tiny_models.py)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=["ddtree", "dflash", "nospec"], default="ddtree")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--start-timeout", type=float, default=420.0)
    ap.add_argument("--cpu", action="store_true", help="CPU flags (a dry run of this script)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    import vllm
    import openai

    site = Path(vllm.__file__).resolve().parent.parent
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "apply_overlays.py"), "--tree",
                            str(site), "--check", "--require-applied"], capture_output=True, text=True)
    doc = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "vllm": vllm.__version__,
           "vllm_path": str(site), "openai": openai.__version__, "models": args.model_label,
           "overlay_check": {"rc": check.returncode, "output": check.stdout.splitlines()}}
    drafter = str(args.models / "drafter")
    spec = {"ddtree": {"method": "dflash_ddtree", "model": drafter, "ddtree_budget": 16,
                       "ddtree_top_k": 4},
            "dflash": {"method": "dflash", "model": drafter, "num_speculative_tokens": 15},
            "nospec": None}[args.mode]
    flags = ["--language-model-only", "--max-model-len", "2048", "--max-num-seqs", "16",
             "--no-enable-prefix-caching", "--seed", "0", "--gpu-memory-utilization", "0.4",
             "--additional-config", json.dumps({"gdn_prefill_backend": "triton"})]
    if args.cpu:
        flags = list(CPU_TINY_FLAGS)
    server = VllmServer(args.models / "target", flags + speculative_args(spec),
                        args.out / "proof-server.log")
    doc["server_command"] = "vllm " + " ".join(server.command()[3:])
    t0 = time.monotonic()
    rc = 1
    try:
        server.start(timeout=args.start_timeout)
        doc["startup_s"] = round(time.monotonic() - t0, 1)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")
        models = [m.id for m in client.models.list().data]
        doc["models_listed"] = models
        doc["exchanges"] = []
        for prompt in PROMPTS:
            t1 = time.monotonic()
            r = client.completions.create(model=models[0], prompt=prompt, max_tokens=args.max_tokens,
                                          temperature=0.0, extra_body={"ignore_eos": True})
            doc["exchanges"].append({"prompt": prompt, "completion": r.choices[0].text,
                                     "usage": r.usage.model_dump(), "seconds": round(time.monotonic() - t1, 3)})
        t1 = time.monotonic()
        chunks = list(client.completions.create(model=models[0], prompt=PROMPTS[0], max_tokens=32,
                                                temperature=0.0, stream=True))
        doc["stream"] = {"chunks": len(chunks), "text": "".join(c.choices[0].text for c in chunks if c.choices),
                         "seconds": round(time.monotonic() - t1, 3)}
        doc["spec_decode"] = spec_decode_stats(server.metrics()) if spec else None
        doc["ddtree_log"] = ddtree_lines(server.log_text())
        doc["backend_log"] = [l.split("] ", 1)[-1] for l in server.log_text().splitlines()
                              if "backend" in l.lower() and ("using" in l.lower() or "selected" in l.lower())][:8]
        rc = 0 if doc["overlay_check"]["rc"] == 0 else 1
    except Exception as e:
        doc["error"] = repr(e)[-4000:]
    finally:
        server.stop()
        doc["server_log_tail"] = server.log_tail(40).splitlines()
        (args.out / "proof.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "server_log_tail"}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
