#!/usr/bin/env bash
# The serving sweep of one GPU lease, run as a background job (scripts/gpu_jobs.sh) after the
# lease's other jobs: waits for them, picks the drafter, then runs $SWEEP_PROFILE's servers one
# after another with the GPU to itself, then the DDTree step profile.
#
#   bash scripts/gpu_jobs.sh start sweep bash scripts/gpu_lease_sweep.sh WAIT_S [JOB...]
#
# WAIT_S: how long to wait for the named jobs (the checks and a drafter training job `train`);
# jobs still running then are killed, so that the timings below own the GPU. Drafter: when the
# job `train` left a trained pair (scripts/gpu_train_tiny_pair.sh) whose engine-like held-out
# acceptance beats the committed pair's, its checkpoints are used, else models/tiny-pair. Results
# land in $JOB_OUT: sweep-ddtree/, sweep-base/, profile/, triton-autotune-h100.tgz, models.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
wait_s=${1:?seconds to wait for the other jobs}; shift
J=scripts/gpu_jobs.sh
JOBS=${JOBS_ROOT:-/opt/jobs}     # where gpu_jobs.sh keeps the jobs (the same default)
NEWPAIR=${NEWPAIR:-/opt/newpair}  # where a trained pair is unpacked
OUTD=${JOB_OUT:?run me through gpu_jobs.sh}
PROFILE=${SWEEP_PROFILE:-gpu-sweep-12min}  # or gpu-sweep-graphs (CUDA graphs)
# the sweep owns the GPU: the shared-GPU engine settings are for the checks only
unset DDTREE_GPU_MEM_UTIL DDTREE_KV_CACHE_GIB
# no periodic stack dumps while measuring (a start that times out still dumps once, on SIGUSR1)
unset DDTREE_STACKS_EVERY_S
export TRITON_CACHE_AUTOTUNING=1 VLLM_USE_FLASHINFER_SAMPLER=0
if (( $# )); then
  bash $J wait "$wait_s" "$@"
  for n in "$@"; do
    [[ -f "$JOBS/$n/rc" ]] || { echo "sweep: $n still running: killing it"; bash $J kill "$n"; }
  done
fi

models=$PWD/models/tiny-pair
report=$JOBS/train/out/train_report.json
if ls "$JOBS"/train/out/pair.tar.part-* > /dev/null 2>&1 && [[ -f $report ]]; then
  verdict=$(python3 - "$report" models/tiny-pair/train_report.json <<'PY'
import json, sys
key = "acceptance_engine_like_heldout"
new, old = (json.load(open(p))["drafter"][key]["acceptance_length"] for p in sys.argv[1:3])
print(("new" if new > old else "old") + f" {new} {old}")
PY
)
  echo "sweep: trained drafter vs committed (engine-like held-out AL): $verdict"
  if [[ $verdict == new* ]]; then
    rm -rf "$NEWPAIR" && mkdir -p "$NEWPAIR"
    cat "$JOBS"/train/out/pair.tar.part-* | tar x -C "$NEWPAIR" && models=$NEWPAIR/tiny-pair
  fi
fi
echo "models: $models (${verdict:-no trained pair})" | tee "$OUTD/models.txt"
sha256sum "$models"/drafter/model.safetensors | tee -a "$OUTD/models.txt"

label="trained tiny pair"
t0=$(date +%s)
python3 benchmarks/run_profile.py --profile "$PROFILE" --servers ddtree-server-b64-k8 \
  --models "$models" --model-label "$label" --device-name h100 \
  --budget-s "${SWEEP_DDTREE_S:-720}" --server-timeout 480 --out "$OUTD/sweep-ddtree"
echo "sweep: ddtree server done in $(( $(date +%s) - t0 )) s"
(cd "${TRITON_CACHE_DIR:-/opt/triton-cache}" && find . -name '*.autotune.json' | tar czf "$OUTD/triton-autotune-h100.tgz" -T -)
t0=$(date +%s)
python3 benchmarks/run_profile.py --profile "$PROFILE" --servers "${SWEEP_BASE_SERVERS:-dflash,nospec}" \
  --models "$models" --model-label "$label" --device-name h100 \
  --budget-s "${SWEEP_BASE_S:-480}" --server-timeout 300 --out "$OUTD/sweep-base"
echo "sweep: base servers done in $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
# the profile's own budget (default 110 s) is too short for a DDTree start that still compiles kernels
timeout "${PROFILE_S:-300}" python3 scripts/gpu_ddtree_profile.py "$OUTD/profile" --models "$models" \
  --budget-s $(( ${PROFILE_S:-300} - 15 ))
rc=$?
echo "sweep: profile done in $(( $(date +%s) - t0 )) s (rc $rc)"
