"""The overlay engine on a real pristine vLLM 0.26.0 tree (build/vllm-tree, from `make vllm-tree`)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRISTINE = REPO / "build" / "vllm-tree"
sys.path.insert(0, str(REPO / "scripts"))
import apply_overlays as ao  # noqa: E402


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pristine_tree() -> Path:
    if not (PRISTINE / "vllm" / "_version.py").exists():
        subprocess.run([str(REPO / "scripts" / "make_vllm_tree.sh")], check=True)
    return PRISTINE


@pytest.fixture
def tree(tmp_path, pristine_tree) -> Path:
    """A small copy of the pristine tree: the package marker, the version and every file we edit."""
    overlays, _ = ao.load_series()
    files = {"vllm/__init__.py", "vllm/_version.py"} | {o.file for o in overlays if o.kind == "edit"}
    for rel in files:
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pristine_tree / rel, dst)
    # every directory a copied module lands in exists in vLLM already
    for o in overlays:
        (tmp_path / o.file).parent.mkdir(parents=True, exist_ok=True)
    return tmp_path


def run(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "apply_overlays.py"), "--tree",
                           str(tree), *args], capture_output=True, text=True)


def test_series_hashes_match_the_pristine_tree(pristine_tree):
    overlays, pristine = ao.load_series()
    for o in overlays:
        if o.kind == "edit":
            data = (pristine_tree / o.file).read_text()
            assert ao.sha256(data) == pristine[o.file], o.file


def test_apply_twice_is_a_noop(tree):
    before = _snapshot(tree)
    r1 = run(tree)
    assert r1.returncode == 0, r1.stderr
    after1 = _snapshot(tree)
    assert after1 != before
    r2 = run(tree)
    assert r2.returncode == 0, r2.stderr
    assert "0 file(s) changed" in r2.stdout
    assert _snapshot(tree) == after1
    # mtimes too: the second run must not rewrite files
    check = run(tree, "--check", "--require-applied")
    assert check.returncode == 0, check.stdout
    assert all(line.startswith("applied") for line in check.stdout.splitlines())


def test_check_reports_pending_on_a_pristine_tree(tree):
    before = _snapshot(tree)
    r = run(tree, "--check")
    assert r.returncode == 0
    assert all(line.startswith("pending") for line in r.stdout.splitlines())
    assert run(tree, "--check", "--require-applied").returncode == 3
    assert _snapshot(tree) == before, "--check must not write"


def test_revert_restores_pristine_bytes(tree):
    before = _snapshot(tree)
    assert run(tree).returncode == 0
    r = run(tree, "--revert")
    assert r.returncode == 0, r.stderr
    assert _snapshot(tree) == before


def test_corrupted_anchor_names_overlay_file_and_anchor_and_writes_nothing(tree):
    overlays, _ = ao.load_series()
    victim = next(o for o in overlays if o.kind == "edit")
    path = tree / victim.file
    first_anchor_line = victim.anchor.splitlines()[0]
    path.write_text(path.read_text().replace(first_anchor_line, first_anchor_line + "  # changed", 1))
    before = _snapshot(tree)
    r = run(tree)
    assert r.returncode != 0
    assert victim.file in r.stderr
    # the drifted file is reported; with a file hash mismatch every overlay on it is named
    assert victim.name in r.stderr
    assert _snapshot(tree) == before, "nothing may be written when any overlay cannot apply"
    c = run(tree, "--check")
    assert c.returncode == 1 and "drifted" in c.stdout


def test_missing_anchor_in_an_otherwise_pristine_file_is_named(tree, monkeypatch, capsys):
    overlays, pristine = ao.load_series()
    victim = next(o for o in overlays if o.kind == "edit")
    broken = [ao.Overlay(o.name, o.kind, o.file, o.source, "no such line in vLLM\n", o.where, o.text)
              if o is victim else o for o in overlays]
    monkeypatch.setattr(ao, "load_series", lambda *a, **k: (broken, pristine))
    before = _snapshot(tree)
    assert ao.main(["--tree", str(tree)]) == 2
    err = capsys.readouterr().err
    assert f"overlay '{victim.name}'" in err and victim.file in err
    assert "no such line in vLLM" in err and "anchor not found" in err
    assert _snapshot(tree) == before


def test_wrong_vllm_version_is_refused(tree):
    vf = tree / "vllm" / "_version.py"
    vf.write_text(vf.read_text().replace("'0.26.0'", "'0.27.0'"))
    before = _snapshot(tree)
    r = run(tree)
    assert r.returncode == 2 and "0.27.0" in r.stderr and "0.26.0" in r.stderr
    assert _snapshot(tree) == before


def test_foreign_file_at_a_copy_destination_is_drift(tree):
    overlays, _ = ao.load_series()
    copy = next(o for o in overlays if o.kind == "copy")
    (tree / copy.file).write_text("# a vLLM file of the same name\n")
    r = run(tree)
    assert r.returncode == 2 and copy.file in r.stderr and copy.name in r.stderr


def test_stale_copy_is_updated(tree):
    assert run(tree).returncode == 0
    overlays, _ = ao.load_series()
    copy = next(o for o in overlays if o.kind == "copy")
    dest = tree / copy.file
    dest.write_text(dest.read_text() + "# older version\n")
    assert "pending" in run(tree, "--check").stdout
    assert run(tree).returncode == 0
    assert dest.read_text() == (REPO / "patches" / copy.source).read_text()


def test_applied_tree_imports_and_compiles(tree):
    assert run(tree).returncode == 0
    for p in tree.rglob("*.py"):
        compile(p.read_text(), str(p), "exec")
