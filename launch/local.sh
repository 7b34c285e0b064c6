#!/usr/bin/env bash
# Multi-host dry run on one machine: N processes of CMD on localhost, wired the way jaxfm's
# initialize_runtime() expects (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID),
# on the CPU backend.
#
#   launch/local.sh N -- CMD...
#
# Process i logs to $LOG_DIR/local-i.log (default logs/). If one process fails, the others are
# killed. Exit status: 0 if all exited 0, else the first failure's status (124 on TIMEOUT_S).
# Variables: PORT (coordinator port, default a free one), TIMEOUT_S (default 600), LOG_DIR.
set -euo pipefail

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[[ ${1:-} =~ ^[1-9][0-9]*$ ]] || usage
N=$1; shift
[[ ${1:-} == -- ]] && shift
(($# > 0)) || usage

TIMEOUT_S=${TIMEOUT_S:-600}
LOG_DIR=${LOG_DIR:-logs}
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i JAX_PLATFORMS=cpu \
    "$@" >"$LOG_DIR/local-$i.log" 2>&1 &
  pids+=($!)
done
echo "local.sh: started $N processes (coordinator 127.0.0.1:$PORT), logs in $LOG_DIR/local-*.log" >&2

kill_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'kill_all; exit 130' INT TERM

# Poll: reap whichever process ends; on the first failure (or the timeout) stop the rest.
status=0 running=$N deadline=$((SECONDS + TIMEOUT_S))
declare -A done_=()
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    [[ -n ${done_[$i]:-} ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0; wait "${pids[$i]}" || rc=$?
    done_[$i]=1; running=$((running - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local.sh: process $i exited $rc; stopping the others. Tail of $LOG_DIR/local-$i.log:" >&2
      tail -n 20 "$LOG_DIR/local-$i.log" >&2 || true
      kill_all
    fi
  done
  if ((running > 0 && SECONDS >= deadline)); then
    echo "local.sh: timeout after ${TIMEOUT_S}s; killing all" >&2
    status=124; kill_all; wait || true; break
  fi
  ((running > 0)) && sleep 0.5
done
((status == 0)) && echo "local.sh: all $N processes exited 0" >&2
exit "$status"
