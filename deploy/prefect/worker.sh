#!/usr/bin/env bash
# A Prefect process worker for a work pool of prefect.yaml.
#
#   deploy/prefect/worker.sh POOL [--setup] [--run-once | --foreground] [-- ARGS for prefect worker start]
#
#   (default)     start in the background; PID file $DGPT_PREFECT_DIR/worker-POOL.pid, log worker-POOL.log;
#                 returns once the worker has started polling (stop: deploy/prefect/stop.sh)
#   --run-once    poll once in the foreground, run what is scheduled, exit with the worker's status
#   --foreground  run in the foreground (e.g. under systemd or tmux)
#   --setup       first create/refresh the project's virtualenv with scripts/bootstrap.sh (torch from
#                 TORCH_SPEC, e.g. the CUDA build on GPU machines), then use it
#
# The worker exports DGPT_ROOT (this checkout) for the deployments' pull step, and its flow runs use
# this virtualenv's Python and inherit this environment (HF_TOKEN, MLFLOW_TRACKING_URI, ...) plus the
# deployment's job variables. Talks to $PREFECT_API_URL, else the local server of server.sh.
# Name: DGPT_WORKER_NAME (default HOST-POOL).
set -euo pipefail
# shellcheck source=deploy/prefect/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { echo "usage: $0 POOL [--setup] [--run-once | --foreground] [-- ARGS for prefect worker start]" >&2; exit 2; }
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
POOL="$1"
shift
mode=background
setup=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --run-once) mode=once ;;
    --foreground) mode=foreground ;;
    --setup) setup=1 ;;
    --) shift; extra=("$@"); break ;;
    *) usage ;;
  esac
  shift
done

if [ "$setup" = 1 ]; then
  log "setting up the environment (scripts/bootstrap.sh, TORCH_SPEC=${TORCH_SPEC:-default})"
  bash "$DGPT_ROOT/scripts/bootstrap.sh"
  if [ -z "${VIRTUAL_ENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$DGPT_ROOT/.venv/bin/activate"
  fi
fi
require_prefect
use_api
cd "$DGPT_ROOT"

NAME="${DGPT_WORKER_NAME:-$(hostname)-$POOL}"
cmd=(prefect --no-prompt worker start --pool "$POOL" --type process --name "$NAME" --install-policy never)
PIDFILE="$DGPT_PREFECT_DIR/worker-$POOL.pid"
LOGFILE="$DGPT_PREFECT_DIR/worker-$POOL.log"

case "$mode" in
  once)
    log "worker $NAME: one poll of $POOL"
    exec "${cmd[@]}" --run-once "${extra[@]}"
    ;;
  foreground)
    log "worker $NAME polling $POOL (Ctrl-C twice to stop)"
    exec "${cmd[@]}" "${extra[@]}"
    ;;
esac

pid="$(read_pid "$PIDFILE")"
if is_prefect_pid "$pid"; then
  log "worker for $POOL already running: PID $pid (log: $LOGFILE)"
  exit 0
fi
log "starting worker $NAME for $POOL in the background (log: $LOGFILE)"
(exec setsid "${cmd[@]}" "${extra[@]}" </dev/null >"$LOGFILE" 2>&1) &
pid=$!
echo "$pid" >"$PIDFILE"

waited=0
until grep -q "started" "$LOGFILE" 2>/dev/null; do
  if ! kill -0 "$pid" 2>/dev/null; then
    rm -f "$PIDFILE"
    tail -n 30 "$LOGFILE" >&2 || true
    die "the worker exited during startup (log above: $LOGFILE)"
  fi
  if [ "$waited" -ge "$DGPT_PREFECT_TIMEOUT" ]; then
    tail -n 30 "$LOGFILE" >&2 || true
    stop_pid "worker $POOL" "$PIDFILE" INT INT
    die "the worker did not start within ${DGPT_PREFECT_TIMEOUT}s (log: $LOGFILE)"
  fi
  sleep 1
  waited=$((waited + 1))
done
log "worker $NAME polling $POOL: PID $pid"
