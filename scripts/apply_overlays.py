#!/usr/bin/env python3
"""Apply, check or revert the ddtree-vllm overlays on a pinned vLLM 0.26.0 tree.

    python scripts/apply_overlays.py --tree DIR            # apply (idempotent)
    python scripts/apply_overlays.py --tree DIR --check    # report state, exit 1 on drift
    python scripts/apply_overlays.py --tree DIR --revert   # restore the pristine bytes

DIR is the folder that *contains* the ``vllm`` package: a vLLM source checkout, an extracted wheel, or
an installed ``site-packages``.

The series (``patches/series.toml``) is an ordered list of overlays of two kinds:

* ``copy``: a new module of ours, copied from ``patches/<copy>`` to ``DIR/<to>``. Every such module
  starts with the ``OWNED_HEADER`` line so a file of the same name that vLLM itself ships is never
  mistaken for ours (that is drift, not a stale copy).
* edit: a small insertion into an existing vLLM file at a named anchor. The anchor is one or more
  whole lines that must occur exactly once in the pristine file; ``where`` is ``before``, ``after``
  or ``replace``. The inserted text is fenced by marker comments naming the overlay; a replaced
  anchor is kept inside the fence as ``# |`` lines. So any applied file can be turned back into its
  pristine form from its own content, without the series, and a file is *drifted* exactly when that
  stripped form does not hash to the pristine sha256 recorded in ``patches/pristine.sha256``.

Everything is computed in memory first; any error (wrong vLLM version, missing or ambiguous anchor,
drifted file) stops the run before a single byte is written, with a message naming the overlay, the
file and the anchor. Applying twice writes nothing the second time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - python < 3.11
    sys.exit("apply_overlays.py needs Python >= 3.11 (tomllib)")

PINNED_VERSION = "0.26.0"
PATCHES_DIR = Path(__file__).resolve().parent.parent / "patches"
OWNED_HEADER = "# ddtree-vllm overlay module"
BEGIN = "# >>> ddtree-vllm:"
END = "# <<< ddtree-vllm:"
KEEP = "# |"

_BLOCK_RE = re.compile(
    r"^(?P<indent>[ \t]*)# >>> ddtree-vllm:(?P<name>[\w.-]+)(?P<replace> replace)?\n"
    r"(?P<body>.*?)"
    r"^[ \t]*# <<< ddtree-vllm:(?P=name)\n",
    re.MULTILINE | re.DOTALL,
)


class OverlayError(Exception):
    """A condition that stops the whole run before anything is written."""


@dataclasses.dataclass(frozen=True)
class Overlay:
    name: str
    kind: str  # "copy" or "edit"
    file: str  # path relative to the tree root (destination for copies)
    source: str | None = None  # copies: path under patches/
    anchor: str | None = None  # edits
    where: str | None = None  # edits: before | after | replace
    text: str | None = None  # edits

    def describe(self) -> str:
        if self.kind == "copy":
            return f"overlay '{self.name}' (copy -> {self.file})"
        first = (self.anchor or "").splitlines()[0] if self.anchor else ""
        return f"overlay '{self.name}' (file {self.file}, anchor {first!r})"


# --------------------------------------------------------------------------- series


def load_series(patches_dir: Path = PATCHES_DIR, check_hashes: bool = True
                ) -> tuple[list[Overlay], dict[str, str]]:
    series_path = patches_dir / "series.toml"
    data = tomllib.loads(series_path.read_text())
    version = data.get("vllm_version")
    if version != PINNED_VERSION:
        raise OverlayError(f"{series_path}: vllm_version is {version!r}, expected {PINNED_VERSION!r}")
    overlays: list[Overlay] = []
    seen: set[str] = set()
    for entry in data.get("overlay", []):
        name = entry.get("name")
        if not name or not re.fullmatch(r"[\w.-]+", name):
            raise OverlayError(f"{series_path}: overlay without a valid name: {entry!r}")
        if name in seen:
            raise OverlayError(f"{series_path}: overlay name '{name}' used twice")
        seen.add(name)
        if "copy" in entry:
            src = patches_dir / entry["copy"]
            if not src.is_file():
                raise OverlayError(f"overlay '{name}': source {src} does not exist")
            if not src.read_text().startswith(OWNED_HEADER):
                raise OverlayError(f"overlay '{name}': {src} must start with {OWNED_HEADER!r}")
            overlays.append(Overlay(name, "copy", entry["to"], source=entry["copy"]))
        else:
            for key in ("file", "anchor", "where", "text"):
                if key not in entry:
                    raise OverlayError(f"overlay '{name}': missing '{key}'")
            if entry["where"] not in ("before", "after", "replace"):
                raise OverlayError(f"overlay '{name}': where must be before/after/replace")
            anchor = entry["anchor"]
            if not anchor.endswith("\n"):
                anchor += "\n"
            text = entry["text"]
            if not text.endswith("\n"):
                text += "\n"
            overlays.append(Overlay(name, "edit", entry["file"], anchor=anchor,
                                    where=entry["where"], text=text))
    pristine = load_pristine(patches_dir)
    for ov in overlays:
        if check_hashes and ov.kind == "edit" and ov.file not in pristine:
            raise OverlayError(f"{ov.describe()}: no pristine sha256 recorded for {ov.file} "
                               f"in patches/pristine.sha256")
    return overlays, pristine


def load_pristine(patches_dir: Path = PATCHES_DIR) -> dict[str, str]:
    path = patches_dir / "pristine.sha256"
    table: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                digest, rel = line.split(None, 1)
                table[rel.strip()] = digest
    return table


# --------------------------------------------------------------------------- text transforms


def sha256(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


def strip_blocks(content: str) -> tuple[str, list[str]]:
    """Return (pristine form of ``content``, names of the overlay blocks found in it)."""
    names: list[str] = []

    def restore(m: re.Match) -> str:
        names.append(m.group("name"))
        if not m.group("replace"):
            return ""
        kept = []
        for line in m.group("body").splitlines(keepends=True):
            stripped = line.lstrip(" \t")
            if stripped.startswith(KEEP):
                kept.append(stripped[len(KEEP):])
        return "".join(kept)

    # Blocks never nest, but an inserted block may sit right next to another; loop until stable.
    previous = None
    while previous != content:
        previous = content
        content = _BLOCK_RE.sub(restore, content)
    return content, names


def _find_anchor(content: str, ov: Overlay) -> int:
    """Offset of the unique whole-line occurrence of the anchor."""
    hits = [m.start() for m in re.finditer(re.escape(ov.anchor), content)
            if m.start() == 0 or content[m.start() - 1] == "\n"]
    if not hits:
        raise OverlayError(f"{ov.describe()}: anchor not found")
    if len(hits) > 1:
        raise OverlayError(f"{ov.describe()}: anchor is ambiguous ({len(hits)} matches)")
    return hits[0]


def apply_edit(content: str, ov: Overlay) -> str:
    pos = _find_anchor(content, ov)
    anchor = ov.anchor
    # Fence at the indentation of the inserted code (comments do not affect Python's indentation,
    # this is for the reader).
    first = next((ln for ln in ov.text.splitlines() if ln.strip()), anchor)
    indent = re.match(r"[ \t]*", first).group(0)
    if ov.where == "replace":
        kept = "".join(f"{indent}{KEEP}{line}" for line in anchor.splitlines(keepends=True))
        block = f"{indent}{BEGIN}{ov.name} replace\n{kept}{ov.text}{indent}{END}{ov.name}\n"
        return content[:pos] + block + content[pos + len(anchor):]
    block = f"{indent}{BEGIN}{ov.name}\n{ov.text}{indent}{END}{ov.name}\n"
    if ov.where == "before":
        return content[:pos] + block + content[pos:]
    end = pos + len(anchor)
    return content[:end] + block + content[end:]


# --------------------------------------------------------------------------- tree handling


@dataclasses.dataclass
class Plan:
    """What the tree should look like after the run, and the state of each overlay now."""
    writes: dict[Path, str]  # path -> new content (only where it changes)
    deletes: list[Path]
    states: list[tuple[Overlay, str, str]]  # (overlay, state, detail)

    @property
    def drifted(self) -> list[tuple[Overlay, str, str]]:
        return [s for s in self.states if s[1] == "drifted"]


def tree_version(tree: Path) -> str | None:
    vfile = tree / "vllm" / "_version.py"
    if not vfile.exists():
        return None
    m = re.search(r"__version__\s*=\s*version\s*=\s*['\"]([^'\"]+)['\"]", vfile.read_text())
    return m.group(1) if m else None


def check_tree(tree: Path, pristine: dict[str, str], overlays: list[Overlay]) -> str:
    if not (tree / "vllm" / "__init__.py").is_file():
        raise OverlayError(f"{tree} does not contain a vllm package (expected {tree}/vllm/__init__.py)")
    version = tree_version(tree)
    if version is not None and version.split("+")[0] != PINNED_VERSION:
        raise OverlayError(f"{tree}/vllm/_version.py says vLLM {version}; these overlays are for "
                           f"{PINNED_VERSION} only")
    return version or "unknown (source tree; verified by the pristine hashes)"


def plan(tree: Path, overlays: list[Overlay], pristine: dict[str, str], revert: bool = False) -> Plan:
    writes: dict[Path, str] = {}
    deletes: list[Path] = []
    states: list[tuple[Overlay, str, str]] = []
    by_file: dict[str, list[Overlay]] = {}
    for ov in overlays:
        if ov.kind == "edit":
            by_file.setdefault(ov.file, []).append(ov)

    for rel, file_overlays in by_file.items():
        path = tree / rel
        if not path.is_file():
            for ov in file_overlays:
                states.append((ov, "drifted", f"{rel} does not exist"))
            continue
        current = path.read_text()
        base, present = strip_blocks(current)
        if sha256(base) != pristine[rel]:
            for ov in file_overlays:
                states.append((ov, "drifted",
                               f"{rel} differs from the pristine vLLM {PINNED_VERSION} file "
                               f"(sha256 {sha256(base)[:12]}, expected {pristine[rel][:12]})"))
            continue
        target = base
        for ov in file_overlays:
            if not revert:
                try:
                    target = apply_edit(target, ov)
                except OverlayError as e:
                    states.append((ov, "drifted", str(e)))
                    continue
            states.append((ov, "applied" if ov.name in present else "pending", ""))
        if target != current:
            writes[path] = target

    for ov in overlays:
        if ov.kind != "copy":
            continue
        dest = tree / ov.file
        want = (PATCHES_DIR / ov.source).read_text()
        if dest.exists():
            have = dest.read_text()
            if not have.startswith(OWNED_HEADER):
                states.append((ov, "drifted", f"{ov.file} exists and is not ours (vLLM ships a file there)"))
                continue
            if revert:
                deletes.append(dest)
                states.append((ov, "applied", ""))
            elif have == want:
                states.append((ov, "applied", ""))
            else:
                writes[dest] = want
                states.append((ov, "pending", "stale copy of an older overlay"))
        else:
            if not revert:
                writes[dest] = want
            states.append((ov, "pending", ""))
    order = {ov.name: i for i, ov in enumerate(overlays)}
    states.sort(key=lambda s: order[s[0].name])
    return Plan(writes, deletes, states)


def _atomic_write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def run(tree: Path, mode: str, require_applied: bool = False, out=sys.stdout) -> int:
    overlays, pristine = load_series()
    version = check_tree(tree, pristine, overlays)
    p = plan(tree, overlays, pristine, revert=(mode == "revert"))
    if mode == "check":
        for ov, state, detail in p.states:
            print(f"{state:8s} {ov.name}  [{ov.file}]" + (f"  -- {detail}" if detail else ""), file=out)
        if p.drifted:
            print(f"DRIFT: {len(p.drifted)} overlay(s) cannot apply to {tree} (vLLM {version})", file=out)
            return 1
        if require_applied and any(s != "applied" for _, s, _ in p.states):
            print("NOT APPLIED: some overlays are pending", file=out)
            return 3
        return 0
    if p.drifted:
        lines = [f"  {ov.describe()}: {detail}" for ov, _, detail in p.drifted]
        raise OverlayError("nothing written; drift found:\n" + "\n".join(lines))
    for path, content in p.writes.items():
        _atomic_write(path, content)
    for path in p.deletes:
        path.unlink()
    verb = "reverted" if mode == "revert" else "applied"
    changed = len(p.writes) + len(p.deletes)
    print(f"{verb} {len(overlays)} overlays to {tree} (vLLM {version}): "
          f"{changed} file(s) changed", file=out)
    return 0


def record_pristine(tree: Path) -> None:
    """Developer helper: record the sha256 of every file the series edits, from a pristine tree."""
    overlays, _ = load_series(check_hashes=False)
    files = sorted({ov.file for ov in overlays if ov.kind == "edit"})
    lines = [f"# sha256 of the pristine vLLM {PINNED_VERSION} files the overlays edit",
             "# (scripts/apply_overlays.py --record-pristine --tree <pristine tree>)"]
    for rel in files:
        content = (tree / rel).read_text()
        base, names = strip_blocks(content)
        if names:
            raise OverlayError(f"{rel} in {tree} already carries overlays {names}; use a pristine tree")
        lines.append(f"{sha256(base)}  {rel}")
    (PATCHES_DIR / "pristine.sha256").write_text("\n".join(lines) + "\n")
    print(f"recorded {len(files)} pristine hashes")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", required=True, type=Path,
                    help="folder containing the vllm package (source tree, extracted wheel, site-packages)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report applied/pending/drifted; exit 1 on drift")
    mode.add_argument("--revert", action="store_true", help="restore the pristine vLLM files")
    mode.add_argument("--record-pristine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--require-applied", action="store_true",
                    help="with --check: also exit non-zero (3) if any overlay is pending")
    args = ap.parse_args(argv)
    tree = args.tree.resolve()
    try:
        if args.record_pristine:
            record_pristine(tree)
            return 0
        m = "check" if args.check else "revert" if args.revert else "apply"
        return run(tree, m, require_applied=args.require_applied)
    except OverlayError as e:
        print(f"apply_overlays: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
