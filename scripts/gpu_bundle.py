#!/usr/bin/env python3
"""The offline GPU bundle: the pinned vLLM, FlashInfer and what a GPU host lacks, in a few parts.

GPU hosts in labs are often air-gapped. This packs the wheels such a host needs (the pinned
``vllm==0.26.0`` wheel trimmed of what one Hopper/Blackwell host does not load, ``flashinfer-python``
at vLLM's pin, and the requirements the GPU image lacks) into one tar stream, compresses it with zstd
(the python ``zstandard`` module, which travels beside the parts as a wheel) and splits it into parts
of at most N MB, with a manifest of checksums.

    python scripts/gpu_bundle.py build  --out build/gpu-bundle [--part-mb 60] [--wheels build/wheels]
    python scripts/gpu_bundle.py verify build/gpu-bundle          # parts against the manifest
    python scripts/gpu_bundle.py unpack build/gpu-bundle --dest /tmp/wheels

``scripts/gpu_bundle_install.sh`` reassembles and installs a bundle on the GPU host.

Layout of a bundle folder::

    manifest.json                    format, parts (name, size, sha256), stream size/sha256, members
    bundle.tar.zst.000 ... .NNN      the zstd-compressed tar, split at --part-mb MB
    zstandard-*.whl                  the decompressor, uncompressed, for hosts without zstd

``verify`` and ``unpack`` need only the standard library plus ``zstandard`` (unpack), so this file
runs on the GPU host as is.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORMAT = "ddtree-vllm-gpu-bundle/1"
STREAM_NAME = "bundle.tar.zst"
MANIFEST = "manifest.json"
MB = 1_000_000
CHUNK = 1 << 20

VLLM_PIN = "vllm==0.26.0"
FLASHINFER_PIN = "flashinfer-python==0.6.14"
ZSTANDARD_PIN = "zstandard==0.25.0"
#: the wheels the GPU image lacks (vLLM's and FlashInfer's requirements minus the image's packages)
REQUIREMENTS_FILE = REPO / "requirements" / "gpu-bundle.txt"

#: manylinux tags a python 3.12 x86_64 host with glibc >= 2.35 accepts (pip matches N exactly)
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64"]


@dataclass(frozen=True)
class TrimRule:
    pattern: str   # regex on the path inside the wheel
    why: str


#: What one Hopper (sm90) / Blackwell host running Python 3.12 never loads from the vLLM wheel.
#: Each rule was checked against vLLM 0.26.0's sources (the loader of each file) and the H100 run in
#: benchmarks/results/h100/ served with the trimmed wheel.
VLLM_TRIM = [
    TrimRule(r"^vllm/vllm_flash_attn/_vllm_fa2_C\.abi3\.so$",
             "FlashAttention-2 (305 MB): flash_attn_interface imports it in a try block; Hopper "
             "selects FA3, Blackwell selects FlashInfer/FA4; FA2 is the Ampere/Ada path"),
    TrimRule(r"^vllm/vllm-rs$",
             "the Rust frontend binary (43 MB): used only with VLLM_USE_RUST_FRONTEND=1"),
    TrimRule(r"^vllm/third_party/fmha_sm100/",
             "SM100 sparse FMHA sources (30 MB): imported lazily by the MiniMax-M3 model only"),
    TrimRule(r"^vllm/third_party/deep_gemm/_C\.cpython-3(10|11|13|14)-",
             "DeepGEMM extensions for other Python versions (the host runs 3.12)"),
]

#: Per distribution: files no `vllm serve` process loads.
TRIMS = {
    "vllm": VLLM_TRIM,
    "xgrammar": [TrimRule(r"^xgrammar/lib/.*\.a$",
                          "the static C++ library (65 MB) for linking against xgrammar; Python loads "
                          "libxgrammar_bindings.so")],
}


# ------------------------------------------------------------------------------------ small helpers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def part_name(index: int) -> str:
    return f"{STREAM_NAME}.{index:03d}"


class BundleError(RuntimeError):
    """A bundle that is incomplete, corrupt or malformed (the message names the file)."""


# ---------------------------------------------------------------------------------- split and join

class PartWriter(io.RawIOBase):
    """A write-only file that spreads what it is given over parts of at most ``part_bytes`` each."""

    def __init__(self, out_dir: Path, part_bytes: int):
        if part_bytes <= 0:
            raise ValueError(f"part_bytes: must be positive, got {part_bytes}")
        self.out_dir = Path(out_dir)
        self.part_bytes = part_bytes
        self.parts: list[dict] = []
        self._f = None
        self._h = None
        self._n = 0
        self.stream_hash = hashlib.sha256()
        self.stream_size = 0

    def writable(self) -> bool:
        return True

    def _open_next(self) -> None:
        self._close_current()
        name = part_name(len(self.parts))
        self._f = open(self.out_dir / name, "wb")
        self._h = hashlib.sha256()
        self._n = 0
        self.parts.append({"name": name})

    def _close_current(self) -> None:
        if self._f is not None:
            self._f.close()
            self.parts[-1].update(size=self._n, sha256=self._h.hexdigest())
            self._f = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.stream_hash.update(view)
        self.stream_size += len(view)
        done = 0
        while done < len(view):
            if self._f is None or self._n == self.part_bytes:
                self._open_next()
            take = min(self.part_bytes - self._n, len(view) - done)
            piece = view[done:done + take]
            self._f.write(piece)
            self._h.update(piece)
            self._n += take
            done += take
        return len(view)

    def close(self) -> None:
        if not self.closed:
            if not self.parts:          # an empty stream still gets one (empty) part
                self._open_next()
            self._close_current()
        super().close()


class PartReader(io.RawIOBase):
    """Reads the parts listed in a manifest back as one stream, checking each part's sha256."""

    def __init__(self, bundle_dir: Path, parts: list[dict]):
        self.bundle_dir = Path(bundle_dir)
        self.parts = parts
        self._i = -1
        self._f = None
        self._h = None
        self._n = 0
        self.stream_hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def _finish_part(self) -> None:
        part = self.parts[self._i]
        self._f.close()
        self._f = None
        if self._n != part["size"] or self._h.hexdigest() != part["sha256"]:
            raise BundleError(f"{part['name']}: checksum or size mismatch while reading "
                              f"(read {self._n} bytes, manifest says {part['size']})")

    def readinto(self, buf) -> int:
        while True:
            if self._f is None:
                if self._i + 1 >= len(self.parts):
                    return 0
                self._i += 1
                path = self.bundle_dir / self.parts[self._i]["name"]
                if not path.is_file():
                    raise BundleError(f"{path.name}: part missing from {self.bundle_dir}")
                self._f = open(path, "rb")
                self._h = hashlib.sha256()
                self._n = 0
            n = self._f.readinto(buf)
            if n:
                piece = memoryview(buf)[:n]
                self._h.update(piece)
                self.stream_hash.update(piece)
                self._n += n
                return n
            self._finish_part()


def load_manifest(bundle_dir: Path) -> dict:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: no manifest (is this a bundle folder?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("parts", "stream_sha256", "stream_size", "members"):
        if key not in manifest:
            raise BundleError(f"{path}: field {key!r} missing")
    return manifest


def verify(bundle_dir: Path, quick: bool = False) -> list[str]:
    """Problems with the parts on disk (missing, wrong size, wrong sha256); empty when all is well.

    ``quick`` checks presence and sizes only (for a partly transferred bundle)."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    problems = []
    total = 0
    for part in manifest["parts"]:
        path = bundle_dir / part["name"]
        if not path.is_file():
            problems.append(f"{part['name']}: missing")
            continue
        size = path.stat().st_size
        total += size
        if size != part["size"]:
            problems.append(f"{part['name']}: size {size}, manifest says {part['size']}")
        elif not quick and sha256_file(path) != part["sha256"]:
            problems.append(f"{part['name']}: sha256 mismatch")
    if not problems and total != manifest["stream_size"]:
        problems.append(f"parts add up to {total} bytes, manifest says {manifest['stream_size']}")
    for extra in manifest.get("side_files", []):
        path = bundle_dir / extra["name"]
        if not path.is_file():
            problems.append(f"{extra['name']}: missing")
        elif not quick and sha256_file(path) != extra["sha256"]:
            problems.append(f"{extra['name']}: sha256 mismatch")
    return problems


# -------------------------------------------------------------------------------- pack and unpack

def _zstd():
    try:
        import zstandard
    except ImportError as e:
        raise BundleError("the python module 'zstandard' is needed (pip install zstandard, or the "
                          "zstandard wheel that travels with the bundle)") from e
    return zstandard


def pack(files: list[Path], out_dir: Path, part_mb: float, level: int = 9, threads: int = 0,
         extra_manifest: dict | None = None, side_files: list[Path] = ()) -> dict:
    """Tar ``files`` (flat, by base name), zstd-compress, split into parts, write the manifest."""
    if part_mb <= 0:
        raise ValueError(f"part_mb: must be positive, got {part_mb}")
    names = [Path(f).name for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"files: duplicate base names in {sorted(names)}")
    zstd = _zstd()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(STREAM_NAME + ".*"):
        old.unlink()
    members = []
    # long-distance matching over a 128 MB window: the tar holds several copies of the CUTLASS headers
    params = zstd.ZstdCompressionParameters.from_level(level, window_log=27,
                                                       enable_ldm=True, threads=threads)
    cctx = zstd.ZstdCompressor(compression_params=params)
    writer = PartWriter(out_dir, int(part_mb * MB))
    with cctx.stream_writer(writer, closefd=False) as zw:
        with tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for f in sorted(files, key=lambda p: Path(p).name):
                f = Path(f)
                info = tarfile.TarInfo(f.name)
                info.size = f.stat().st_size
                info.mtime = 0
                info.mode = 0o644
                with open(f, "rb") as fh:
                    tar.addfile(info, fh)
                members.append({"name": f.name, "size": info.size, "sha256": sha256_file(f)})
    writer.close()
    sides = []
    for s in side_files:
        s = Path(s)
        if s.parent.resolve() != out_dir.resolve():
            shutil.copy2(s, out_dir / s.name)
        sides.append({"name": s.name, "size": s.stat().st_size, "sha256": sha256_file(out_dir / s.name)})
    manifest = {
        "format": FORMAT,
        "part_mb": part_mb,
        "zstd_level": level,
        "zstd_window_log": 27,
        "stream_size": writer.stream_size,
        "stream_sha256": writer.stream_hash.hexdigest(),
        "parts": writer.parts,
        "members": members,
        "members_bytes": sum(m["size"] for m in members),
        "side_files": sides,
        **(extra_manifest or {}),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack(bundle_dir: Path, dest: Path) -> list[Path]:
    """Reassemble the parts, decompress, extract the members into ``dest``; every checksum checked."""
    bundle_dir, dest = Path(bundle_dir), Path(dest)
    manifest = load_manifest(bundle_dir)
    problems = verify(bundle_dir, quick=True)
    if problems:
        raise BundleError("bundle incomplete: " + "; ".join(problems))
    zstd = _zstd()
    dest.mkdir(parents=True, exist_ok=True)
    expected = {m["name"]: m for m in manifest["members"]}
    reader = PartReader(bundle_dir, manifest["parts"])
    dctx = zstd.ZstdDecompressor(max_window_size=1 << 31)
    out = []
    with dctx.stream_reader(io.BufferedReader(reader, CHUNK), read_across_frames=True) as zr:
        with tarfile.open(fileobj=zr, mode="r|") as tar:
            for info in tar:
                name = info.name
                if name not in expected or not info.isfile() or "/" in name or name.startswith("."):
                    raise BundleError(f"{name}: unexpected member in the bundle stream")
                src = tar.extractfile(info)
                h = hashlib.sha256()
                target = dest / name
                with open(target, "wb") as fh:
                    for block in iter(lambda: src.read(CHUNK), b""):
                        h.update(block)
                        fh.write(block)
                if h.hexdigest() != expected[name]["sha256"]:
                    raise BundleError(f"{name}: sha256 mismatch after decompression")
                out.append(target)
        # drain whatever follows the tar's end blocks so every part is read and checked
        while zr.read(CHUNK):
            pass
    if reader._f is not None:
        reader._finish_part()
    if reader.stream_hash.hexdigest() != manifest["stream_sha256"]:
        raise BundleError("stream sha256 mismatch (parts reassembled in the wrong order?)")
    missing = sorted(set(expected) - {p.name for p in out})
    if missing:
        raise BundleError(f"members missing from the stream: {missing}")
    return out


# ------------------------------------------------------------------------------- wheels and trims

def restore_stored(src: Path, dst: Path, drop: list[TrimRule] = ()) -> dict:
    """Copy a wheel with every entry stored uncompressed (zstd then compresses across files) and
    the entries matching ``drop`` removed, RECORD updated. Returns what was dropped."""
    regexes = [(re.compile(r.pattern), r) for r in drop]
    dropped: dict[str, int] = {}
    with zipfile.ZipFile(src) as zin:
        infos = zin.infolist()
        record_name = next((i.filename for i in infos if i.filename.endswith(".dist-info/RECORD")), None)
        keep = []
        for info in infos:
            hit = next((r for rx, r in regexes if rx.search(info.filename)), None)
            if hit is not None:
                dropped[info.filename] = info.file_size
            else:
                keep.append(info)
        with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
            for info in keep:
                data = zin.read(info.filename)
                if info.filename == record_name and dropped:
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(l for l in lines if l.split(",", 1)[0] not in dropped).encode()
                zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
                zi.external_attr = info.external_attr
                zi.compress_type = zipfile.ZIP_STORED
                zout.writestr(zi, data)
    return dropped


def pip_download(specs: list[str], dest: Path, python: str = sys.executable) -> None:
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + specs, check=True)


def read_requirements(path: Path) -> list[str]:
    reqs = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(line)
    return reqs


def _dist_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def build(out_dir: Path, part_mb: float, wheels_dir: Path, level: int, download: bool) -> dict:
    wheels_dir = Path(wheels_dir)
    wheels_dir.mkdir(parents=True, exist_ok=True)
    specs = [VLLM_PIN, FLASHINFER_PIN, ZSTANDARD_PIN, *read_requirements(REQUIREMENTS_FILE)]
    if download:
        pip_download(specs, wheels_dir)
    wheels = sorted(wheels_dir.glob("*.whl"))
    by_name: dict[str, list[Path]] = {}
    for w in wheels:
        by_name.setdefault(_dist_name(w), []).append(w)
    wanted = {re.sub(r"[-_.]+", "-", re.split(r"[=<>!~;\[ ]", s, 1)[0]).lower() for s in specs}
    missing = sorted(wanted - set(by_name))
    if missing:
        raise BundleError(f"{wheels_dir}: no wheel for {missing} (run without --no-download)")
    doubled = {k: [p.name for p in v] for k, v in by_name.items() if k in wanted and len(v) > 1}
    if doubled:
        raise BundleError(f"{wheels_dir}: more than one wheel of {doubled}; keep one version each")
    zstd_wheel = by_name["zstandard"][0]
    t0 = time.monotonic()
    stage = Path(tempfile.mkdtemp(prefix="gpu-bundle-"))
    try:
        staged, trims, sources = [], {}, []
        for name in sorted(wanted):
            src = by_name[name][0]
            sources.append({"name": src.name, "size": src.stat().st_size, "sha256": sha256_file(src)})
            dst = stage / src.name
            if name == "zstandard":     # travels beside the parts (side file), not inside them
                continue
            rules = TRIMS.get(name, [])
            dropped = restore_stored(src, dst, rules)
            if dropped:
                trims[src.name] = {"dropped_files": len(dropped),
                                   "dropped_bytes": sum(dropped.values()),
                                   "rules": [{"pattern": r.pattern, "why": r.why} for r in rules]}
            staged.append(dst)
        manifest = pack(staged, out_dir, part_mb, level=level, threads=os.cpu_count() or 1,
                        side_files=[zstd_wheel],
                        extra_manifest={"source_wheels": sources, "trims": trims,
                                        "python": "cp312", "platform": "manylinux x86_64",
                                        "install": "scripts/gpu_bundle_install.sh BUNDLE_DIR TARGET_DIR"})
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    manifest["build_seconds"] = round(time.monotonic() - t0, 1)
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download (unless --no-download), trim, compress and split")
    b.add_argument("--out", type=Path, default=REPO / "build" / "gpu-bundle")
    b.add_argument("--part-mb", type=float, default=60.0, help="largest part, in MB (10^6 bytes)")
    b.add_argument("--wheels", type=Path, default=REPO / "build" / "gpu-wheels",
                   help="where the downloaded wheels are kept")
    b.add_argument("--level", type=int, default=9,
                   help="zstd level (19 gains ~3%% on the .so files at 1/20 the speed)")
    b.add_argument("--no-download", action="store_true", help="use the wheels already in --wheels")
    v = sub.add_parser("verify", help="check the parts against the manifest")
    v.add_argument("bundle", type=Path)
    v.add_argument("--quick", action="store_true", help="presence and sizes only")
    u = sub.add_parser("unpack", help="reassemble, check and extract the wheels")
    u.add_argument("bundle", type=Path)
    u.add_argument("--dest", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            m = build(args.out, args.part_mb, args.wheels, args.level, not args.no_download)
            print(f"{args.out}: {len(m['members'])} wheels, {m['members_bytes'] / MB:.1f} MB -> "
                  f"{m['stream_size'] / MB:.1f} MB zstd in {len(m['parts'])} parts of <= "
                  f"{m['part_mb']:g} MB ({m['build_seconds']}s)")
            for name, t in m["trims"].items():
                print(f"  trimmed {name}: {t['dropped_files']} files, {t['dropped_bytes'] / MB:.1f} MB")
        elif args.cmd == "verify":
            problems = verify(args.bundle, quick=args.quick)
            for p in problems:
                print("BAD", p)
            if problems:
                return 1
            print(f"{args.bundle}: all parts present and matching the manifest")
        elif args.cmd == "unpack":
            files = unpack(args.bundle, args.dest)
            print(f"{args.dest}: {len(files)} wheels extracted and checked")
    except BundleError as e:
        print(f"gpu_bundle: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
