#!/usr/bin/env bash
# One-command LLaDA2 block-decode check on a GPU host with the offline bundle (~4 minutes):
#
#   bash scripts/gpu_llada2_check.sh OUTDIR            # from the repo checkout
#   bash scripts/gpu_llada2_check.sh OUTDIR --device cpu --quick      # CPU dry run
#
# Puts this checkout and the bundle (VLLM_SITE, default /opt/vllm-site) on PYTHONPATH, keeps the
# compile caches out of OUTDIR, and runs scripts/gpu_llada2_check.py (see its docstring). OUTDIR
# gets summary.json, summary.md, bench_mini.json and logs.tgz; exit status 0 = all checks passed.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SITE=${VLLM_SITE:-/opt/vllm-site}
[[ -d "$SITE" ]] || SITE=""
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-/tmp/llada2-vllm-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/llada2-triton-cache}
cd "$REPO"
exec "${PYTHON:-python3}" scripts/gpu_llada2_check.py "$@"
