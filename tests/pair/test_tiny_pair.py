"""The trained tiny pair (models/tiny-pair): checksums, size, vLLM (CPU) flat DFlash equal to the target
alone with a real acceptance length, the training forward equal to vLLM's drafter math, and a smoke
run of the training script that produces loadable checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAIR = REPO / "models" / "tiny-pair"
#: flat DFlash / DDTree acceptance length the committed drafter must beat (see the test below)
MIN_ACCEPTANCE = 1.6
sys.path.insert(0, str(REPO / "scripts"))

import train_tiny_pair as ttp  # noqa: E402

#: the GPU tool ships the whole tree in 64 MB per call; the pair must leave room for everything else
MAX_PAIR_BYTES = 30_000_000


def _pair_bytes(root: Path) -> int:
    return sum(p.stat().st_size for sub in ("target", "drafter") for p in (root / sub).rglob("*")
               if p.is_file())


def test_checksums_and_size():
    assert (PAIR / "SHA256SUMS").is_file(), "models/tiny-pair/SHA256SUMS missing"
    assert ttp.verify_sha256sums(PAIR) == []
    listed = {line.split("  ", 1)[1] for line in (PAIR / "SHA256SUMS").read_text().splitlines()}
    for sub in ("target", "drafter"):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert f"{sub}/{name}" in listed
    assert _pair_bytes(PAIR) <= MAX_PAIR_BYTES


def test_drafter_config_matches_target():
    t = json.loads((PAIR / "target" / "config.json").read_text())["text_config"]
    d = json.loads((PAIR / "drafter" / "config.json").read_text())
    assert d["architectures"] == ["DFlashDraftModel"] and d["model_type"] == "qwen3"
    assert d["block_size"] == 16 and d["target_hidden_size"] == t["hidden_size"]
    assert max(d["dflash_config"]["target_layer_ids"]) < t["num_hidden_layers"]
    # attention shaped like the target's full-attention layers (one KV-cache group in vLLM)
    for k in ("num_attention_heads", "num_key_value_heads", "head_dim"):
        assert d[k] == t[k], k
    assert t["mamba_ssm_dtype"] == "float32"


@pytest.mark.slow
def test_vllm_flat_dflash_equals_target_and_accepts():
    import measure_tiny_pair as mtp
    from tests.support.equality import compare_greedy

    prompts = mtp.heldout_prompts(PAIR / "target" / "tokenizer.json", 6)
    log_dir = REPO / "build" / "test-logs"
    ref, outs, stats, _ = mtp.run_pair(PAIR, prompts, 48, log_dir)
    verdicts = [compare_greedy(r, top2, o) for (r, top2), (o, _) in zip(ref, outs)]
    bad = [f"prompt {i}: {v.detail}" for i, v in enumerate(verdicts) if not v.ok]
    assert not bad, "\n".join(bad)
    assert stats["drafts"] > 0
    # A broken drafter (wrong weights, wrong context keys, misaligned positions) accepts ~nothing:
    # acceptance length 1.00-1.01 (1 in 4096 by chance). The committed drafter (recipe v3, H100 run
    # 4) accepts 2.03 on these 6 prompts x 48 tokens on CPU, DDTree b16/k4 2.23 (3.48 flat on 20 x
    # 64, docs/tiny-pair.md); run 3's accepted 1.53 / 1.65 here, run 2's 1.17. Raise the bar with
    # the drafter.
    assert stats["acceptance_length"] > MIN_ACCEPTANCE, stats

    # DDTree tree verify (CPU backend) with the same trained drafter: equal to the target alone,
    # and accepting along real trees (committed KV rows and GDN state on drafter-made paths)
    from servertools import CPU_TINY_FLAGS, VllmServer, spec_decode_stats, speculative_args

    spec = {"method": "dflash_ddtree", "model": str(PAIR / "drafter"), "ddtree_budget": 16,
            "ddtree_top_k": 4}
    with VllmServer(PAIR / "target", CPU_TINY_FLAGS + speculative_args(spec),
                    log_dir / "pair-ddtree.log") as srv:
        tree_outs = mtp.complete_all(srv, prompts, 48, logprobs=None)
        tree_stats = spec_decode_stats(srv.metrics())
        assert "DDTree tree verify active" in srv.log_text()
    verdicts = [compare_greedy(r, top2, o) for (r, top2), (o, _) in zip(ref, tree_outs)]
    bad = [f"prompt {i}: {v.detail}" for i, v in enumerate(verdicts) if not v.ok]
    assert not bad, "\n".join(bad)
    assert tree_stats["acceptance_length"] > MIN_ACCEPTANCE, tree_stats
    (log_dir / "pair-acceptance.json").write_text(json.dumps(
        {"dflash": stats, "ddtree_b16_k4": tree_stats}, indent=2))


@pytest.mark.slow
def test_training_forward_matches_vllm_drafter():
    """The drafter forward used for training gives vLLM's drafter logits (first proposal step)."""
    probe = Path(__file__).with_name("parity_probe.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "scripts")]))
    r = subprocess.run([sys.executable, str(probe), str(PAIR), "64"], capture_output=True,
                       text=True, env=env, timeout=900, cwd=REPO)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PARITY ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(line[0][len("PARITY "):])
    # vLLM runs bf16, the training-side recomputation float32 from the same bf16 weights
    assert res["aux_max_abs_diff"] <= 0.05 * res["aux_max_abs"], res
    assert res["logits_max_abs_diff"] <= 0.05 * res["logits_max_abs"] + 0.1, res
    for v, o, clear in zip(res["vllm_drafts"], res["our_drafts"], res["clear_margin"]):
        if clear:
            assert v == o, res


def _run_training(*flags: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train_tiny_pair.py"), *flags],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def smoke_pair(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "pair"
    _run_training("--smoke", "--out", str(out))
    return out


def _check_engine_like_report(section: dict) -> None:
    acc = section["acceptance_engine_like_heldout"]
    assert acc["drafts"] > 0 and len(acc["accepted_per_position"]) == 15
    assert acc["acceptance_length"] == pytest.approx(
        1 + sum(acc["accepted_per_position"]) / acc["drafts"], abs=1e-3)
    assert "acceptance_per_anchor_deep_heldout" in section


def test_smoke_training_produces_loadable_checkpoints(smoke_pair):
    out = smoke_pair
    assert ttp.verify_sha256sums(out) == []
    report = json.loads((out / "train_report.json").read_text())
    assert report["smoke"] and report["target"]["steps"] > 0 and report["drafter"]["steps"] > 0
    _check_engine_like_report(report["drafter"])
    assert report["drafter_data"]["real_text"]["windows"] > 0

    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out / "target")
    assert type(cfg).__name__ == "Qwen3_5Config"
    t_state = load_file(out / "target" / "model.safetensors")
    assert "lm_head.weight" in t_state and "model.language_model.embed_tokens.weight" in t_state
    assert all(v.dtype == torch.bfloat16 for v in t_state.values())
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    tcfg = cfg.text_config
    model = Qwen3_5ForCausalLM(tcfg)
    missing, unexpected = model.load_state_dict(
        {k.replace("model.language_model.", "model."): v for k, v in t_state.items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    d = json.loads((out / "drafter" / "config.json").read_text())
    d_state = load_file(out / "drafter" / "model.safetensors")
    for name in ("fc.weight", "hidden_norm.weight", "norm.weight",
                 "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_norm.weight",
                 "layers.0.mlp.down_proj.weight"):
        assert name in d_state, name
    n_aux = len(d["dflash_config"]["target_layer_ids"])
    assert tuple(d_state["fc.weight"].shape) == (d["hidden_size"], d["target_hidden_size"] * n_aux)
    drafter = ttp.build_drafter_class()(ttp.drafter_cfg(tcfg, d["num_hidden_layers"], n_aux))
    drafter.load_state_dict(d_state, strict=True)


def test_smoke_drafter_only_keeps_the_target(smoke_pair, tmp_path):
    """--drafter-only: the target is loaded, not trained; its files are copied byte-identical, the
    checksums and report are rewritten, the old report's target section is kept and marked."""
    out = tmp_path / "pair"
    _run_training("--smoke", "--drafter-only", "--target", str(smoke_pair / "target"), "--out",
                  str(out), "--real-frac", "1.0", "--gen-prompts", "0")
    assert ttp.verify_sha256sums(out) == []
    for f in (smoke_pair / "target").iterdir():
        assert (out / "target" / f.name).read_bytes() == f.read_bytes(), f.name
    old = json.loads((smoke_pair / "train_report.json").read_text())
    report = json.loads((out / "train_report.json").read_text())
    assert report["drafter_only"] and "not retrained" in report["target"]["note"]
    assert report["target"]["trained"]["steps"] == old["target"]["steps"]
    # the loaded target scores the held-out windows as the training run did
    assert report["target"]["recheck_here"]["heldout_nll"] == pytest.approx(
        old["target"]["heldout_nll"], abs=0.02)
    assert report["drafter_data"]["greedy"] is None
    assert report["drafter_data"]["rows_per_step"] == {"real_text": 2, "greedy": 0}
    _check_engine_like_report(report["drafter"])
    assert (out / "drafter" / "model.safetensors").is_file()
    # a drafter-only run on top of a drafter-only run names the same target training run, once
    again = tmp_path / "pair2"
    _run_training("--smoke", "--drafter-only", "--target", str(out / "target"), "--out",
                  str(again), "--real-frac", "1.0", "--gen-prompts", "0")
    report2 = json.loads((again / "train_report.json").read_text())
    assert report2["target"]["trained"]["steps"] == old["target"]["steps"]
    assert "trained" not in report2["target"]["trained"]
