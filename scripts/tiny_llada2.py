#!/usr/bin/env python3
"""Make a tiny random LLaDA2.0 checkpoint (HF layout, ``LLaDA2MoeModelLM``) for CPU tests.

    python scripts/tiny_llada2.py --out build/tiny-llada2

Same shape family as LLaDA2.0-mini (layer 0 dense, the rest MoE with sigmoid router, expert bias,
group-limited top-k, one shared expert, fused QKV with QK RMSNorm, partial RoPE on half the head),
only small. float32 weights so the vLLM CPU path and the plain-torch reference agree to float32
round-off. The LM head is scaled so argmax probabilities are peaked: at threshold 0.95 some positions
pass and others do not, which exercises both unmasking branches. The tokenizer is the project's
tiny byte-level BPE (scripts/tiny_models.py) with ``<|mask|>`` as the mask token.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LM_HEAD_SCALE = 16.0
CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    moe_intermediate_size=32,
    num_shared_experts=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    partial_rotary_factor=0.5,
    rope_theta=600000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
)


def make_weights(cfg: dict, vocab: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.05):
        return (torch.randn(*shape, generator=g) * std).float()

    H, KV, D, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["hidden_size"]
    w = {"model.word_embeddings.weight": rnd(vocab, h, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = 1.0 + rnd(h, std=0.1)
        w[f"{p}.post_attention_layernorm.weight"] = 1.0 + rnd(h, std=0.1)
        w[f"{p}.attention.query_key_value.weight"] = rnd((H + 2 * KV) * D, h, std=0.15)
        w[f"{p}.attention.query_layernorm.weight"] = 1.0 + rnd(D, std=0.1)
        w[f"{p}.attention.key_layernorm.weight"] = 1.0 + rnd(D, std=0.1)
        w[f"{p}.attention.dense.weight"] = rnd(h, H * D, std=0.1)
        if i < cfg["first_k_dense_replace"]:
            I = cfg["intermediate_size"]
            w[f"{p}.mlp.gate_proj.weight"] = rnd(I, h, std=0.1)
            w[f"{p}.mlp.up_proj.weight"] = rnd(I, h, std=0.1)
            w[f"{p}.mlp.down_proj.weight"] = rnd(h, I, std=0.1)
            continue
        E, I = cfg["num_experts"], cfg["moe_intermediate_size"]
        w[f"{p}.mlp.gate.weight"] = rnd(E, h, std=0.3)
        # A real bias: it must change which experts are picked but never their weights.
        w[f"{p}.mlp.gate.expert_bias"] = rnd(E, std=0.2)
        for e in range(E):
            w[f"{p}.mlp.experts.{e}.gate_proj.weight"] = rnd(I, h, std=0.1)
            w[f"{p}.mlp.experts.{e}.up_proj.weight"] = rnd(I, h, std=0.1)
            w[f"{p}.mlp.experts.{e}.down_proj.weight"] = rnd(h, I, std=0.1)
        Is = I * cfg["num_shared_experts"]
        w[f"{p}.mlp.shared_experts.gate_proj.weight"] = rnd(Is, h, std=0.1)
        w[f"{p}.mlp.shared_experts.up_proj.weight"] = rnd(Is, h, std=0.1)
        w[f"{p}.mlp.shared_experts.down_proj.weight"] = rnd(h, Is, std=0.1)
    w["model.norm.weight"] = 1.0 + rnd(h, std=0.1)
    w["lm_head.weight"] = rnd(vocab, h, std=1.0) * (LM_HEAD_SCALE / h ** 0.5)
    return w


def make_checkpoint(out: Path, seed: int = 0, overrides: dict | None = None) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    import tiny_models as tm

    tok_dir = out.parent / (out.name + "-tokenizer")
    tm.make_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = tm.VOCAB_SIZE
    mask_id = tok.convert_tokens_to_ids(tm.MASK_TOKEN)
    eos_id = tok.convert_tokens_to_ids(tm.EOS_TOKEN)
    out.mkdir(parents=True, exist_ok=True)
    shape = dict(CONFIG, **(overrides or {}))
    save_file({k: v.contiguous() for k, v in make_weights(shape, vocab, seed).items()},
              out / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "vocab_size": vocab,
        "hidden_act": "silu",
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "use_rmsnorm": True,
        "tie_word_embeddings": False,
        "score_function": "sigmoid",
        "router_dtype": "fp32",
        "moe_router_enable_expert_bias": True,
        "mask_token_id": mask_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": "float32",
        "dtype": "float32",
        **shape,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos_id, "pad_token_id": eos_id}, indent=2) + "\n")
    for f in tok_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def make(out: Path, seed: int = 0, force: bool = False, overrides: dict | None = None) -> Path:
    """Create the checkpoint under ``out`` unless it is already there for this generator version.

    ``overrides`` change CONFIG entries (e.g. ``{"head_dim": 64}`` for a GPU attention kernel
    that wants a common head size)."""
    stamp = out / ".stamp"
    here = Path(__file__).resolve().parent
    want = hashlib.sha256(Path(__file__).read_bytes() + (here / "tiny_models.py").read_bytes()
                          + str(seed).encode()
                          + json.dumps(overrides or {}, sort_keys=True).encode()).hexdigest()
    if not force and stamp.exists() and stamp.read_text() == want:
        return out
    make_checkpoint(out, seed, overrides)
    stamp.write_text(want)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("build/tiny-llada2"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    print(make(a.out, a.seed, a.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
