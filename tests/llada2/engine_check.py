"""Run one in-process vLLM engine on the tiny LLaDA2 checkpoint and print a JSON verdict.

Driven by tests/llada2/test_engine.py in a fresh process per engine configuration (cpu-vllm.md:
several engines in one process can trip over kernel re-registration).

    python tests/llada2/engine_check.py forward MODEL
    python tests/llada2/engine_check.py batch MODEL CONCURRENCY
    python tests/llada2/engine_check.py invalid MODEL
    python tests/llada2/engine_check.py dist MODEL
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
# Sampled requests appended to the greedy ones above (same prompt lengths as the first four, new
# prompts): seeded, so the engine must equal the reference token for token whatever the batch.
SAMPLED = [  # (prompt length, max tokens, extra_args, temperature, top_k, top_p, seed)
    (3, 20, None, 1.0, 0, 1.0, 11),
    (8, 17, {"threshold": 0.6}, 0.7, 5, 1.0, 12),
    (12, 19, {"block_length": 4}, 1.3, 0, 0.8, 13),
    (17, 16, {"max_steps": 3}, 2.0, 20, 0.95, 2**40 + 5),
]
# Distribution check: one block of DIST_BLOCK masks after a block-aligned prompt, one step
# (max_steps 1: every position is drawn from the first step's distribution), many seeds.
DIST_BLOCK = 4
DIST_SEEDS = 400
DIST_VARIANTS = {"t2": dict(temperature=2.0, top_k=0, top_p=1.0),
                 "t1_k5_p09": dict(temperature=1.0, top_k=5, top_p=0.9)}


def prompts(vocab: int, skip: set[int], lengths=None, seed: int = 7) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    allowed = [t for t in range(vocab) if t not in skip]
    return [[rng.choice(allowed) for _ in range(n)] for n in (lengths or PROMPT_LENGTHS)]


def batch_requests(cfg: dict):
    """(prompt, max_tokens, extra_args, stop ids, sampling kwargs) of the mixed test batch."""
    mask, eos = cfg["mask_token_id"], cfg["eos_token_id"]
    ps = prompts(cfg["vocab_size"], {mask, eos})
    # A frequent token as an extra stop token exercises "EOS stops after its block".
    stop = [None, None, None, None, None, [750], None, None]
    greedy = dict(temperature=0.0, top_k=0, top_p=1.0, seed=None)
    reqs = [(p, m, x, s, greedy) for p, m, x, s in zip(ps, MAX_TOKENS, REQUEST_SETTINGS, stop)]
    sp = prompts(cfg["vocab_size"], {mask, eos}, [r[0] for r in SAMPLED], seed=8)
    for p, (_, m, x, t, k, tp, seed) in zip(sp, SAMPLED):
        reqs.append((p, m, x, None, dict(temperature=t, top_k=k, top_p=tp, seed=seed)))
    return reqs


def reference_tokens(ref, cfg: dict, block: int, p, m, x, stop, samp) -> list[int]:
    from ddtree.llada2.reference import generate

    x = x or {}
    b = x.get("block_length", block)
    r = generate(ref, p, max_new_tokens=m, block_length=b, threshold=x.get("threshold", 0.95),
                 steps=x.get("max_steps", b), mask_token_id=cfg["mask_token_id"],
                 eos_token_id=cfg["eos_token_id"], **samp)
    want = r.tokens
    if stop:  # extra stop token: the reference stops at its first occurrence too
        cut = [i for i, t in enumerate(want) if t in stop]
        if cut:
            want = want[: cut[0] + 1]
    return want


def dist_prompt(ref, cfg: dict) -> list[int]:
    """The candidate prompt whose first masked block has the most spread-out distribution at
    temperature 2 (a peaked position would make the chi-square test weak)."""
    import torch
    from ddtree.llada2.denoise import SamplingSettings, sampling_probs

    mask = cfg["mask_token_id"]
    best, best_h = None, -1.0
    for p in prompts(cfg["vocab_size"], {mask, cfg["eos_token_id"]}, [DIST_BLOCK] * 8, seed=3):
        logits = ref.forward(torch.tensor(p + [mask] * DIST_BLOCK), DIST_BLOCK)[DIST_BLOCK:]
        pr = sampling_probs(logits, mask, SamplingSettings(temperature=2.0))
        h = float(-(pr.clamp_min(1e-12).log() * pr).sum(-1).min())
        if h > best_h:
            best, best_h = p, h
    return best


def dist_expected(ref, cfg: dict, prompt: list[int], **samp) -> list[list[float]]:
    import torch
    from ddtree.llada2.denoise import SamplingSettings, sampling_probs

    mask = cfg["mask_token_id"]
    logits = ref.forward(torch.tensor(prompt + [mask] * DIST_BLOCK), DIST_BLOCK)[DIST_BLOCK:]
    return sampling_probs(logits, mask, SamplingSettings(**samp)).tolist()


def main() -> int:
    mode, model = sys.argv[1], sys.argv[2]
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ddtree.llada2.reference import LLaDA2Reference

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
        reqs = batch_requests(cfg)
        sps = [SamplingParams(max_tokens=m, extra_args=x, stop_token_ids=s or [], **samp)
               for p, m, x, s, samp in reqs]
        outs = llm.generate([TokensPrompt(prompt_token_ids=r[0]) for r in reqs], sps)
        rows = []
        for (p, m, x, s, samp), o in zip(reqs, outs):
            want = reference_tokens(ref, cfg, BLOCK, p, m, x, s, samp)
            got = list(o.outputs[0].token_ids)
            rows.append({"prompt_len": len(p), "settings": x or {}, "sampling": samp,
                         "engine": got, "reference": want, "equal": got == want})
        result["rows"] = rows

    elif mode == "dist":
        llm = LLM(**common, diffusion_config={"canvas_length": BLOCK}, max_num_seqs=64)
        ref = LLaDA2Reference.from_pretrained(model)
        prompt = dist_prompt(ref, cfg)
        result["prompt"] = prompt
        xargs = {"block_length": DIST_BLOCK, "max_steps": 1}
        for name, samp in DIST_VARIANTS.items():
            sps = [SamplingParams(max_tokens=DIST_BLOCK, ignore_eos=True, seed=seed,
                                  extra_args=xargs, **samp) for seed in range(DIST_SEEDS)]
            outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * DIST_SEEDS, sps,
                                use_tqdm=False)
            result[name] = {"samples": [list(o.outputs[0].token_ids) for o in outs],
                            "expected": dist_expected(ref, cfg, prompt, **samp)}
        # A control the test must reject: the t2 samples against the temperature-1.4 law.
        result["control_expected"] = dist_expected(ref, cfg, prompt, temperature=1.4)
        # An unseeded sampled request runs too (its tokens are not reproducible).
        o = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                         SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True))
        result["unseeded_len"] = len(o[0].outputs[0].token_ids)

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
        # Sampling settings: vLLM's own SamplingParams checks plus the block decode's
        for name, kw in {"temperature_negative": {"temperature": -0.5},
                         "top_p_zero": {"temperature": 1.0, "top_p": 0.0},
                         "top_p_above_one": {"temperature": 1.0, "top_p": 1.5},
                         "top_k_below_minus_one": {"temperature": 1.0, "top_k": -3},
                         "min_p": {"temperature": 1.0, "min_p": 0.1},
                         "repetition_penalty": {"temperature": 1.0, "repetition_penalty": 1.3},
                         "presence_penalty": {"temperature": 0.0, "presence_penalty": 0.5}}.items():
            try:
                llm.generate([TokensPrompt(prompt_token_ids=[3, 4, 5])],
                             SamplingParams(max_tokens=4, **kw))
                errors[name] = None
            except (ValueError, TypeError) as e:
                errors[name] = str(e)
        result["errors"] = errors
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("ENGINE_CHECK_RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
