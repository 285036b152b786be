#!/usr/bin/env bash
# Background jobs on a leased GPU host, so that independent work shares one short lease.
#
# A device call may run 10 minutes and the machine goes back 30 s after a call returns, but a
# process started in its own session (setsid) keeps running between calls. So: start the long
# jobs (drafter training, correctness checks) in the background, keep one call in flight at all
# times (a foreground check, or `wait`), and bring results back with `collect`.
#
#   bash scripts/gpu_jobs.sh start NAME CMD...     # CMD runs via bash in $PWD, in its own session;
#                                                  # JOB_OUT=/opt/jobs/NAME/out is its results dir
#   bash scripts/gpu_jobs.sh status                # one line per job: running / rc, age, last line
#   bash scripts/gpu_jobs.sh wait SECONDS [NAME...] # until those (default all) jobs end, at most S
#   bash scripts/gpu_jobs.sh collect DEST [NAME...] # DEST/NAME.tgz of each ended job (log + out)
#   bash scripts/gpu_jobs.sh kill NAME...           # end those jobs (their whole process group)
#
# Each job dir holds cmd, pid, log, started, rc (once ended) and out/. JOBS_ROOT moves the root.
# Jobs inherit the caller's environment (PYTHONPATH, caches, DDTREE_GPU_MEM_UTIL ...).
set -uo pipefail
ROOT=${JOBS_ROOT:-/opt/jobs}
verb=${1:-status}; shift || true

_ended() { [[ -f "$ROOT/$1/rc" ]]; }
_names() { if (( $# )); then printf '%s\n' "$@"; else ls -1 "$ROOT" 2>/dev/null; fi; }

case "$verb" in
  start)
    name=${1:?job name}; shift
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "gpu_jobs: bad job name '$name'" >&2; exit 2; }
    (( $# )) || { echo "gpu_jobs: no command for job $name" >&2; exit 2; }
    dir="$ROOT/$name"
    if [[ -f "$dir/pid" ]] && ! _ended "$name"; then echo "gpu_jobs: $name is already running" >&2; exit 2; fi
    rm -rf "$dir"; mkdir -p "$dir/out"
    printf '%s\n' "$*" > "$dir/cmd"; date +%s > "$dir/started"
    # the command runs as a script of its own, so its `exit` still leaves rc behind
    JOB_OUT="$dir/out" setsid nohup bash -c "bash '$dir/cmd'; echo \$? > '$dir/rc'" \
      > "$dir/log" 2>&1 < /dev/null &
    echo $! > "$dir/pid"
    echo "started $name (pid $!)"
    ;;
  status)
    now=$(date +%s)
    for n in $(_names "$@"); do
      d="$ROOT/$n"; [[ -f "$d/started" ]] || continue
      age=$(( now - $(cat "$d/started") ))
      if _ended "$n"; then st="rc=$(cat "$d/rc")"; else st=running; fi
      printf '%-14s %-9s %5ss  %s\n' "$n" "$st" "$age" "$(tail -c 2000 "$d/log" 2>/dev/null | tr '\r' '\n' | grep -v '^\s*$' | tail -1 | cut -c1-150)"
    done
    ;;
  wait)
    limit=${1:?seconds}; shift
    t0=$(date +%s)
    while :; do
      left=0
      for n in $(_names "$@"); do [[ -f "$ROOT/$n/started" ]] && ! _ended "$n" && left=$((left + 1)); done
      (( left == 0 )) && break
      (( $(date +%s) - t0 >= limit )) && { echo "gpu_jobs: $left job(s) still running after ${limit}s"; break; }
      sleep 5
    done
    "$0" status "$@"
    ;;
  collect)
    # one DEST/NAME.tgz per ended job; files over 8 MB (trained checkpoints' parts) are copied
    # beside it as DEST/NAME.FILE instead: the device tool returns files of at most 16 MiB
    dest=${1:?destination dir}; shift; mkdir -p "$dest"
    for n in $(_names "$@"); do
      [[ -f "$ROOT/$n/started" ]] || continue
      _ended "$n" || { echo "gpu_jobs: $n still running, not collected"; continue; }
      big=$(cd "$ROOT" && find "$n" -type f -size +8M)
      for f in $big; do cp "$ROOT/$f" "$dest/$n.$(basename "$f")"; done
      (cd "$ROOT" && tar czf "$dest/$n.tgz" $(for f in $big; do printf -- '--exclude=%s ' "$f"; done) "$n") \
        && echo "collected $n ($(du -h "$dest/$n.tgz" | cut -f1))${big:+ + $(echo $big | wc -w) large file(s)}"
    done
    ;;
  kill)
    for n in "$@"; do
      d="$ROOT/$n"; [[ -f "$d/pid" ]] && ! _ended "$n" || continue
      kill -TERM -- "-$(cat "$d/pid")" 2>/dev/null; sleep 3; kill -KILL -- "-$(cat "$d/pid")" 2>/dev/null
      _ended "$n" || echo killed > "$d/rc"
      echo "killed $n"
    done
    ;;
  *) echo "usage: gpu_jobs.sh start|status|wait|collect|kill ..." >&2; exit 2 ;;
esac
