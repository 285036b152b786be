"""Deterministic prompts (token ids) cut from this Python's standard library sources."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_text(max_chars: int = 200_000) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for name in ("textwrap.py", "heapq.py", "bisect.py", "fractions.py", "statistics.py", "shlex.py"):
        p = stdlib / name
        if p.exists():
            t = p.read_text(errors="replace")
            chunks.append(t)
            total += len(t)
        if total > max_chars:
            break
    return "\n".join(chunks)


def token_prompts(tokenizer_dir: Path, lengths: list[int]) -> list[list[int]]:
    """One prompt per requested length, each from a different offset of the corpus."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(tokenizer_dir) / "tokenizer.json"))
    ids = tok(stdlib_text())["input_ids"]
    prompts, offset = [], 0
    for n in lengths:
        if offset + n > len(ids):
            offset = 0
        prompts.append(ids[offset:offset + n])
        offset += n + 37
    return prompts
