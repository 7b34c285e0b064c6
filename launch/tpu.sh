#!/usr/bin/env bash
# Cloud TPU VM launcher for jaxfm. See launch/README.md for the runbook.
#
#   launch/tpu.sh create | install | status | delete
#   launch/tpu.sh run -- CMD...       same CMD on every worker, tee'd to logs/ on each worker
#   launch/tpu.sh logs                copy every worker's logs/ to ./logs/$TPU_NAME/
#   launch/tpu.sh babysit -- CMD...   (re)create + install when preempted/missing, rerun CMD until it exits 0
#                                     (finished; 143 is a preemption save: rerun)
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
REPO_URL=${REPO_URL:-}                               # empty: copy this working tree with scp
REPO_REF=${REPO_REF:-}                               # branch/tag for REPO_URL (default branch if empty)
REMOTE_DIR=${REMOTE_DIR:-jaxfm}                      # project dir on the workers: a name under $HOME
PYTHON_VERSION=${PYTHON_VERSION:-3.11}               # jaxfm needs >=3.11; TPU VM images ship 3.10
VENV=${VENV:-venv-jaxfm}                             # venv on the workers, relative to $HOME
JAX_VERSION=${JAX_VERSION:-}                         # e.g. 0.10.2: pip install 'jax[tpu]==X' after jaxfm
EXTRA_PIP=${EXTRA_PIP:-}                             # more packages; gcsfs (gs://) comes with .[tpu]
RUN_NAME=${RUN_NAME:-run}                            # log file stem: logs/$RUN_NAME-worker-N.log
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}
SLEEP_S=${SLEEP_S:-60}
QUEUED_WAIT_S=${QUEUED_WAIT_S:-3600}                 # create with QUEUED=1 waits this long for ACTIVE
DRY_RUN=${DRY_RUN:-0}
DRY_RUN_STATE=${DRY_RUN_STATE:-PREEMPTED}            # the state babysit pretends to see in dry-run

PREEMPTED_EXIT=143   # jaxfm's trainers after a SIGTERM save (jaxfm.runtime.PREEMPTED_EXIT): not finished
WORKER_ID_URL=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  echo "Variables: TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION SPOT QUEUED REPO_URL" \
       "REPO_REF JAX_VERSION EXTRA_PIP RUN_NAME MAX_ATTEMPTS SLEEP_S DRY_RUN (see the top of this file)" >&2
  exit 2
}

log() { echo "[tpu.sh $(date -u +%H:%M:%S)] $*" >&2; }

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

where=(--zone="$ZONE")
[[ -n $PROJECT ]] && where+=(--project="$PROJECT")

# ssh_all 'shell command' runs it on every worker (bash on the VM), output streamed here.
ssh_all() { gc compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"; }

create_tpu() {
  local extra=()
  [[ $SPOT == 1 ]] && extra+=(--spot)
  if [[ $QUEUED == 1 ]]; then
    gc compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" "${where[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${extra[@]}" \
      && wait_active
  else
    gc compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
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

# Sets STATE: READY/ACTIVE when usable, PREEMPTED, MISSING (describe failed), or a transient state.
get_state() {
  local noun=(tpu-vm) field=state
  [[ $QUEUED == 1 ]] && noun=(queued-resources) field=state.state
  if [[ $DRY_RUN == 1 ]]; then
    gc compute tpus "${noun[@]}" describe "$TPU_NAME" "${where[@]}" --format="value($field)"
    STATE=$DRY_RUN_STATE
    return 0
  fi
  STATE=$(gcloud compute tpus "${noun[@]}" describe "$TPU_NAME" "${where[@]}" \
          --format="value($field)" 2>/dev/null) || STATE=MISSING
  STATE=${STATE:-MISSING}
}

wait_active() {   # a queued resource is usable once ACTIVE
  local deadline=$((SECONDS + QUEUED_WAIT_S))
  while :; do
    get_state
    [[ $DRY_RUN == 1 || $STATE == ACTIVE ]] && return 0
    case $STATE in FAILED|SUSPENDED|MISSING) log "queued resource is $STATE"; return 1 ;; esac
    ((SECONDS < deadline)) || { log "still $STATE after ${QUEUED_WAIT_S}s"; return 1; }
    log "queued resource $STATE; waiting"
    sleep 30
  done
}

copy_project() {
  if [[ -n $REPO_URL ]]; then
    local q_url q_dir
    q_url=$(printf '%q' "$REPO_URL"); q_dir=$(printf '%q' "$REMOTE_DIR")
    ssh_all "rm -rf ~/$q_dir && git clone --depth=1 ${REPO_REF:+--branch=$(printf '%q' "$REPO_REF") }$q_url ~/$q_dir"
    return
  fi
  # The working tree as git sees it (tracked + untracked, minus .gitignore'd: no .venv, runs/).
  local tmp rc=0
  tmp=$(mktemp -d)
  mkdir -p "$tmp/$REMOTE_DIR"
  { (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
       | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$tmp/$REMOTE_DIR" -xf - \
    && ssh_all "rm -rf ~/$(printf '%q' "$REMOTE_DIR")" \
    && gc compute tpus tpu-vm scp --recurse "$tmp/$REMOTE_DIR" "$TPU_NAME:~/" "${where[@]}" --worker=all
  } || rc=$?
  rm -rf "$tmp"
  return $rc
}

install_project() {
  local pin=""
  [[ -n $JAX_VERSION ]] && pin=" && uv pip install --python ~/$VENV 'jax[tpu]==$JAX_VERSION'"
  copy_project && ssh_all "set -e; python3 -m pip install --user -q -U uv; export PATH=\$HOME/.local/bin:\$PATH; \
uv venv --allow-existing --python $PYTHON_VERSION ~/$VENV; \
cd ~/$REMOTE_DIR && uv pip install --python ~/$VENV -e '.[tpu]' $EXTRA_PIP$pin; \
~/$VENV/bin/python -c 'import jax, jaxfm; print(\"jax\", jax.__version__)'"
}

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

run_cmd() {   # run_cmd CMD...: same command on every worker, exit status of the command
  local cmd="" a flag
  flag=$(platform_flag "$@")
  for a in "$@" ${flag:+"$flag"}; do cmd+="$(quote "$a") "; done
  # JAXFM_DISTRIBUTED=1: jaxfm calls jax.distributed.initialize() (TPU auto-detection) on every worker.
  ssh_all "set -o pipefail; source ~/$VENV/bin/activate; export JAXFM_DISTRIBUTED=1; cd ~/$REMOTE_DIR && mkdir -p logs; \
W=\$(curl -sf -m 5 -H Metadata-Flavor:Google $WORKER_ID_URL || hostname); \
{ $cmd; } 2>&1 | tee -a logs/$RUN_NAME-worker-\$W.log"
}

collect_logs() {
  local dest="logs/$TPU_NAME"
  [[ $DRY_RUN == 1 ]] || mkdir -p "$dest"
  gc compute tpus tpu-vm scp --recurse "$TPU_NAME:~/$REMOTE_DIR/logs/*" "$dest/" "${where[@]}" --worker=all
}

babysit() {
  local attempt rc
  for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
    get_state
    log "attempt $attempt/$MAX_ATTEMPTS: $TPU_NAME is $STATE"
    case $STATE in
      READY|ACTIVE) ;;
      PREEMPTED|TERMINATED|MISSING|FAILED|SUSPENDED)
        if [[ $STATE != MISSING ]]; then delete_tpu || log "delete failed (continuing)"; fi
        if ! { create_tpu && install_project; }; then
          log "create/install failed"
          [[ $DRY_RUN == 1 ]] && return 1
          sleep "$SLEEP_S"; continue
        fi ;;
      *) log "transient state $STATE; waiting"
         [[ $DRY_RUN == 1 ]] && return 1
         sleep "$SLEEP_S"; continue ;;
    esac
    rc=0
    run_cmd "$@" || rc=$?
    if ((rc == 0)); then log "command exited 0: finished${DRY_RUN/#1/ (dry-run: not run)}"; return 0; fi
    if ((rc == PREEMPTED_EXIT)); then log "command saved after SIGTERM (exit $rc); relaunching"
    else log "command failed (exit $rc) or the connection dropped"; fi
    [[ $DRY_RUN == 1 ]] && return 0   # dry-run: a single iteration
    sleep "$SLEEP_S"
  done
  log "giving up after $MAX_ATTEMPTS attempts"
  return 1
}

# Parses "[--] CMD..." into CMD=(...); usage when empty.
need_cmd() {
  [[ ${1:-} == -- ]] && shift
  (($# > 0)) || usage
  CMD=("$@")
}

[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || usage
(($# > 0)) || usage
sub=$1; shift
case $sub in
  create)  (($# == 0)) || usage; create_tpu ;;
  install) (($# == 0)) || usage; install_project ;;
  status)  (($# == 0)) || usage; get_state; echo "$STATE" ;;
  delete)  (($# == 0)) || usage; delete_tpu ;;
  logs)    (($# == 0)) || usage; collect_logs ;;
  run)     need_cmd "$@"; run_cmd "${CMD[@]}" ;;
  babysit) need_cmd "$@"; babysit "${CMD[@]}" ;;
  -h|--help|help) usage ;;
  *) echo "tpu.sh: unknown subcommand '$sub'" >&2; usage ;;
esac
