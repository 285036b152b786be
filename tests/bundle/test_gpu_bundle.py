"""The offline GPU bundle's pack / split / reassemble / verify round trip on small synthetic files,
and the wheel trimming, with no downloads."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

zstandard = pytest.importorskip("zstandard")

import gpu_bundle as gb  # noqa: E402  (tests/conftest.py puts scripts/ on sys.path)


def _files(tmp: Path) -> list[Path]:
    src = tmp / "src"
    src.mkdir()
    rnd = os.urandom(300_000)                  # incompressible: forces several parts
    text = b"def f(x):\n    return x + 1\n" * 20_000
    files = {"a-1.0-py3-none-any.whl": rnd, "b-2.0-py3-none-any.whl": text,
             "empty-0.1-py3-none-any.whl": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    return sorted(src.iterdir())


@pytest.fixture()
def bundle(tmp_path):
    files = _files(tmp_path)
    side = tmp_path / "zstandard-0.0-py3-none-any.whl"
    side.write_bytes(b"side file")
    out = tmp_path / "bundle"
    manifest = gb.pack(files, out, part_mb=0.1, level=3, side_files=[side])
    return out, files, manifest


def test_round_trip_restores_every_file_byte_for_byte(bundle, tmp_path):
    out, files, manifest = bundle
    assert len(manifest["parts"]) >= 3, "300 kB of random bytes must span several 100 kB parts"
    assert all(p["size"] <= 100_000 for p in manifest["parts"])
    assert sum(p["size"] for p in manifest["parts"]) == manifest["stream_size"]
    assert gb.verify(out) == []
    dest = tmp_path / "dest"
    got = gb.unpack(out, dest)
    assert sorted(p.name for p in got) == sorted(f.name for f in files)
    for f in files:
        assert (dest / f.name).read_bytes() == f.read_bytes()


def test_manifest_on_disk_matches_returned_manifest(bundle):
    out, _, manifest = bundle
    on_disk = json.loads((out / gb.MANIFEST).read_text())
    assert on_disk == manifest
    assert on_disk["format"] == gb.FORMAT
    assert [s["name"] for s in on_disk["side_files"]] == ["zstandard-0.0-py3-none-any.whl"]


def test_verify_names_a_missing_part(bundle):
    out, _, manifest = bundle
    (out / manifest["parts"][1]["name"]).unlink()
    problems = gb.verify(out)
    assert any(manifest["parts"][1]["name"] in p and "missing" in p for p in problems)
    with pytest.raises(gb.BundleError, match="missing"):
        gb.unpack(out, out.parent / "dest")


def test_verify_catches_a_flipped_byte_that_keeps_the_size(bundle, tmp_path):
    out, _, manifest = bundle
    part = out / manifest["parts"][0]["name"]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert gb.verify(out, quick=True) == []          # sizes alone cannot see it
    assert any("sha256" in p for p in gb.verify(out))
    with pytest.raises(gb.BundleError):
        gb.unpack(out, tmp_path / "dest")


def test_swapped_parts_are_rejected(bundle, tmp_path):
    out, _, manifest = bundle
    a, b = (out / manifest["parts"][i]["name"] for i in (0, 1))
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    assert gb.verify(out)                            # same sizes, wrong hashes
    with pytest.raises(gb.BundleError):
        gb.unpack(out, tmp_path / "dest")


def test_manifest_errors_name_the_problem(tmp_path):
    with pytest.raises(gb.BundleError, match="no manifest"):
        gb.verify(tmp_path)
    (tmp_path / gb.MANIFEST).write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(gb.BundleError, match="format"):
        gb.verify(tmp_path)


def test_bad_arguments_raise_value_errors(tmp_path):
    f = tmp_path / "x.whl"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="part_mb"):
        gb.pack([f], tmp_path / "o", part_mb=0)
    (tmp_path / "d").mkdir()
    g = tmp_path / "d" / "x.whl"
    g.write_bytes(b"y")
    with pytest.raises(ValueError, match="duplicate"):
        gb.pack([f, g], tmp_path / "o", part_mb=1)


def test_cli_verify_exit_codes(bundle):
    out, _, manifest = bundle
    assert gb.main(["verify", str(out)]) == 0
    (out / manifest["parts"][-1]["name"]).unlink()
    assert gb.main(["verify", str(out)]) == 1


def test_trim_drops_matching_entries_and_their_record_lines(tmp_path):
    src = tmp_path / "pkg-1.0-cp38-abi3-linux_x86_64.whl"
    entries = {"pkg/__init__.py": b"x = 1\n", "pkg/_big_fa2.so": b"\0" * 1000,
               "pkg/keep.so": b"\1" * 10}
    record = "".join(f"{n},sha256=abc,{len(d)}\n" for n, d in entries.items())
    record += "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in entries.items():
            z.writestr(n, d)
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    dst = tmp_path / "out.whl"
    dropped = gb.restore_stored(src, dst, [gb.TrimRule(r"_fa2\.so$", "test")])
    assert dropped == {"pkg/_big_fa2.so": 1000}
    with zipfile.ZipFile(dst) as z:
        names = z.namelist()
        rec = z.read("pkg-1.0.dist-info/RECORD").decode()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    assert "pkg/_big_fa2.so" not in names and "pkg/keep.so" in names
    assert "_big_fa2" not in rec and "pkg/keep.so" in rec


def test_vllm_trim_rules_match_only_what_they_mean():
    names = ["vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so",
             "vllm/vllm-rs", "vllm/third_party/fmha_sm100/x.hpp",
             "vllm/third_party/deep_gemm/_C.cpython-311-x86_64-linux-gnu.so",
             "vllm/third_party/deep_gemm/_C.cpython-312-x86_64-linux-gnu.so", "vllm/_C_stable_libtorch.abi3.so"]
    import re
    dropped = {n for n in names if any(re.search(r.pattern, n) for r in gb.TRIMS["vllm"])}
    assert dropped == {names[0], names[2], names[3], names[4]}
