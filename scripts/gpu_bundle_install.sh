#!/usr/bin/env bash
# Install an offline GPU bundle (scripts/gpu_bundle.py build) on a host without internet.
#
#   scripts/gpu_bundle_install.sh BUNDLE_DIR TARGET_DIR
#   export PYTHONPATH=TARGET_DIR:$PYTHONPATH      # then: python3 -m vllm.entrypoints.cli.main serve ...
#
# The host needs python 3.12 with torch 2.11 (CUDA 13) and pip; no zstd binary, no registry: the
# `zstandard` wheel travels beside the parts. Steps: check the parts against the manifest, reassemble
# and decompress them (every part, the stream and every wheel checked by sha256), `pip install
# --no-index --no-deps --target TARGET_DIR` the wheels, apply our vLLM overlays to the installed vllm
# and --check them, import vllm and flashinfer.
#
# Environment: PYTHON (default python3); DDTREE_REPO, the checkout whose scripts/apply_overlays.py and
# patches/ are applied (default: the checkout this script is in); KEEP_WHEELS=1 keeps the extracted
# wheels in TARGET_DIR/.bundle-wheels.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
BUNDLE=$(cd "$1" && pwd)
mkdir -p "$2"
TARGET=$(cd "$2" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${DDTREE_REPO:-$(dirname "$HERE")}
PY=${PYTHON:-python3}
BUNDLER="$HERE/gpu_bundle.py"
[[ -f "$BUNDLER" ]] || { echo "gpu_bundle_install: $BUNDLER not found" >&2; exit 1; }
[[ -f "$REPO/scripts/apply_overlays.py" ]] || {
    echo "gpu_bundle_install: $REPO/scripts/apply_overlays.py not found (set DDTREE_REPO)" >&2; exit 1; }

t0=$SECONDS
"$PY" - <<'EOF'
import sys
if sys.version_info[:2] != (3, 12):
    sys.exit(f"gpu_bundle_install: the bundle holds cp312 wheels; this python is {sys.version.split()[0]}")
try:
    import torch
except ImportError:
    sys.exit("gpu_bundle_install: torch 2.11 (CUDA 13) must be installed on the host")
if not torch.__version__.startswith("2.11"):
    sys.exit(f"gpu_bundle_install: vllm 0.26.0 needs torch 2.11, found {torch.__version__}")
print(f"host: python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bundle.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# the decompressor: the host's zstandard if it has one, else the wheel beside the parts
ZPATH=""
if ! "$PY" -c "import zstandard" 2>/dev/null; then
    shopt -s nullglob
    zwheels=("$BUNDLE"/zstandard-*.whl)
    shopt -u nullglob
    [[ ${#zwheels[@]} -eq 1 ]] || { echo "gpu_bundle_install: no zstandard wheel in $BUNDLE" >&2; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$WORK/zstd" "${zwheels[0]}"
    ZPATH="$WORK/zstd"
fi

"$PY" "$BUNDLER" verify "$BUNDLE"
PYTHONPATH="$ZPATH${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$BUNDLER" unpack "$BUNDLE" --dest "$WORK/wheels"
echo "unpacked in $((SECONDS - t0)) s"

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$TARGET" "$WORK"/wheels/*.whl "$BUNDLE"/zstandard-*.whl
echo "installed $(ls "$WORK"/wheels | wc -l) wheels into $TARGET in $((SECONDS - t0)) s"
if [[ "${KEEP_WHEELS:-0}" == 1 ]]; then
    rm -rf "$TARGET/.bundle-wheels" && mv "$WORK/wheels" "$TARGET/.bundle-wheels"
fi

"$PY" "$REPO/scripts/apply_overlays.py" --tree "$TARGET"
"$PY" "$REPO/scripts/apply_overlays.py" --tree "$TARGET" --check --require-applied

PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import importlib.metadata as md
import vllm
import flashinfer
from vllm.config.speculative import SpeculativeConfig  # our overlay's fields live here
assert hasattr(SpeculativeConfig, "use_ddtree"), "overlays not visible from the installed vllm"
print(f"vllm {vllm.__version__} from {vllm.__file__}")
print(f"flashinfer {md.version('flashinfer-python')}")
EOF
echo "done in $((SECONDS - t0)) s; use: export PYTHONPATH=$TARGET\${PYTHONPATH:+:\$PYTHONPATH}"
