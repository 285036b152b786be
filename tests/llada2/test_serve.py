"""`vllm serve` with the tiny LLaDA2 checkpoint on CPU, driven by the openai client: completions
(batched, mixed prompt lengths) equal the reference token for token, chat works, streaming emits
one chunk per finished block, and /metrics carries the block-decode counters."""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")]

BLOCK = 8
MAX_TOKENS = 19
PROMPT_LENGTHS = [2, 7, 8, 13, 16, 21]


@pytest.fixture(scope="module")
def server(tiny_llada2, log_dir):
    from servertools import VllmServer
    args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
            "--max-num-seqs", "8", "--seed", "0",
            "--diffusion-config", json.dumps({"canvas_length": BLOCK})]
    with VllmServer(tiny_llada2, args, log_dir / "serve-llada2.log") as srv:
        yield srv


def _client(server):
    from openai import OpenAI
    client = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", timeout=300, max_retries=0)
    return client, client.models.list().data[0].id


def _prompts(cfg):
    import random
    rng = random.Random(3)
    skip = {cfg["mask_token_id"], cfg["eos_token_id"]}
    allowed = [t for t in range(5, cfg["vocab_size"]) if t not in skip]
    return [[rng.choice(allowed) for _ in range(n)] for n in PROMPT_LENGTHS]


def _reference(tiny_llada2, prompt, max_tokens, **kw):
    from ddtree.llada2.reference import LLaDA2Reference, generate
    cfg = json.loads((tiny_llada2 / "config.json").read_text())
    model = LLaDA2Reference.from_pretrained(tiny_llada2)
    args = dict(block_length=BLOCK, threshold=0.95)
    args.update(kw)
    args.setdefault("eos_token_id", cfg["eos_token_id"])
    return generate(model, prompt, max_new_tokens=max_tokens, mask_token_id=cfg["mask_token_id"],
                    **args).tokens


def test_completions_batch_equal_reference(server, tiny_llada2):
    cfg = json.loads((tiny_llada2 / "config.json").read_text())
    client, model = _client(server)
    prompts = _prompts(cfg)
    xargs = [None, {"threshold": 0.8}, None, {"block_length": 4}, None, {"max_steps": 2}]

    def one(i):
        extra = {"return_token_ids": True}
        if xargs[i]:
            extra["vllm_xargs"] = xargs[i]
        r = client.completions.create(model=model, prompt=prompts[i], max_tokens=MAX_TOKENS,
                                      temperature=0.0, extra_body=extra)
        return list(r.choices[0].token_ids)

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, range(len(prompts))))
    for p, x, g in zip(prompts, xargs, got):
        x = dict(x or {})
        if "block_length" in x and "max_steps" not in x:
            x["steps"] = x["block_length"]
        if "max_steps" in x:
            x["steps"] = x.pop("max_steps")
        assert g == _reference(tiny_llada2, p, MAX_TOKENS, **x), (len(p), x)


def test_chat_and_streaming(server, tiny_llada2):
    client, model = _client(server)
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=12,
        temperature=0.0)
    assert chat.choices[0].message.content is not None
    assert chat.usage.completion_tokens > 0

    prompt = list(range(40, 51))  # 11 tokens: the first block holds a 3-token prompt tail
    full = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0.0,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=24,
                                       temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    pieces = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
    assert "".join(pieces) == full.choices[0].text
    # one chunk per finished block: 5 tokens in the tail block, then blocks of 8 (5+8+8+3 cut)
    assert 2 <= len(pieces) <= 4, pieces
    assert list(full.choices[0].token_ids) == _reference(tiny_llada2, prompt, 24,
                                                         eos_token_id=None)


def test_metrics(server):
    client, model = _client(server)
    client.completions.create(model=model, prompt=[7, 8, 9, 10], max_tokens=16, temperature=0.0,
                              extra_body={"ignore_eos": True})
    m = server.metrics()
    steps = m.get("vllm:diffusion_num_denoising_steps_total", 0.0)
    committed = m.get("vllm:diffusion_num_committed_tokens_total", 0.0)
    blocks = m.get("vllm:diffusion_num_finished_blocks_total", 0.0)
    assert steps > 0 and committed > 0 and blocks > 0
    tokens_per_forward = committed / steps
    steps_per_block = steps / blocks
    assert 1.0 <= tokens_per_forward <= BLOCK
    assert 1.0 <= steps_per_block <= BLOCK
