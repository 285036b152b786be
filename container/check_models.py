"""Check the mounted models before vLLM starts, so a wrong mount fails in a second with a clear message.

    python check_models.py TARGET_DIR [--drafter DRAFTER_DIR] [--num-speculative-tokens N]

* TARGET_DIR must hold a config.json, and every file in the model folders must be readable by this
  user (the image runs as uid 10001: make the files world-readable, or run with --user).
* A drafter (DFlash profiles) must be a DFlash drafter that fits the target: architectures contains
  ``DFlashDraftModel``; the same vocab size; ``target_hidden_size`` (else ``hidden_size``) equal to the
  target's hidden size; every ``dflash_config.target_layer_ids`` entry a layer of the target;
  ``num_target_layers`` (when given) equal to the target's layer count; N (when given) at most
  ``block_size - 1``.

Exit status 0 when everything fits, 2 with one line per problem on stderr otherwise. Standard library
only: it runs in the image before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DRAFTER_ARCH = "DFlashDraftModel"


class ModelCheckError(ValueError):
    pass


def load_config(folder: Path, role: str) -> dict:
    if not folder.is_dir():
        raise ModelCheckError(f"{role} folder {folder} does not exist (mount it, e.g. -v /models:/models)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelCheckError(f"{role} folder {folder} has no config.json")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ModelCheckError(f"{role} {cfg} is not valid JSON: {e}") from None


def unreadable_files(folder: Path) -> list[str]:
    """Files (and sub-folders) under ``folder`` this process cannot read."""
    bad = []
    if not os.access(folder, os.R_OK | os.X_OK):
        return [str(folder)]
    for root, dirs, files in os.walk(folder):
        for name in files:
            if not os.access(os.path.join(root, name), os.R_OK):
                bad.append(os.path.join(root, name))
        for name in list(dirs):
            if not os.access(os.path.join(root, name), os.R_OK | os.X_OK):
                bad.append(os.path.join(root, name))
                dirs.remove(name)
    return bad


def check_readable(folder: Path, role: str) -> None:
    bad = unreadable_files(folder)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ModelCheckError(f"{role} files not readable as uid {os.getuid()}: {shown} "
                              f"(make them world-readable, e.g. chmod -R a+rX, or docker run --user)")


def text_config(cfg: dict) -> dict:
    """The language-model part of a config (multimodal configs nest it under text_config)."""
    return cfg.get("text_config") or cfg.get("language_config") or cfg


def target_shape(cfg: dict) -> dict:
    t = text_config(cfg)
    shape = {k: t.get(k, cfg.get(k)) for k in ("vocab_size", "hidden_size", "num_hidden_layers")}
    missing = [k for k, v in shape.items() if v is None]
    if missing:
        raise ModelCheckError(f"target config.json lacks {', '.join(missing)}")
    return shape


def check_drafter(target_cfg: dict, drafter_cfg: dict, drafter_dir: Path,
                  num_speculative_tokens: int | None = None) -> list[str]:
    """Problems that make the drafter unusable with the target (empty when it fits)."""
    problems = []
    archs = drafter_cfg.get("architectures") or []
    if DRAFTER_ARCH not in archs:
        return [f"drafter {drafter_dir} is not a DFlash drafter: architectures {archs}, "
                f"expected {DRAFTER_ARCH}"]
    tgt = target_shape(target_cfg)
    if drafter_cfg.get("vocab_size") != tgt["vocab_size"]:
        problems.append(f"drafter vocab_size {drafter_cfg.get('vocab_size')} != target vocab_size "
                        f"{tgt['vocab_size']}")
    d_hidden = drafter_cfg.get("target_hidden_size", drafter_cfg.get("hidden_size"))
    if d_hidden != tgt["hidden_size"]:
        problems.append(f"drafter target_hidden_size {d_hidden} != target hidden_size {tgt['hidden_size']}")
    n_layers = tgt["num_hidden_layers"]
    if "num_target_layers" in drafter_cfg and drafter_cfg["num_target_layers"] != n_layers:
        problems.append(f"drafter num_target_layers {drafter_cfg['num_target_layers']} != target "
                        f"num_hidden_layers {n_layers}")
    layer_ids = (drafter_cfg.get("dflash_config") or {}).get("target_layer_ids")
    if not isinstance(layer_ids, list) or not layer_ids:
        problems.append("drafter dflash_config.target_layer_ids is missing or empty")
    else:
        bad = [i for i in layer_ids if not isinstance(i, int) or not 0 <= i < n_layers]
        if bad:
            problems.append(f"drafter dflash_config.target_layer_ids {layer_ids}: {bad} not in "
                            f"0..{n_layers - 1} (target has {n_layers} layers)")
    block = drafter_cfg.get("block_size")
    if num_speculative_tokens is not None and isinstance(block, int) and num_speculative_tokens > block - 1:
        problems.append(f"NUM_SPECULATIVE_TOKENS {num_speculative_tokens} > drafter block_size - 1 "
                        f"({block - 1})")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", type=Path)
    ap.add_argument("--drafter", type=Path, default=None)
    ap.add_argument("--num-speculative-tokens", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        target_cfg = load_config(a.target, "target model")
        target_shape(target_cfg)
        check_readable(a.target, "target model")
        problems = []
        if a.drafter is not None:
            drafter_cfg = load_config(a.drafter, "drafter")
            problems = check_drafter(target_cfg, drafter_cfg, a.drafter, a.num_speculative_tokens)
            if not problems:
                check_readable(a.drafter, "drafter")
    except ModelCheckError as e:
        problems = [str(e)]
    for p in problems:
        print(f"ddtree-vllm: {p}", file=sys.stderr)
    if problems and a.drafter is not None and any(p.startswith("drafter") for p in problems):
        print(f"ddtree-vllm: drafter {a.drafter} does not match target {a.target}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
