#!/bin/bash
# Train the full tiny pair on a GPU host without internet (the device tool's H100), in two halves.
#
#   scripts/gpu_train_tiny_pair.sh stage DIR     # here (internet, CPU venv): DIR gets the wheels,
#                                                # this Python's stdlib corpus and the script
#   bash DIR/run.sh [train_tiny_pair.py flags]   # there, from the folder DIR was copied to
#
# The corpus is packed from the staging machine so the tokenizer and the held-out split are those of
# the CPU machine that later measures the pair (the split is by path, so any stdlib works, but the
# same files give the same tokenizer). Results: $OUT/train.log and $OUT/pair.tar.part-* (the tool
# returns at most 8 files of 16 MiB; reassemble with `cat pair.tar.part-* | tar x`).
set -euo pipefail
if [ "${1:-}" = "stage" ]; then
  dir=$(realpath -m "$2"); here=$(cd "$(dirname "$0")" && pwd)
  py=${PYTHON:-python3}
  mkdir -p "$dir/wheels"
  "$py" -m pip download -q -d "$dir/wheels" --python-version 3.12 --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0
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
cd "$(dirname "$0")"
T0=$(date +%s)
PKGS="transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0"
python3 -m pip install -q --no-index --find-links wheels $PKGS 2>&1 | tail -3 || \
  python3 -m pip install -q --break-system-packages --no-index --find-links wheels $PKGS 2>&1 | tail -3
mkdir -p /tmp/stdlib && tar xJf stdlib-corpus.tar.xz -C /tmp/stdlib
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
PYTHONUNBUFFERED=1 python3 train_tiny_pair.py --out "$OUT/tiny-pair" --stdlib /tmp/stdlib "$@" 2>&1 \
  | grep -v "is falling back" | tee "$OUT/train.log"
(cd "$OUT" && tar cf pair.tar tiny-pair && split -b 15000000 pair.tar pair.tar.part- \
  && rm -rf pair.tar tiny-pair && sha256sum pair.tar.part-*)
echo "total $(( $(date +%s) - T0 ))s"
