#!/usr/bin/env bash
# Cloud TPU VM launcher for jaxfm. See launch/README.md for the runbook.
#
#   launch/tpu.sh create [--autocheckpoint]  create the TPU VM (QUEUED=1: a queued resource), wait until usable
#   launch/tpu.sh install                    copy the project to every worker; uv venv (Python >= 3.11) + jaxfm[tpu]
#   launch/tpu.sh run -- CMD...              start CMD detached on every worker and return
#   launch/tpu.sh logs                       follow the job's log on worker $WORKER until the job ends
#   launch/tpu.sh stop                       SIGTERM the job on every worker (jaxfm saves, exits 143)
#   launch/tpu.sh status | start | delete    print the state | start a STOPPED TPU VM | delete the TPU
#   launch/tpu.sh babysit [--keep] [--autocheckpoint] -- CMD...
#       (re)create, install, run and watch CMD until it exits 0 and WORKDIR/DONE exists, through
#       preemptions; then, or on giving up (exit 1), delete the TPU unless --keep
#
# DRY_RUN=1 prints every gcloud call as one shell-quoted line "+ gcloud ..." instead of running it.
set -euo pipefail

TPU_NAME=${TPU_NAME:-jaxfm-tpu}
ZONE=${ZONE:-us-west4-a}
PROJECT=${PROJECT:-}                                 # empty: gcloud's configured project
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
SPOT=${SPOT:-0}                                      # 1: --spot (preemptible capacity)
QUEUED=${QUEUED:-0}                                  # 1: queued resource named $TPU_NAME
AUTOCHECKPOINT=${AUTOCHECKPOINT:-0}                  # 1 (or --autocheckpoint): gcloud alpha ... --autocheckpoint-enabled
KEEP=${KEEP:-0}                                      # 1 (or babysit --keep): babysit leaves the TPU when it ends
REPO_URL=${REPO_URL:-}                               # empty: copy this working tree with scp
REPO_REF=${REPO_REF:-}                               # branch/tag for REPO_URL (default branch if empty)
REMOTE_DIR=${REMOTE_DIR:-jaxfm}                      # project dir on the workers: a name under $HOME
PYTHON_VERSION=${PYTHON_VERSION:-3.11}               # jaxfm needs >=3.11; TPU VM images ship 3.10
VENV=${VENV:-venv-jaxfm}                             # venv on the workers, a name under $HOME
JAX_VERSION=${JAX_VERSION:-}                         # e.g. 0.10.2: pip install 'jax[tpu]==X' after jaxfm
EXTRA_PIP=${EXTRA_PIP:-}                             # more packages; gcsfs (gs://) comes with .[tpu]
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}                     # babysit: creates, starts and launches (waiting uses none)
SLEEP_S=${SLEEP_S:-60}                               # babysit: between state checks and job polls
WAIT_S=${WAIT_S:-86400}                              # longest wait for capacity (CREATING, WAITING_FOR_RESOURCES, ...)
RUN_S=${RUN_S:-2592000}                              # babysit: longest one launch is watched
SSH_RETRIES=${SSH_RETRIES:-10}                       # babysit: failed polls in a row on a usable TPU before relaunching
WORKER=${WORKER:-0}                                  # logs: the worker whose log to follow
STOP_WAIT_S=${STOP_WAIT_S:-120}                      # worker: SIGTERM grace before SIGKILL for a stale job
LOG_SYNC_S=${LOG_SYNC_S:-60}                         # worker: copy the job log into WORKDIR/logs this often
LIBTPU_LOCKFILE=${LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}   # worker: left behind by a killed TPU process
DRY_RUN=${DRY_RUN:-0}
DRY_RUN_STATE=${DRY_RUN_STATE:-PREEMPTED}            # the state babysit first sees in dry-run (then READY)

PREEMPTED_EXIT=143   # jaxfm's trainers after a SIGTERM save (jaxfm.runtime.PREEMPTED_EXIT): not finished
INSTALL_MARKER=.jaxfm-installed                      # in the venv; a fresh node has none
JOB_DIR=jaxfm-job                                    # under $HOME on each worker: pid, exit_code, logs
WORKER_ID_URL=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(dirname "$(dirname "$SELF")")

usage() {
  sed -n '2,15p' "$SELF" | sed 's/^# \{0,1\}//' >&2
  echo "Variables: see the top of launch/tpu.sh and launch/README.md" >&2
  exit 2
}

die() { echo "tpu.sh: $*" >&2; exit 2; }

log() { echo "[tpu.sh $(date -u +%H:%M:%S)] $*" >&2; }

check_vars() {
  local v
  for v in DRY_RUN SPOT QUEUED AUTOCHECKPOINT KEEP; do
    [[ ${!v} == [01] ]] || die "$v must be 0 or 1, not '${!v}'"
  done
  for v in MAX_ATTEMPTS WAIT_S RUN_S SSH_RETRIES WORKER STOP_WAIT_S; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, not '${!v}'"
  done
  for v in SLEEP_S LOG_SYNC_S; do
    [[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v must be a number of seconds, not '${!v}'"
  done
  for v in VENV REMOTE_DIR; do
    [[ ${!v} =~ ^[A-Za-z0-9._-]+$ ]] || die "$v must be a plain name under \$HOME, not '${!v}'"
  done
}

# One shell word, readable: bare if safe, else 'single-quoted' ($'...' if it holds a newline).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  elif [[ $1 == *$'\n'* ]]; then printf '%q' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# gcloud, or in dry-run its command line printed (shell-quoted, one line).
gc() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ gcloud'
    local a
    for a in "$@"; do printf ' '; quote "$a"; done
    printf '\n'
    return 0
  fi
  gcloud "$@"
}

nap() { [[ $DRY_RUN == 1 ]] || sleep "$SLEEP_S"; }

where=(--zone="$ZONE")
[[ -n $PROJECT ]] && where+=(--project="$PROJECT")

# on_workers all|N 'shell command' runs it on those workers (bash on the VM), output streamed here.
on_workers() { gc compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker="$1" --command="$2"; }

# The command line that runs `tpu.sh SUBCOMMAND ARGS...` from the project copy on a worker.
worker_call() {
  local line a
  line="cd ~/$REMOTE_DIR && VENV=$VENV bash launch/tpu.sh $1"
  shift
  for a in "$@"; do line+=" $(quote "$a")"; done
  printf '%s' "$line"
}

# ---------------------------------------------------------------- the TPU resource

create_tpu() {
  local track=() extra=()
  [[ $SPOT == 1 ]] && extra+=(--spot)
  if [[ $AUTOCHECKPOINT == 1 ]]; then track=(alpha); extra+=(--autocheckpoint-enabled); fi
  if [[ $QUEUED == 1 ]]; then
    gc "${track[@]}" compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${where[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${extra[@]}"
  else
    gc "${track[@]}" compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
  fi
}

delete_tpu() {
  if [[ $QUEUED == 1 ]]; then   # --force also deletes the node the queued resource created
    gc compute tpus queued-resources delete "$TPU_NAME" "${where[@]}" --force --quiet
  else
    gc compute tpus tpu-vm delete "$TPU_NAME" "${where[@]}" --quiet
  fi
}

# STOPPED: start a TPU VM again; if that fails (or for a queued resource) delete and recreate it.
start_or_recreate() {
  if [[ $QUEUED == 0 ]] && gc compute tpus tpu-vm start "$TPU_NAME" "${where[@]}"; then return 0; fi
  log "could not start $TPU_NAME: recreating it"
  delete_tpu || true
  create_tpu
}

# Sets STATE: the TPU VM's state (the queued resource's with QUEUED=1), MISSING when it does not
# exist, ERROR when describe fails otherwise.
get_state() {
  local noun=tpu-vm field=state err
  [[ $QUEUED == 1 ]] && noun=queued-resources field=state.state
  if [[ $DRY_RUN == 1 ]]; then
    gc compute tpus "$noun" describe "$TPU_NAME" "${where[@]}" --format="value($field)"
    STATE=$DRY_RUN_STATE DRY_RUN_STATE=READY
    return 0
  fi
  err=$(mktemp)
  if STATE=$(gcloud compute tpus "$noun" describe "$TPU_NAME" "${where[@]}" --format="value($field)" 2>"$err"); then
    STATE=${STATE:-UNKNOWN}
  elif grep -q NOT_FOUND "$err"; then
    STATE=MISSING
  else
    STATE=ERROR
    log "describe failed: $(tail -n 1 "$err")"
  fi
  rm -f "$err"
}

is_usable() { [[ $1 == READY || $1 == ACTIVE ]]; }

# States that pass by themselves: waiting in them spends no babysit attempt (bounded by WAIT_S).
is_waiting() {
  case $1 in
    CREATING|STARTING|RESTARTING|REPAIRING|REIMAGING|STOPPING|DELETING) return 0 ;;   # TPU VM
    ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING|SUSPENDING) return 0 ;;               # queued resource
    *) return 1 ;;
  esac
}

wait_usable() {   # until READY/ACTIVE; fails on a settled other state or after WAIT_S
  local since=$SECONDS
  while get_state && is_waiting "$STATE" && ((SECONDS - since < WAIT_S)); do
    log "$TPU_NAME is $STATE; waiting"
    nap
  done
  is_usable "$STATE" || { log "$TPU_NAME is $STATE"; return 1; }
}

# ---------------------------------------------------------------- install

copy_project() {
  if [[ -n $REPO_URL ]]; then
    on_workers all "rm -rf ~/$REMOTE_DIR && git clone --depth=1 ${REPO_REF:+--branch=$(quote "$REPO_REF") }$(quote "$REPO_URL") ~/$REMOTE_DIR"
    return
  fi
  # The working tree as git sees it (tracked + untracked, minus .gitignore'd: no .venv, runs/).
  local tmp rc=0
  tmp=$(mktemp -d)
  mkdir -p "$tmp/$REMOTE_DIR"
  { (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
       | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$tmp/$REMOTE_DIR" -xf - \
    && on_workers all "rm -rf ~/$REMOTE_DIR" \
    && gc compute tpus tpu-vm scp --recurse "$tmp/$REMOTE_DIR" "$TPU_NAME:~/" "${where[@]}" --worker=all
  } || rc=$?
  rm -rf "$tmp"
  return $rc
}

# The install on each worker: uv (official installer) makes a venv with a uv-managed Python
# PYTHON_VERSION (the image's python3 is older), installs jaxfm[tpu], then writes the marker.
install_command() {
  # shellcheck disable=SC2088  # ~ expands on the worker
  local venv="~/$VENV" pin=""
  [[ -n $JAX_VERSION ]] && pin="uv pip install --python $venv $(quote "jax[tpu]==$JAX_VERSION"); "
  printf '%s' "set -eo pipefail; rm -f $venv/$INSTALL_MARKER; export PATH=\$HOME/.local/bin:\$PATH; \
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
uv venv --allow-existing --python $PYTHON_VERSION $venv; \
cd ~/$REMOTE_DIR && uv pip install --python $venv -e '.[tpu]'${EXTRA_PIP:+ $EXTRA_PIP}; $pin\
$venv/bin/python -c 'import jax, jaxfm; print(\"jax\", jax.__version__)'; touch $venv/$INSTALL_MARKER"
}

install_project() { copy_project && on_workers all "$(install_command)"; }

ensure_installed() {   # installs unless every worker has the marker (dry-run shows the install)
  if on_workers all "test -f ~/$VENV/$INSTALL_MARKER" && [[ $DRY_RUN == 0 ]]; then return 0; fi
  log "installing jaxfm on $TPU_NAME"
  install_project
}

# ---------------------------------------------------------------- the job

# Prints --config.runtime.platform=tpu when CMD runs a jaxfm trainer that does not set the field:
# on a TPU VM it must come up on the TPU (JAX falls back to CPU quietly when the TPU is busy).
platform_flag() {
  local a trainer=0
  for a in "$@"; do
    case $a in
      --config.runtime.platform=*) return 0 ;;
      jaxfm.pretrain|jaxfm.finetune|jaxfm-pretrain) trainer=1 ;;
    esac
  done
  if ((trainer)); then printf '%s' --config.runtime.platform=tpu; fi
}

workdir_of() {   # CMD's --workdir value (either form), empty when it has none
  while (($#)); do
    case $1 in
      --workdir=*) printf '%s' "${1#--workdir=}"; return 0 ;;
      --workdir) printf '%s' "${2:-}"; return 0 ;;
    esac
    shift
  done
}

launch_job() {   # launch_job CMD...: CMD detached on every worker, after clearing a stale job
  local flag
  flag=$(platform_flag "$@")
  on_workers all "$(worker_call worker-start "$(date -u +%Y%m%dT%H%M%SZ)" "$(workdir_of "$@")" \
                      -- "$@" ${flag:+"$flag"})"
}

poll_job() {   # poll_job WORKDIR: sets JOB to worker 0's "running" | "exited RC" | "exited 0 done" | "none"
  local call out
  call=$(worker_call worker-status "$1")
  if [[ $DRY_RUN == 1 ]]; then on_workers 0 "$call"; JOB="exited 0 done"; return 0; fi
  out=$(on_workers 0 "$call") || return 1
  JOB=$(sed -n 's/^jaxfm-job: //p' <<<"$out" | tail -n 1)
}

watch_job() {   # watch_job WORKDIR: polls until the job ends (JOB says how); fails when it is lost
  local since=$SECONDS misses=0
  while ((SECONDS - since < RUN_S)); do
    nap
    if poll_job "$1"; then
      misses=0
      case $JOB in
        running) continue ;;
        exited*) return 0 ;;
        *) log "no job on worker 0 (${JOB:-no answer})"; return 1 ;;
      esac
    fi
    get_state
    is_usable "$STATE" || { log "lost the job: $TPU_NAME is $STATE"; return 1; }
    misses=$((misses + 1))
    ((misses < SSH_RETRIES)) || { log "worker 0 unreachable for $misses polls"; return 1; }
  done
  log "the job still runs after RUN_S=${RUN_S}s"
  return 1
}

run_once() {   # on a usable TPU: install if needed, launch, watch; 0 when the run is finished
  ensure_installed && launch_job "$@" && watch_job "$WORKDIR" || return 1
  case $JOB in
    "exited 0 done") return 0 ;;
    "exited 0") log "exit 0 but no $WORKDIR/DONE: not finished; relaunching" ;;
    "exited $PREEMPTED_EXIT") log "command saved after SIGTERM (exit $PREEMPTED_EXIT); relaunching" ;;
    *) log "command $JOB; relaunching" ;;
  esac
  return 1
}

act() {   # one babysit attempt from STATE; 0 when the run is finished
  case $STATE in
    READY|ACTIVE) run_once "$@" ;;
    MISSING) create_tpu || log "create failed"; return 1 ;;
    STOPPED) start_or_recreate || log "start/recreate failed"; return 1 ;;
    PREEMPTED|TERMINATED|FAILED|SUSPENDED)
      delete_tpu || log "delete failed (continuing)"
      create_tpu || log "create failed"
      return 1 ;;
    *) log "cannot act on state $STATE; checking again"; return 1 ;;
  esac
}

release() {   # a TPU bills until deleted: babysit deletes it at the end unless KEEP=1
  if [[ $KEEP == 1 ]]; then log "keeping $TPU_NAME (--keep): launch/tpu.sh delete when done"; return 0; fi
  [[ $STATE == MISSING ]] && return 0
  log "deleting $TPU_NAME"
  delete_tpu || log "delete failed: check launch/tpu.sh status and delete it by hand"
}

babysit() {
  local attempt=0 since=$SECONDS
  WORKDIR=$(workdir_of "$@")
  [[ -n $WORKDIR ]] || die "babysit: CMD needs --workdir=... (the run is finished when WORKDIR/DONE exists)"
  while ((attempt < MAX_ATTEMPTS)); do
    get_state
    if is_waiting "$STATE"; then
      ((SECONDS - since < WAIT_S)) || { log "$TPU_NAME still $STATE after WAIT_S=${WAIT_S}s"; break; }
      log "$TPU_NAME is $STATE; waiting (no attempt used)"
      nap
      continue
    fi
    attempt=$((attempt + 1))
    log "attempt $attempt/$MAX_ATTEMPTS: $TPU_NAME is $STATE"
    if act "$@"; then
      log "finished: the command exited 0 and $WORKDIR/DONE exists"
      release
      return 0
    fi
    since=$SECONDS
    nap
  done
  log "giving up"
  release
  return 1
}

# ---------------------------------------------------------------- worker side
# These run on each TPU VM, from its project copy (worker_call), in $HOME/$JOB_DIR.

job_file() { printf '%s' "$HOME/$JOB_DIR/$1"; }

job_pid() {   # the running job's pid (leader of its process group); fails when none runs
  local pid
  pid=$(cat "$(job_file pid)" 2>/dev/null) || return 1
  grep -qa worker-main "/proc/$pid/cmdline" 2>/dev/null || return 1   # gone, or a reused pid
  printf '%s' "$pid"
}

worker_number() { curl -sf -m 5 -H Metadata-Flavor:Google "$WORKER_ID_URL" || hostname; }

worker_stop() {   # SIGTERM the job's process group (jaxfm saves), SIGKILL after STOP_WAIT_S
  local pid i
  pid=$(job_pid) || return 0
  echo "jaxfm-job: stopping job $pid"
  kill -TERM -- "-$pid" 2>/dev/null || return 0
  for ((i = 0; i < STOP_WAIT_S * 10; i++)); do
    job_pid >/dev/null || return 0
    sleep 0.1
  done
  echo "jaxfm-job: job $pid still runs after ${STOP_WAIT_S}s: SIGKILL"
  kill -KILL -- "-$pid" 2>/dev/null || true
}

worker_start() {   # worker_start STAMP WORKDIR -- CMD...: stale job and libtpu lock cleared, CMD detached
  local stamp=$1 workdir=$2 w log i
  shift 2
  [[ ${1:-} == -- ]] && shift
  mkdir -p "$HOME/$JOB_DIR"
  worker_stop
  rm -f "$LIBTPU_LOCKFILE" 2>/dev/null || sudo -n rm -f "$LIBTPU_LOCKFILE"
  rm -f "$(job_file exit_code)"
  w=$(worker_number)
  log=$(job_file "$stamp-worker-$w.log")
  ln -sfn "$log" "$(job_file log)"
  setsid nohup bash "$SELF" worker-main "$workdir" "$log" -- "$@" </dev/null >>"$log" 2>&1 &
  echo $! >"$(job_file pid)"
  for ((i = 0; i < 100; i++)); do   # until the job shows (exec'd) or has ended, so a poll sees it
    if job_pid >/dev/null || [[ -f $(job_file exit_code) ]]; then
      echo "jaxfm-job: started on worker $w (pid $!), log $log"
      return 0
    fi
    sleep 0.1
  done
  echo "jaxfm-job: the job did not start on worker $w; see $log"
  return 1
}

sync_log() {   # sync_log WORKDIR LOG: the worker's log into WORKDIR/logs/ (local or gs://)
  python -c 'import sys; from etils import epath
dest = epath.Path(sys.argv[1]) / "logs" / epath.Path(sys.argv[2]).name
dest.parent.mkdir(parents=True, exist_ok=True)
dest.write_bytes(epath.Path(sys.argv[2]).read_bytes())' "$1" "$2" \
    || echo "jaxfm-job: could not copy $2 into $1/logs"
}

worker_main() {   # the detached job: CMD in the venv, log synced into WORKDIR/logs, exit status kept
  local workdir=$1 log=$2 rc=0 syncer=""
  shift 2
  [[ ${1:-} == -- ]] && shift
  trap true TERM   # SIGTERM is for CMD (same process group); this shell lives on to record its exit
  echo "jaxfm-job: $(date -u +%FT%TZ) start: $*"
  export VIRTUAL_ENV=$HOME/$VENV PATH=$HOME/$VENV/bin:$PATH   # the venv, as its activate script sets it
  export JAXFM_DISTRIBUTED=1   # jaxfm calls jax.distributed.initialize(): Cloud TPU finds the other workers
  if [[ -n $workdir ]]; then
    (while sleep "$LOG_SYNC_S" && kill -0 $$ 2>/dev/null; do sync_log "$workdir" "$log"; done) &
    syncer=$!
  fi
  "$@" || rc=$?
  echo "jaxfm-job: $(date -u +%FT%TZ) exit $rc"
  if [[ -n $syncer ]]; then
    kill "$syncer" 2>/dev/null || true
    sync_log "$workdir" "$log"
  fi
  echo "$rc" >"$(job_file exit_code.tmp)"
  mv "$(job_file exit_code.tmp)" "$(job_file exit_code)"
}

worker_status() {   # worker_status WORKDIR: "jaxfm-job: running | exited RC | exited 0 done | none"
  local rc
  if [[ -f $(job_file exit_code) ]]; then
    rc=$(<"$(job_file exit_code)")
    if [[ $rc == 0 && -n $1 ]] && workdir_done "$1"; then echo "jaxfm-job: exited 0 done"
    else echo "jaxfm-job: exited $rc"; fi
  elif job_pid >/dev/null; then echo "jaxfm-job: running"
  else echo "jaxfm-job: none"; fi
}

workdir_done() {   # WORKDIR/DONE exists (jaxfm writes it when train.steps is reached)
  "$HOME/$VENV/bin/python" -c 'import sys; from etils import epath
sys.exit(not (epath.Path(sys.argv[1]) / "DONE").exists())' "$1"
}

worker_log() {   # this worker's job log, followed while the job runs
  local log tailer
  log=$(job_file log)
  [[ -e $log ]] || { echo "tpu.sh: no job log on this worker ($log)" >&2; return 1; }
  tail -n +1 -F "$log" &
  tailer=$!
  while job_pid >/dev/null; do sleep 1; done
  sleep 1   # the last lines
  kill "$tailer"
}

# ---------------------------------------------------------------- command line

# Parses "[--] CMD..." into CMD=(...); usage when empty.
need_cmd() {
  [[ ${1:-} == -- ]] && shift
  (($# > 0)) || usage
  CMD=("$@")
}

(($# > 0)) || usage
check_vars
sub=$1; shift
case $sub in
  create)  case "$*" in --autocheckpoint) AUTOCHECKPOINT=1 ;; "") ;; *) usage ;; esac
           create_tpu && { [[ $QUEUED == 0 ]] || wait_usable; } ;;
  install) (($# == 0)) || usage; install_project ;;
  status)  (($# == 0)) || usage; get_state; echo "$STATE" ;;
  start)   (($# == 0)) || usage; gc compute tpus tpu-vm start "$TPU_NAME" "${where[@]}" ;;
  delete)  (($# == 0)) || usage; delete_tpu ;;
  logs)    (($# == 0)) || usage; on_workers "$WORKER" "$(worker_call worker-log)" ;;
  stop)    (($# == 0)) || usage; on_workers all "$(worker_call worker-stop)" ;;
  run)     need_cmd "$@"; launch_job "${CMD[@]}"
           log "started; follow it with: launch/tpu.sh logs" ;;
  babysit) while [[ ${1:-} == --keep || ${1:-} == --autocheckpoint ]]; do
             if [[ $1 == --keep ]]; then KEEP=1; else AUTOCHECKPOINT=1; fi
             shift
           done
           need_cmd "$@"; babysit "${CMD[@]}" ;;
  worker-start|worker-main|worker-status|worker-stop|worker-log) "${sub//-/_}" "$@" ;;
  -h|--help|help) usage ;;
  *) echo "tpu.sh: unknown subcommand '$sub'" >&2; usage ;;
esac
