"""Run one in-process vLLM engine on the tiny LLaDA2 checkpoint and print a JSON verdict.

Driven by tests/llada2/test_engine.py in a fresh process per engine configuration (cpu-vllm.md:
several engines in one process can trip over kernel re-registration).

    python tests/llada2/engine_check.py forward MODEL
    python tests/llada2/engine_check.py batch MODEL CONCURRENCY
    python tests/llada2/engine_check.py invalid MODEL
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BLOCK = 8
# Prompt lengths around the block size: aligned (8, 16, 24) and not, shorter than one block too.
PROMPT_LENGTHS = [1, 3, 8, 12, 16, 17, 23, 24]
MAX_TOKENS = [20, 13, 24, 9, 17, 20, 11, 16]
# Some requests carry their own settings (vllm_xargs / SamplingParams.extra_args).
REQUEST_SETTINGS = [None, {"threshold": 0.7}, None, {"block_length": 4}, {"max_steps": 2},
                    None, {"threshold": 1.0, "max_steps": 4}, {"block_length": 4, "threshold": 0.5}]


def prompts(vocab: int, skip: set[int]) -> list[list[int]]:
    import random
    rng = random.Random(7)
    allowed = [t for t in range(vocab) if t not in skip]
    return [[rng.choice(allowed) for _ in range(n)] for n in PROMPT_LENGTHS]


def main() -> int:
    mode, model = sys.argv[1], sys.argv[2]
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ddtree.llada2.reference import LLaDA2Reference, generate

    cfg = json.loads((Path(model) / "config.json").read_text())
    mask, eos = cfg["mask_token_id"], cfg["eos_token_id"]
    common = dict(model=model, enforce_eager=True, dtype="float32", max_model_len=512, seed=0)
    result: dict = {"mode": mode}

    if mode == "forward":
        # Block decode off: the model is a plain causal LM, i.e. LLaDA2 with block length 1.
        llm = LLM(**common, hf_overrides={"canvas_length": None}, enable_prefix_caching=False)
        ref = LLaDA2Reference.from_pretrained(model)
        worst = 0.0
        for p in prompts(cfg["vocab_size"], {mask, eos})[2:6]:
            out = llm.generate([TokensPrompt(prompt_token_ids=p)],
                               SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5))
            lp = torch.log_softmax(ref.forward(torch.tensor(p), block_length=1), -1)
            for i, d in enumerate(out[0].prompt_logprobs):
                for tok, l in (d or {}).items():
                    worst = max(worst, abs(l.logprob - lp[i - 1, tok].item()))
        result["max_abs_logprob_diff"] = worst

    elif mode == "batch":
        concurrency = int(sys.argv[3])
        llm = LLM(**common, diffusion_config={"canvas_length": BLOCK}, max_num_seqs=concurrency)
        ref = LLaDA2Reference.from_pretrained(model)
        ps = prompts(cfg["vocab_size"], {mask, eos})
        # A frequent token as an extra stop token exercises "EOS stops after its block".
        stop = [None, None, None, None, None, [750], None, None]
        sps = [SamplingParams(max_tokens=m, temperature=0, extra_args=x,
                              stop_token_ids=s or [])
               for m, x, s in zip(MAX_TOKENS, REQUEST_SETTINGS, stop)]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sps)
        rows = []
        for p, m, x, s, o in zip(ps, MAX_TOKENS, REQUEST_SETTINGS, stop, outs):
            x = x or {}
            b = x.get("block_length", BLOCK)
            steps = x.get("max_steps", b)
            r = generate(ref, p, max_new_tokens=m, block_length=b,
                         threshold=x.get("threshold", 0.95), steps=steps, mask_token_id=mask,
                         eos_token_id=eos)
            want = r.tokens
            if s:  # extra stop token: the reference stops at its first occurrence too
                cut = [i for i, t in enumerate(want) if t in s]
                if cut:
                    want = want[: cut[0] + 1]
            got = list(o.outputs[0].token_ids)
            rows.append({"prompt_len": len(p), "settings": x, "engine": got, "reference": want,
                         "equal": got == want})
        result["rows"] = rows

    elif mode == "invalid":
        llm = LLM(**common, diffusion_config={"canvas_length": BLOCK})
        errors = {}
        for name, extra in {"threshold_zero": {"threshold": 0.0},
                            "threshold_above_one": {"threshold": 1.5},
                            "block_length_zero": {"block_length": 0},
                            "block_length_too_big": {"block_length": 4 * BLOCK},
                            "max_steps_too_big": {"block_length": 4, "max_steps": 5},
                            "typo_key": {"llada2_threshold": 0.9}}.items():
            try:
                llm.generate([TokensPrompt(prompt_token_ids=[3, 4, 5])],
                             SamplingParams(max_tokens=4, temperature=0, extra_args=extra))
                errors[name] = None
            except ValueError as e:
                errors[name] = str(e)
        result["errors"] = errors
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("ENGINE_CHECK_RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
