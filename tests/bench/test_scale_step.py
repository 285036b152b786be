"""scripts/gpu_scale_step.py: the product-size configs it writes (what vLLM will build with random
weights) and the break-even arithmetic of its report."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import gpu_scale_step as ss  # noqa: E402


def test_qwen35_27b_shape():
    t = ss.target_config("qwen3.5-27b")["text_config"]
    kinds = t["layer_types"]
    assert len(kinds) == t["num_hidden_layers"] == 64
    assert kinds.count("full_attention") == 16 and kinds[3] == "full_attention"
    assert kinds[:3] == ["linear_attention"] * 3
    assert (t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]) == (24, 4, 256)
    assert (t["linear_num_key_heads"], t["linear_num_value_heads"]) == (16, 48)
    assert t["mamba_ssm_dtype"] == "float32"
    d = ss.drafter_config("qwen3.5-27b")
    assert d["num_target_layers"] == 64 and d["target_hidden_size"] == 5120
    assert d["vocab_size"] == t["vocab_size"] == 248320
    assert max(d["dflash_config"]["target_layer_ids"]) < 64 and d["block_size"] == 16


def test_tiny_shape_matches_the_committed_pair_structure():
    repo = Path(__file__).resolve().parents[2]
    pair = json.loads((repo / "models/tiny-pair/target/config.json").read_text())["text_config"]
    t = ss.target_config("tiny")["text_config"]
    for k in ("hidden_size", "num_hidden_layers", "layer_types", "linear_num_value_heads",
              "head_dim", "vocab_size"):
        assert t[k] == pair[k], k


def test_drafter_layers_must_exist():
    bad = {"target": dict(ss.SHAPES["tiny"]["target"]),
           "drafter": dict(ss.SHAPES["tiny"]["drafter"], target_layer_ids=[1, 8])}
    ss.SHAPES["broken"] = bad
    try:
        with pytest.raises(ValueError, match="past 8"):
            ss.drafter_config("broken")
    finally:
        del ss.SHAPES["broken"]


def test_pair_files_parse_with_vllm(tmp_path):
    pytest.importorskip("vllm")
    from vllm.transformers_utils.config import get_config

    root = ss.write_pair(tmp_path, "qwen3.5-27b")
    cfg = get_config(str(root / "target"), trust_remote_code=False)
    text = cfg.get_text_config()
    assert text.num_hidden_layers == 64 and text.linear_num_value_heads == 48


def test_break_even_ratios():
    rep = {"modes": {
        "target": {"steps": {"c1": {"ms_per_step_median": 10.0}}},
        "dflash": {"steps": {"c1": {"ms_per_step_median": 20.0}, "c4": {"ms_per_step_median": 30.0}}},
        "ddtree": {"steps": {"c1": {"ms_per_step_median": 25.0}, "c4": {"ms_per_step_median": 45.0}}},
    }}
    be = ss.break_even(rep)
    assert be == {"ddtree": {"c1": {"vs_dflash": 1.25, "vs_target": 2.5}, "c4": {"vs_dflash": 1.5}}}


def test_tokens_per_request_follows_the_config_default():
    ddtree_config = pytest.importorskip("vllm.config.ddtree")  # the overlay must be applied

    assert ss.tokens_per_request(None) == 1
    assert ss.tokens_per_request({"method": "dflash", "num_speculative_tokens": 15}) == 16
    assert ss.tokens_per_request({"method": "dflash_ddtree", "ddtree_budget": 16}) == 17
    assert ss.tokens_per_request({"method": "dflash_ddtree"}) == 1 + ddtree_config.DEFAULT_DDTREE_BUDGET
