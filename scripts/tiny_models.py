#!/usr/bin/env python3
"""Make the tiny models the tests and the demo run on: no downloads, seeded, a few seconds on CPU.

    python scripts/tiny_models.py --out build/tiny-models

Writes three folders:

* ``tokenizer/``  a byte-level BPE tokenizer trained offline on this Python's standard library.
* ``target/``     a Qwen3.5-shaped hybrid target (Gated DeltaNet + full-attention layers) in the
                  layout of real Qwen3.5 checkpoints: ``Qwen3_5ForConditionalGeneration`` with a tiny
                  vision config, language weights under ``model.language_model.*`` and ``lm_head``;
                  served with ``language_model_only=True``. bf16 throughout (vLLM's CPU GDN path
                  needs it); ``mamba_ssm_dtype`` float32 (CPUs without AMX need it).
* ``drafter/``    a DFlash drafter that vLLM 0.26's ``qwen3_dflash`` loads (``DFlashDraftModel``,
                  block size, mask token, target layer ids), one Qwen3 decoder layer shaped like the
                  target's full-attention layers, sharing the target's embedding and LM head.

Weights are random. The LM head is scaled so greedy decoding has clear margins at most positions;
bf16 still produces near-ties at some positions (see ../shared/reference/cpu-vllm.md), which the
tests' equality rule accounts for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

VOCAB_SIZE = 1024
MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, MASK_TOKEN, "<|im_start|>", "<|im_end|>"]
BLOCK_SIZE = 16
LM_HEAD_SCALE = 8.0

# Target: 4 layers, GDN, GDN, GDN, full attention (the 3:1 pattern of Qwen3.5/3.6), small dims.
TARGET_TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    mamba_ssm_dtype="float32",
)
DRAFT_TARGET_LAYER_IDS = [1, 3]


def _corpus_files(limit_bytes: int = 2_000_000) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(stdlib.glob("*.py")):
        files.append(str(p))
        total += p.stat().st_size
        if total > limit_bytes:
            break
    return files


def bpe_tokenizer_and_trainer(vocab_size: int = VOCAB_SIZE):
    """An empty byte-level BPE tokenizer and its trainer (our specials, full byte alphabet).

    Shared by this script and scripts/train_tiny_pair.py so both tokenizers have the same form."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    return tok, trainer


def save_tokenizer(tok, out: Path) -> None:
    """Save a trained tokenizer as a HF fast tokenizer with EOS/pad and a ChatML template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   unk_token=None)
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)


def make_tokenizer(out: Path) -> None:
    tok, trainer = bpe_tokenizer_and_trainer()
    tok.train(_corpus_files(), trainer)
    save_tokenizer(tok, out)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def make_target(out: Path, tok_dir: Path, seed: int) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)

    torch.manual_seed(seed)
    text_cfg = Qwen3_5TextConfig(vocab_size=VOCAB_SIZE, eos_token_id=eos_id, bos_token_id=eos_id,
                                 pad_token_id=eos_id, **TARGET_TEXT_CONFIG)
    model = Qwen3_5ForCausalLM(text_cfg).to(torch.bfloat16)
    state = {}
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    for name, t in model.state_dict().items():
        if name.startswith("model."):
            name = "model.language_model." + name[len("model."):]
        state[name] = t.contiguous().to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})

    text_dict = text_cfg.to_dict()
    for k in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        text_dict.pop(k, None)
    text_dict["model_type"] = "qwen3_5_text"
    text_dict["dtype"] = "bfloat16"
    config = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text_dict,
        # A minimal vision tower: never run (served with language_model_only=True), but the
        # multimodal config class needs one.
        "vision_config": {"model_type": "qwen3_5_vision", "depth": 1, "hidden_size": 32,
                          "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 128,
                          "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "in_channels": 3, "num_position_embeddings": 64},
        "image_token_id": VOCAB_SIZE - 1,
        "video_token_id": VOCAB_SIZE - 2,
        "vision_start_token_id": VOCAB_SIZE - 3,
        "vision_end_token_id": VOCAB_SIZE - 4,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "eos_token_id": eos_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}, indent=2) + "\n")
    _copy_tokenizer(tok_dir, out)
    return {"embed": state["model.language_model.embed_tokens.weight"], "lm_head": state["lm_head.weight"]}


def make_drafter(out: Path, tok_dir: Path, seed: int, shared: dict) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Model

    tok = AutoTokenizer.from_pretrained(tok_dir)
    mask_id = tok.convert_tokens_to_ids(MASK_TOKEN)
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    t = TARGET_TEXT_CONFIG
    torch.manual_seed(seed + 1)
    cfg = Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=t["hidden_size"],
                      intermediate_size=t["intermediate_size"], num_hidden_layers=1,
                      num_attention_heads=t["num_attention_heads"],
                      num_key_value_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
                      max_position_embeddings=t["max_position_embeddings"],
                      rms_norm_eps=t["rms_norm_eps"], tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    body = Qwen3Model(cfg).to(torch.bfloat16)
    state = {}
    for name, w in body.state_dict().items():
        if name.startswith("layers.") or name == "norm.weight":
            state[name] = w.contiguous()
    hidden = t["hidden_size"]
    n_aux = len(DRAFT_TARGET_LAYER_IDS)
    state["fc.weight"] = (torch.randn(hidden, hidden * n_aux) * 0.02).to(torch.bfloat16)
    state["hidden_norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    # Same embedding and LM head as the target: vLLM then shares the target's.
    state["embed_tokens.weight"] = shared["embed"].clone()
    state["lm_head.weight"] = shared["lm_head"].clone()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    d = cfg.to_dict()
    for k in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(k, None)
    d.update({
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "dtype": "bfloat16",
        "block_size": BLOCK_SIZE,
        "target_hidden_size": hidden,
        "num_target_layers": t["num_hidden_layers"],
        "dflash_config": {"mask_token_id": mask_id, "target_layer_ids": DRAFT_TARGET_LAYER_IDS},
        "eos_token_id": eos_id,
    })
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    _copy_tokenizer(tok_dir, out)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def make_all(out: Path, seed: int = 0, force: bool = False) -> Path:
    """Create the models under ``out`` unless they are already there for this generator version."""
    stamp = out / ".stamp"
    want = hashlib.sha256(Path(__file__).read_bytes() + str(seed).encode()).hexdigest()
    if not force and stamp.exists() and stamp.read_text() == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out / "tokenizer")
    shared = make_target(out / "target", out / "tokenizer", seed)
    make_drafter(out / "drafter", out / "tokenizer", seed, shared)
    stamp.write_text(want)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("build/tiny-models"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    make_all(args.out, args.seed, args.force)
    for sub in ("target", "drafter"):
        print(f"{args.out / sub}  sha256:{digest(args.out / sub)[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
