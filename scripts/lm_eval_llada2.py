#!/usr/bin/env python3
"""Run lm-eval against a vLLM server serving LLaDA2 through its OpenAI-compatible API.

Against a running server (real weights; see docs/llada2.md):

    python scripts/lm_eval_llada2.py --base-url http://127.0.0.1:8000/v1 \
        --tasks gsm8k,mmlu_generative,hellaswag_gen --num-fewshot 5 --chat

Start a server for the run (tiny CPU smoke test on a local task, no hub access):

    python scripts/lm_eval_llada2.py --serve build/tiny-llada2 --smoke

A diffusion LM returns no prompt logprobs, so only generate_until tasks work: GSM8K as is, MMLU as
``mmlu_generative``, HellaSwag as ``hellaswag_gen`` (scripts/lm_eval_tasks/). Decoding settings
(block length, threshold, steps) are the server's (--diffusion-config, VLLM_LLADA2_THRESHOLD).
Anything after ``--`` goes to lm-eval unchanged.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS_DIR = HERE / "lm_eval_tasks"


def served_model(base_url: str) -> str:
    with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def lm_eval_command(base_url: str, model: str, tokenizer: str, args, extra: list[str]) -> list[str]:
    kind, endpoint = (("local-chat-completions", "/chat/completions") if args.chat
                      else ("local-completions", "/completions"))
    model_args = ",".join([
        f"model={model}",
        f"base_url={base_url.rstrip('/')}{endpoint}",
        f"num_concurrent={args.num_concurrent}",
        "max_retries=1",
        "tokenized_requests=False",
        "tokenizer_backend=huggingface",
        f"tokenizer={tokenizer}",
        f"timeout={args.request_timeout}",
    ])
    cmd = [sys.executable, "-m", "lm_eval", "--model", kind, "--model_args", model_args,
           "--tasks", args.tasks, "--include_path", str(TASKS_DIR), "--batch_size", "1",
           "--output_path", str(args.output.resolve())]
    if args.chat:
        cmd.append("--apply_chat_template")
    if args.num_fewshot is not None:
        cmd += ["--num_fewshot", str(args.num_fewshot)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    return cmd + extra


def main() -> int:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", help="OpenAI base URL of a running server, e.g. http://h:8000/v1")
    ap.add_argument("--serve", type=Path, help="start `vllm serve MODEL` for the run instead")
    ap.add_argument("--serve-args", default="", help="extra `vllm serve` flags (one string)")
    ap.add_argument("--tokenizer", help="HF tokenizer path/name (default: the served model path)")
    ap.add_argument("--tasks", default="gsm8k")
    ap.add_argument("--num-fewshot", type=int)
    ap.add_argument("--limit", type=float)
    ap.add_argument("--chat", action="store_true", help="use chat completions + chat template")
    ap.add_argument("--num-concurrent", type=int, default=8)
    ap.add_argument("--request-timeout", type=int, default=600)
    ap.add_argument("--output", type=Path, default=Path("build/lm-eval"))
    ap.add_argument("--smoke", action="store_true",
                    help="the local llada2_smoke task, 4 docs (no hub access)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tasks, args.limit = "llada2_smoke", 4
    if bool(args.base_url) == bool(args.serve):
        ap.error("give exactly one of --base-url and --serve")

    server = None
    if args.serve:
        sys.path.insert(0, str(HERE))
        from servertools import VllmServer
        serve_args = args.serve_args.split() or ["--enforce-eager", "--max-model-len", "2048"]
        log = args.output / "serve.log"
        server = VllmServer(args.serve.resolve(), serve_args, log).start()
        base_url = server.base_url + "/v1"
    else:
        base_url = args.base_url
    try:
        model = served_model(base_url)
        tokenizer = args.tokenizer or (str(args.serve.resolve()) if args.serve else model)
        cmd = lm_eval_command(base_url, model, tokenizer, args, extra)
        print("+", " ".join(cmd), flush=True)
        # The smoke task names its data file relative to its own folder.
        cwd = TASKS_DIR / "llada2_smoke" if args.smoke else None
        return subprocess.call(cmd, cwd=cwd)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
