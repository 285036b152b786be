"""The plain-torch LLaDA2 reference: mask, routing and decode invariants (no vLLM needed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ddtree.llada2.reference import (LLaDA2Config, LLaDA2Reference, block_causal_mask, generate,
                                     route, transfer_schedule)


def test_block_causal_mask():
    m = block_causal_mask(7, 3)
    # blocks {0,1,2} {3,4,5} {6}: bidirectional inside a block, earlier blocks visible
    assert m[0, 2] and m[2, 0] and not m[2, 3]
    assert m[4, 0] and m[4, 5] and not m[5, 6] and m[6, 0] and m[6, 6]
    assert torch.equal(block_causal_mask(5, 1), torch.ones(5, 5, dtype=torch.bool).tril())


def _cfg(**kw):
    base = dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=16,
                num_experts_per_tok=4, moe_intermediate_size=4, n_group=4, topk_group=2,
                routed_scaling_factor=2.5)
    base.update(kw)
    return LLaDA2Config(**base)


def _route_brute_force(logits, bias, cfg):
    ids, ws = [], []
    for row in range(logits.shape[0]):
        s = torch.sigmoid(logits[row].double())
        b = s + bias.double()
        groups = b.view(cfg.n_group, -1)
        gscore = [float(sorted(g.tolist())[-1] + sorted(g.tolist())[-2]) for g in groups]
        keep = sorted(range(cfg.n_group), key=lambda g: -gscore[g])[: cfg.topk_group]
        per = cfg.num_experts // cfg.n_group
        cand = [e for g in keep for e in range(g * per, (g + 1) * per)]
        chosen = sorted(cand, key=lambda e: -float(b[e]))[: cfg.num_experts_per_tok]
        w = torch.tensor([float(s[e]) for e in chosen])
        ids.append(sorted(chosen))
        ws.append(dict(zip(chosen, (w / w.sum() * cfg.routed_scaling_factor).tolist())))
    return ids, ws


def test_routing_matches_brute_force_and_bias_only_selects():
    cfg = _cfg()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, cfg.num_experts, generator=g)
    bias = torch.randn(cfg.num_experts, generator=g) * 0.5
    ids, w = route(logits, bias, cfg)
    want_ids, want_w = _route_brute_force(logits, bias, cfg)
    for r in range(32):
        assert sorted(ids[r].tolist()) == want_ids[r]
        for e, x in zip(ids[r].tolist(), w[r].tolist()):
            assert x == pytest.approx(want_w[r][e], rel=1e-5)
    # the bias changes the choice (for some token) but the weights stay unbiased sigmoid scores
    ids0, _ = route(logits, torch.zeros_like(bias), cfg)
    assert not torch.equal(ids0.sort(-1).values, ids.sort(-1).values)
    assert torch.allclose(w.sum(-1), torch.full((32,), cfg.routed_scaling_factor))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_vllm_overlay_routing_equals_reference():
    import importlib.machinery
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "patches/files/vllm/model_executor/models/llada2.py"
    try:
        spec = importlib.util.spec_from_file_location("vllm.model_executor.models._llada2_test", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except Exception as e:  # pragma: no cover - vLLM import problems on exotic hosts
        pytest.skip(f"cannot import the overlay module: {e}")
    cfg = _cfg()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, cfg.num_experts, generator=g)
    bias = torch.randn(cfg.num_experts, generator=g) * 0.5
    ref_ids, ref_w = route(logits, bias, cfg)
    w, ids = mod.group_limited_sigmoid_topk(logits, bias, cfg.num_experts_per_tok, cfg.n_group,
                                            cfg.topk_group, True, cfg.routed_scaling_factor)
    order_ref, order = ref_ids.argsort(-1), ids.long().argsort(-1)
    assert torch.equal(ref_ids.gather(1, order_ref), ids.long().gather(1, order))
    assert torch.allclose(ref_w.gather(1, order_ref), w.gather(1, order))


def test_forward_is_block_causal(tiny_llada2):
    m = LLaDA2Reference.from_pretrained(tiny_llada2)
    x = torch.arange(3, 27)
    y = x.clone()
    y[17] = 500  # inside block 2 (positions 16..23) for block length 8
    a, b = m.forward(x, 8), m.forward(y, 8)
    assert torch.allclose(a[:16], b[:16], atol=1e-5)  # earlier blocks never see later tokens
    assert not torch.allclose(a[16], b[16])           # same block: bidirectional
    # prefix consistency: the logits of a prefix that ends on a block boundary do not change
    assert torch.allclose(m.forward(x[:16], 8), a[:16], atol=1e-5)


def test_transfer_schedule():
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(8, 3) == [3, 3, 2]
    assert sum(transfer_schedule(13, 5)) == 13


def test_generate_steps_and_settings(tiny_llada2):
    import json
    m = LLaDA2Reference.from_pretrained(tiny_llada2)
    cfg = json.loads((tiny_llada2 / "config.json").read_text())
    kw = dict(mask_token_id=cfg["mask_token_id"], eos_token_id=None)
    prompt = [5, 6, 7, 8, 9]
    # threshold 1.0 never passes: exactly one position per step -> block_length steps per block
    r = generate(m, prompt, max_new_tokens=11, block_length=8, threshold=1.0, **kw)
    assert r.steps_per_block == [3, 8]  # first block holds the 5-token prompt tail
    assert len(r.tokens) == 11 and cfg["mask_token_id"] not in r.tokens
    # a single step per block commits everything at once
    r1 = generate(m, prompt, max_new_tokens=11, block_length=8, steps=1, **kw)
    assert r1.steps_per_block == [1, 1]
    # peaked logits: the 0.95 rule unmasks several positions in some step
    r2 = generate(m, prompt, max_new_tokens=40, block_length=8, threshold=0.95, **kw)
    assert r2.forwards < 40
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="threshold"):
            generate(m, prompt, max_new_tokens=4, threshold=bad, **kw)
    with pytest.raises(ValueError, match="block_length"):
        generate(m, prompt, max_new_tokens=4, block_length=0, **kw)


def test_generate_eos_stops_after_its_block(tiny_llada2):
    import json
    m = LLaDA2Reference.from_pretrained(tiny_llada2)
    cfg = json.loads((tiny_llada2 / "config.json").read_text())
    free = generate(m, [11, 12, 13], max_new_tokens=24, block_length=8, threshold=0.95,
                    mask_token_id=cfg["mask_token_id"], eos_token_id=None)
    eos = free.tokens[6]  # pretend this token is EOS
    r = generate(m, [11, 12, 13], max_new_tokens=24, block_length=8, threshold=0.95,
                 mask_token_id=cfg["mask_token_id"], eos_token_id=eos)
    cut = free.tokens.index(eos)
    assert r.tokens == free.tokens[: cut + 1]
    assert len(r.steps_per_block) == 1 + (3 + cut) // 8  # no block after the EOS block
