#!/bin/bash
# Train the tiny pair (or only its drafter) on a GPU host without internet (the device tool's H100).
#
#   scripts/gpu_train_tiny_pair.sh stage DIR        # here (internet, CPU venv): DIR gets the wheels,
#                                                   # this Python's stdlib corpus and the scripts
#   bash scripts/gpu_train_tiny_pair.sh run DIR [train_tiny_pair.py flags]
#                                                   # there, from the repo checkout (the device tool
#                                                   # runs in it): the checkout's scripts, DIR's
#                                                   # wheels + corpus; relative paths such as
#                                                   # --target models/tiny-pair/target are the checkout's
#   bash DIR/run.sh [flags]                         # the same; uses the checkout's scripts when run
#                                                   # from a checkout, DIR's copies otherwise
#
# Drafter only (recipe v3, about 5 minutes on an H100; the target comes from the checkout):
#   bash scripts/gpu_train_tiny_pair.sh run .gpu/pair --drafter-only --target models/tiny-pair/target ...
#
# The corpus is packed from the staging machine so the tokenizer and the held-out split are those of
# the CPU machine that later measures the pair. Results: $OUT/train.log, $OUT/train_report.json and
# $OUT/pair.tar.part-* (the tool returns at most 8 files of 16 MiB; reassemble with
# `cat pair.tar.part-* | tar x`).
set -euo pipefail
if [ "${1:-}" = "stage" ]; then
  dir=$(realpath -m "$2"); here=$(cd "$(dirname "$0")" && pwd)
  py=${PYTHON:-python3}
  mkdir -p "$dir/wheels"
  "$py" -m pip download -q -d "$dir/wheels" --python-version 3.12 --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0
  # The stage rides beside the checkout (which carries the ~22 MB pair) under the device tool's
  # 64 MiB per call: leave out numpy (15 MB; the GPU image's torch brings it) and anything stale.
  rm -f "$dir"/wheels/numpy-* "$dir"/wheels/fla_core-* "$dir"/wheels/flash_linear_attention-* \
    "$dir"/wheels/einops-*
  stdlib=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  (cd "$stdlib" && PYTHONPATH="$here" "$py" -c '
import sys; from pathlib import Path; import train_tiny_pair as t
print("\n".join(r for r, _ in t.corpus_files(Path("."))))' > "$dir/corpus.txt" \
    && tar cJf "$dir/stdlib-corpus.tar.xz" -T "$dir/corpus.txt")
  cp "$here/train_tiny_pair.py" "$here/tiny_models.py" "$dir/"  # the pair shares tiny_models' tokenizer recipe
  cp "$0" "$dir/run.sh"
  du -sh "$dir"
  exit 0
fi
if [ "${1:-}" = "run" ]; then
  STAGE=$(realpath "$2"); shift 2
else
  STAGE=$(cd "$(dirname "$0")" && pwd)
fi
: "${OUT:?set OUT to the results folder}"
# the checkout's scripts when we run inside one (staged copies may be older than the recipe)
if [ -f "$PWD/scripts/train_tiny_pair.py" ]; then SCRIPTS="$PWD/scripts"; else SCRIPTS="$STAGE"; fi
T0=$(date +%s)
PY=${PYTHON:-python3}
PKGS="transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0"
if [ -z "${SKIP_PIP:-}" ]; then  # SKIP_PIP=1: the CPU test of this script, in the project venv
  "$PY" -m pip install -q --no-index --find-links "$STAGE/wheels" $PKGS 2>&1 | tail -3 || \
    "$PY" -m pip install -q --break-system-packages --no-index --find-links "$STAGE/wheels" $PKGS 2>&1 | tail -3
fi
CORPUS=${CORPUS_DIR:-/tmp/stdlib}
mkdir -p "$CORPUS" && tar xJf "$STAGE/stdlib-corpus.tar.xz" -C "$CORPUS"
"$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
echo "scripts: $SCRIPTS"
PYTHONUNBUFFERED=1 PYTHONPATH="$SCRIPTS" "$PY" "$SCRIPTS/train_tiny_pair.py" --out "$OUT/tiny-pair" \
  --stdlib "$CORPUS" --report "$OUT/train_report.json" "$@" 2>&1 \
  | grep -v "is falling back" | tee "$OUT/train.log"
(cd "$OUT" && tar cf pair.tar tiny-pair && split -b 15000000 pair.tar pair.tar.part- \
  && rm -rf pair.tar tiny-pair && sha256sum pair.tar.part-*)
echo "total $(( $(date +%s) - T0 ))s"
