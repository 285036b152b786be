#!/usr/bin/env bash
# ddtree-vllm image entrypoint: PROFILE -> `vllm serve` arguments.
#
#   docker run --gpus all -v /models:/models -p 8000:8000 -e PROFILE=ddtree ddtree-vllm:<ver>-gb10
#
# Settings come from, first match wins: the environment (docker run -e KEY=VALUE), the profile
# (profiles/$PROFILE.env), the flavour (flavours/$DDTREE_FLAVOUR.env), defaults.env. Arguments given
# after the image name are appended to `vllm serve`. DRY_RUN=1 prints the command(s) and exits 0.
# An unknown PROFILE, a missing model folder or a drafter that does not fit the target exits 2 before
# vLLM starts.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "ddtree-vllm: $*" >&2; exit 2; }

# KEY=VALUE lines; comments and blank lines skipped; a KEY that is already set is left alone.
load_env_file() {
  local file=$1 line key value
  while IFS= read -r line || [[ -n "$line" ]]; do
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    [[ "$line" =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] || die "bad line in $file: $line"
    key=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    if [[ -z "${!key+x}" ]]; then
      printf -v "$key" '%s' "$value"
      export "${key?}"
    fi
  done < "$file"
}

known_profiles() {
  local f names=()
  for f in "$here"/profiles/*.env; do names+=("$(basename "$f" .env)"); done
  echo "${names[*]}"
}

is_true() { [[ "${1,,}" =~ ^(1|true|yes|on)$ ]]; }

PROFILE=${PROFILE:-ddtree}
[[ "$PROFILE" =~ ^[a-z0-9][a-z0-9-]*$ && -f "$here/profiles/$PROFILE.env" ]] \
  || die "unknown PROFILE '$PROFILE' (known: $(known_profiles))"
load_env_file "$here/profiles/$PROFILE.env"
if [[ -n "${SERVE_PROFILE:-}" ]]; then
  [[ -f "$here/profiles/$SERVE_PROFILE.env" && "$SERVE_PROFILE" != bench-* ]] \
    || die "PROFILE $PROFILE: unknown SERVE_PROFILE '$SERVE_PROFILE'"
  load_env_file "$here/profiles/$SERVE_PROFILE.env"
fi
DDTREE_FLAVOUR=${DDTREE_FLAVOUR:-gb10}
[[ -f "$here/flavours/$DDTREE_FLAVOUR.env" ]] || die "unknown DDTREE_FLAVOUR '$DDTREE_FLAVOUR'"
load_env_file "$here/flavours/$DDTREE_FLAVOUR.env"
load_env_file "$here/defaults.env"

case "$SPEC_METHOD" in
  none|dflash|dflash_ddtree) ;;
  *) die "SPEC_METHOD '$SPEC_METHOD' is not one of none, dflash, dflash_ddtree" ;;
esac

# ------------------------------------------------------------------ the vllm serve command
read -r -a vllm_cmd <<< "$VLLM"
read -r -a python_cmd <<< "$PYTHON"
args=(serve "$MODEL" --host "$HOST" --port "$PORT")
opt() { [[ -z "$2" ]] || args+=("$1" "$2"); }   # option with a value, skipped when empty
opt --served-model-name "$SERVED_MODEL_NAME"
opt --max-num-seqs "$MAX_NUM_SEQS"
opt --max-model-len "$MAX_MODEL_LEN"
opt --max-num-batched-tokens "$MAX_NUM_BATCHED_TOKENS"
opt --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION"
opt --dtype "$DTYPE"
opt --quantization "$QUANTIZATION"
opt --kv-cache-dtype "$KV_CACHE_DTYPE"
opt --attention-backend "$ATTENTION_BACKEND"
opt --mamba-ssm-cache-dtype "$MAMBA_SSM_CACHE_DTYPE"
opt --seed "$SEED"
opt --reasoning-parser "$REASONING_PARSER"
if [[ -n "$TOOL_CALL_PARSER" ]]; then
  args+=(--tool-call-parser "$TOOL_CALL_PARSER")
  if is_true "$ENABLE_AUTO_TOOL_CHOICE"; then args+=(--enable-auto-tool-choice); fi
fi
if is_true "$LANGUAGE_MODEL_ONLY"; then
  args+=(--language-model-only)
else
  opt --limit-mm-per-prompt "$LIMIT_MM_PER_PROMPT"
fi
if is_true "$ENFORCE_EAGER"; then args+=(--enforce-eager); fi
case "${ENABLE_PREFIX_CACHING,,}" in
  "") ;;
  1|true|yes|on) args+=(--enable-prefix-caching) ;;
  0|false|no|off) args+=(--no-enable-prefix-caching) ;;
  *) die "ENABLE_PREFIX_CACHING '$ENABLE_PREFIX_CACHING' is not 1/0/empty" ;;
esac
opt --api-key "$API_KEY"

int_or_die() { [[ -z "$2" || "$2" =~ ^[0-9]+$ ]] || die "$1 '$2' is not a whole number"; }
int_or_die NUM_SPECULATIVE_TOKENS "$NUM_SPECULATIVE_TOKENS"
if [[ "$SPEC_METHOD" != none ]]; then
  spec="{\"method\": \"$SPEC_METHOD\", \"model\": \"$DRAFTER\""
  [[ -z "$NUM_SPECULATIVE_TOKENS" ]] || spec+=", \"num_speculative_tokens\": $NUM_SPECULATIVE_TOKENS"
  if [[ "$SPEC_METHOD" == dflash_ddtree ]]; then
    int_or_die DDTREE_BUDGET "$DDTREE_BUDGET"
    int_or_die DDTREE_TOP_K "$DDTREE_TOP_K"
    [[ -z "$DDTREE_BUDGET" ]] || spec+=", \"ddtree_budget\": $DDTREE_BUDGET"
    [[ -z "$DDTREE_TOP_K" ]] || spec+=", \"ddtree_top_k\": $DDTREE_TOP_K"
    case "${DDTREE_CHAIN_SEED,,}" in
      "") ;;
      1|true|yes|on) spec+=", \"ddtree_chain_seed\": true" ;;
      0|false|no|off) spec+=", \"ddtree_chain_seed\": false" ;;
      *) die "DDTREE_CHAIN_SEED '$DDTREE_CHAIN_SEED' is not true/false" ;;
    esac
  fi
  args+=(--speculative-config "$spec}")
fi
if [[ "$PROFILE" == llada2 || "${SERVE_PROFILE:-}" == llada2 ]]; then
  # The LLaDA2 overlay's server-wide settings (docs/llada2.md): block length and steps per block
  # through --diffusion-config, the confidence threshold through VLLM_LLADA2_THRESHOLD.
  llada=()
  [[ -z "$LLADA2_BLOCK_LENGTH" ]] || llada+=("\"canvas_length\": $LLADA2_BLOCK_LENGTH")
  [[ -z "$LLADA2_MAX_STEPS" ]] || llada+=("\"max_denoising_steps\": $LLADA2_MAX_STEPS")
  if (( ${#llada[@]} )); then
    joined=$(IFS=,; echo "${llada[*]}")
    args+=(--diffusion-config "{${joined//,/, }}")
  fi
  [[ -z "$LLADA2_THRESHOLD" ]] || export VLLM_LLADA2_THRESHOLD="$LLADA2_THRESHOLD"
fi
read -r -a extra <<< "$EXTRA_ARGS"
args+=("${extra[@]}" "$@")
serve_cmd=("${vllm_cmd[@]}" "${args[@]}")

bench_cmd=()
if is_true "$BENCH"; then
  bench_cmd=("${vllm_cmd[@]}" bench serve --base-url "http://127.0.0.1:$PORT"
             --model "${SERVED_MODEL_NAME:-$MODEL}" --tokenizer "$MODEL"
             --dataset-name "$BENCH_DATASET" --num-prompts "$BENCH_NUM_PROMPTS"
             --max-concurrency "$BENCH_MAX_CONCURRENCY" --temperature 0
             --save-result --result-dir "$BENCH_RESULT_DIR"
             --result-filename "bench-${SERVE_PROFILE:-$PROFILE}-$(date -u +%Y%m%dT%H%M%SZ).json")
  if [[ "$BENCH_DATASET" == random ]]; then
    bench_cmd+=(--random-input-len "$BENCH_INPUT_LEN" --random-output-len "$BENCH_OUTPUT_LEN")
  fi
  read -r -a bench_extra <<< "$BENCH_EXTRA_ARGS"
  bench_cmd+=("${bench_extra[@]}")
fi

if is_true "$DRY_RUN"; then
  printf '%q ' "${serve_cmd[@]}"; echo
  if (( ${#bench_cmd[@]} )); then printf '%q ' "${bench_cmd[@]}"; echo; fi
  exit 0
fi

# ------------------------------------------------------------------ checks before vLLM starts
if is_true "$CHECK_MODELS"; then
  check=("${python_cmd[@]}" "$here/check_models.py" "$MODEL")
  if [[ "$SPEC_METHOD" != none ]]; then
    check+=(--drafter "$DRAFTER")
    [[ -z "$NUM_SPECULATIVE_TOKENS" ]] || check+=(--num-speculative-tokens "$NUM_SPECULATIVE_TOKENS")
  fi
  "${check[@]}" || exit 2
fi

# The engine core runs in its own process: a multiprocess Prometheus dir brings its metrics
# (vllm:ddtree_*) to the API server's /metrics.
if [[ -z "${PROMETHEUS_MULTIPROC_DIR:-}" ]]; then
  PROMETHEUS_MULTIPROC_DIR=$(mktemp -d /tmp/vllm-prometheus.XXXXXX)
  export PROMETHEUS_MULTIPROC_DIR
fi
echo "ddtree-vllm: PROFILE=$PROFILE flavour=$DDTREE_FLAVOUR: $(printf '%q ' "${serve_cmd[@]}")" >&2
if (( ${#bench_cmd[@]} == 0 )); then
  exec "${serve_cmd[@]}"
fi

# Bench: server in the background, benchmark in the foreground; TERM/INT stop both.
"${serve_cmd[@]}" &
server=$!
trap 'kill -INT "$server" 2>/dev/null; wait "$server"; exit 143' TERM INT
deadline=$(( $(date +%s) + SERVER_START_TIMEOUT ))
until "${python_cmd[@]}" "$here/healthcheck.py" 2>/dev/null; do
  kill -0 "$server" 2>/dev/null || { wait "$server" || true; die "the server exited before it was ready"; }
  (( $(date +%s) < deadline )) || { kill -INT "$server"; die "the server was not ready after ${SERVER_START_TIMEOUT}s"; }
  sleep 2
done
mkdir -p "$BENCH_RESULT_DIR"
echo "ddtree-vllm: bench: $(printf '%q ' "${bench_cmd[@]}")" >&2
rc=0
OPENAI_API_KEY=${API_KEY:-EMPTY} "${bench_cmd[@]}" || rc=$?
kill -INT "$server" 2>/dev/null || true
wait "$server" || true
exit "$rc"
