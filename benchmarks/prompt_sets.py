#!/usr/bin/env python3
"""Benchmark prompts in three categories, built from text every machine has (this Python's stdlib).

    python benchmarks/prompt_sets.py --out build/bench-prompts [--per-category 256] [--max-chars 800]

Writes ``code.jsonl``, ``prose.jsonl`` and ``docmath.jsonl``: ``vllm bench serve --dataset-name custom``
files (one ``{"prompt": ...}`` per line). Selection is seeded and sorted, so two machines with the
same Python version build the same files; the benchmark JSON records each file's sha256.

* code    -- the head of a function or class from the stdlib's pure-Python modules, cut inside its
             body, so the model continues code.
* prose   -- paragraphs of the language reference shipped as ``pydoc_data.topics`` (English prose).
* docmath -- docstrings of the numeric modules (statistics, fractions, decimal, random, ...): formulas,
             doctest examples with numbers, argument descriptions.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import sysconfig
from pathlib import Path

CATEGORIES = ("code", "prose", "docmath")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# numeric / formula-heavy modules for the docstring-math category
DOCMATH_MODULES = ["statistics.py", "fractions.py", "_pydecimal.py", "random.py", "colorsys.py",
                   "heapq.py", "bisect.py", "datetime.py", "_pydatetime.py", "calendar.py",
                   "numbers.py", "cmath", "math", "timeit.py", "difflib.py"]


def _stdlib_sources() -> list[Path]:
    skip = ("test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
            "__pycache__", "ensurepip", "tkinter", "config-")
    out = []
    for p in sorted(STDLIB.rglob("*.py")):
        rel = p.relative_to(STDLIB).parts
        if any(part.startswith(skip) for part in rel):
            continue
        out.append(p)
    return out


def code_prompts(max_chars: int) -> list[str]:
    prompts = []
    for path in _stdlib_sources():
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                continue
            body = "".join(lines[node.lineno - 1:node.end_lineno])
            if len(body) < 300:
                continue
            # cut at a line break between 40% and 70% of the budget: the model continues the body
            cut = body.rfind("\n", 0, min(len(body), int(max_chars * 0.7)))
            if cut < int(max_chars * 0.4):
                continue
            prompts.append(body[:cut + 1])
    return prompts


def prose_prompts(max_chars: int) -> list[str]:
    import pydoc_data.topics as topics
    prompts = []
    for key in sorted(topics.topics):
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", topics.topics[key])]
        # prose paragraphs only: several sentences, few code characters
        for p in paragraphs:
            flat = " ".join(p.split())
            if len(flat) < 250 or flat.count(". ") < 2 or sum(c in "{}[]()=<>" for c in flat) > 12:
                continue
            prompts.append(flat[:max_chars].rsplit(" ", 1)[0])
    return prompts


def docmath_prompts(max_chars: int) -> list[str]:
    prompts = []
    for name in DOCMATH_MODULES:
        path = STDLIB / name
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef, ast.Module)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < 200 or sum(c.isdigit() for c in doc) < 5:
                continue
            head = "" if isinstance(node, ast.Module) else f"def {node.name}(...):\n" if not isinstance(
                node, ast.ClassDef) else f"class {node.name}:\n"
            text = head + '    """' + doc.replace("\n", "\n    ")
            cut = text.rfind("\n", 0, max_chars)
            prompts.append(text[:cut + 1] if cut > max_chars // 3 else text[:max_chars])
    return prompts


BUILDERS = {"code": code_prompts, "prose": prose_prompts, "docmath": docmath_prompts}


def build(out_dir: Path, per_category: int = 256, max_chars: int = 800, seed: int = 0,
          categories=CATEGORIES) -> dict[str, dict]:
    """Write one JSONL per category; returns {category: {path, count, sha256}}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for cat in categories:
        if cat not in BUILDERS:
            raise ValueError(f"categories: unknown category {cat!r} (known: {', '.join(CATEGORIES)})")
        prompts = sorted(set(BUILDERS[cat](max_chars)))
        if not prompts:
            raise RuntimeError(f"no {cat} prompts found under {STDLIB}")
        random.Random(f"{seed}:{cat}").shuffle(prompts)
        prompts = prompts[:per_category]
        path = out_dir / f"{cat}.jsonl"
        data = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
        path.write_text(data)
        info[cat] = {"path": str(path), "count": len(prompts),
                     "sha256": hashlib.sha256(data.encode()).hexdigest()}
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("build/bench-prompts"))
    ap.add_argument("--per-category", type=int, default=256)
    ap.add_argument("--max-chars", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for cat, i in build(args.out, args.per_category, args.max_chars, args.seed).items():
        print(f"{cat:8s} {i['count']:4d} prompts  {i['path']}")


if __name__ == "__main__":
    main()
