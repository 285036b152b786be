"""The shared LLaDA2 denoising step (ddtree/llada2/denoise.py): sampling law, filters, seeding,
setting checks, and the reference generate() with sampling (no vLLM needed)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ddtree.llada2.denoise import (SamplingSettings, check_sampling, choose_unmask, denoise_step,
                                   filter_logits, propose, sampling_probs, step_seed, step_uniforms)

MASK = 7


def _chi2_p(samples: list[int], probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    n = len(samples)
    c = Counter(samples)
    keep = [t for t in range(probs.numel()) if probs[t] * n >= 5]
    obs = [c[t] for t in keep] + [n - sum(c[t] for t in keep)]
    exp = [float(probs[t]) * n for t in keep] + [n - sum(float(probs[t]) * n for t in keep)]
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def _logits(rows=3, vocab=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 2.0


def test_greedy_is_argmax_and_its_probability():
    logits = _logits()
    x0, conf = propose(logits, MASK, SamplingSettings())
    z = logits.clone()
    z[:, MASK] = float("-inf")
    assert torch.equal(x0, z.argmax(-1))
    assert torch.allclose(conf, torch.softmax(z, -1).gather(1, x0[:, None])[:, 0])


def test_mask_token_never_proposed():
    logits = torch.zeros(2, 10)
    logits[:, MASK] = 100.0
    s = SamplingSettings(temperature=1.0)
    for seed in range(50):
        x0, _ = propose(logits, MASK, s, step_uniforms(seed, 0, 0, 2))
        assert MASK not in x0.tolist()
    assert MASK not in propose(logits, MASK, SamplingSettings())[0].tolist()


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.6, top_k=4),
                                      dict(temperature=1.5, top_p=0.7),
                                      dict(temperature=1.2, top_k=6, top_p=0.85)])
def test_samples_follow_the_filtered_softmax(settings):
    s = SamplingSettings(**settings)
    logits = _logits(rows=1, vocab=12, seed=3)
    law = sampling_probs(logits, MASK, s)[0]
    samples, confs = [], {}
    for seed in range(3000):
        x0, conf = propose(logits, MASK, s, step_uniforms(seed, 32, 1, 1))
        samples.append(int(x0[0]))
        confs[int(x0[0])] = float(conf[0])
    assert all(law[t] > 0 for t in samples), "a filtered-out token was drawn"
    assert _chi2_p(samples, law) > 1e-3
    # the confidence is the drawn token's probability under the same (filtered) law
    assert all(abs(c - float(law[t])) < 1e-6 for t, c in confs.items())
    # power: a different temperature's law is rejected by the same samples
    other = sampling_probs(logits, MASK, SamplingSettings(**(settings | {"temperature":
                                                                        s.temperature * 0.6})))[0]
    assert _chi2_p(samples, other) < 1e-6


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    # top-k keeps every logit >= the k-th largest (ties kept)
    kept = filter_logits(logits, 3, 1.0).isfinite()[0].tolist()
    assert kept == [True, False, True, True, False]
    # top-p keeps a token while the mass before it is <= p: sorted probs 0.8, 0.1, 0.05, 0.05 ->
    # p=0.85 keeps two (mass before the third is 0.9), p=0.5 one, p=0.92 three (0.95 before the 4th)
    logits = torch.tensor([[0.8, 0.1, 0.05, 0.05]]).log()
    assert filter_logits(logits, 0, 0.85).isfinite()[0].tolist() == [True, True, False, False]
    assert filter_logits(logits, 0, 0.5).isfinite()[0].tolist() == [True, False, False, False]
    assert filter_logits(logits, 0, 0.92).isfinite()[0].tolist() == [True, True, True, False]


def test_uniforms_are_defined_per_seed_block_and_step():
    a = step_uniforms(5, 32, 2, 8)
    assert torch.equal(a, step_uniforms(5, 32, 2, 8))
    assert a.dtype == torch.float64 and ((a >= 0) & (a < 1)).all()
    # a shorter block is a prefix of a longer one: the draw of a position never depends on how
    # many positions follow it
    assert torch.equal(step_uniforms(5, 32, 2, 4), a[:4])
    others = [step_uniforms(6, 32, 2, 8), step_uniforms(5, 40, 2, 8), step_uniforms(5, 32, 3, 8)]
    assert all(not torch.equal(a, o) for o in others)
    assert len({step_seed(s, b, k) for s in range(20) for b in (0, 8) for k in range(4)}) == 160


def test_choose_unmask_threshold_and_fallback():
    masked = torch.tensor([True, True, False, True])
    conf = torch.tensor([0.99, 0.5, 1.0, 0.97])
    assert choose_unmask(masked, conf, 0.95, 1).tolist() == [True, False, False, True]
    # fewer than min_transfer above the threshold: the most confident masked ones instead
    assert choose_unmask(masked, conf, 0.98, 2).tolist() == [True, False, False, True]
    assert choose_unmask(masked, conf, 0.999, 5).tolist() == [True, True, False, True]


def test_denoise_step_only_changes_masked_positions():
    tokens = torch.tensor([3, MASK, MASK, 4])
    logits = _logits(rows=4, vocab=12, seed=1)
    out = denoise_step(tokens, logits, mask_token_id=MASK, threshold=0.5, min_transfer=1,
                       sampling=SamplingSettings(temperature=1.0), uniforms=step_uniforms(1, 0, 0, 4))
    assert out[0] == 3 and out[3] == 4 and (out != MASK).sum() >= 3
    with pytest.raises(ValueError, match="one uniform per row"):
        denoise_step(tokens, logits, mask_token_id=MASK, threshold=0.5, min_transfer=1,
                     sampling=SamplingSettings(temperature=1.0))


@pytest.mark.parametrize("kw,field", [(dict(temperature=-0.1), "temperature"),
                                      (dict(temperature=float("nan")), "temperature"),
                                      (dict(temperature=float("inf")), "temperature"),
                                      (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                      (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k")])
def test_invalid_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingSettings(**kw)
    full = dict(temperature=1.0, top_k=0, top_p=1.0) | kw
    with pytest.raises(ValueError, match=field):
        check_sampling(full["temperature"], full["top_k"], full["top_p"])


def _tiny_reference():
    from ddtree.llada2.reference import LLaDA2Config, LLaDA2Reference

    sys_path = __import__("sys").path
    from pathlib import Path
    sys_path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import tiny_llada2

    cfg = dict(tiny_llada2.CONFIG, num_hidden_layers=2)
    vocab = 64
    w = tiny_llada2.make_weights(cfg, vocab, seed=1)
    return LLaDA2Reference(LLaDA2Config.from_dict(dict(cfg, vocab_size=vocab)), w), vocab - 1


def test_reference_generate_sampling_seeded_and_greedy_default():
    from ddtree.llada2.reference import generate

    model, mask = _tiny_reference()
    prompt = [5, 9, 11, 2, 30]
    kw = dict(max_new_tokens=12, block_length=4, threshold=0.9, mask_token_id=mask,
              eos_token_id=None)
    greedy = generate(model, prompt, **kw).tokens
    # temperature 0 is greedy whatever top-k / top-p / seed say
    assert generate(model, prompt, **kw, temperature=0.0, top_k=3, top_p=0.5, seed=4).tokens == greedy
    a = generate(model, prompt, **kw, temperature=1.5, seed=123).tokens
    assert generate(model, prompt, **kw, temperature=1.5, seed=123).tokens == a
    runs = {tuple(generate(model, prompt, **kw, temperature=1.5, seed=s).tokens) for s in range(6)}
    assert len(runs) > 1, "the seed does not change the sample"
    assert all(len(r) == 12 and mask not in r for r in runs)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, **kw, temperature=1.0, top_p=0.0)
