# Sourced by deploy/prefect/*.sh: paths, environment and helpers shared by the local Prefect scripts.
#
# Settings (environment variables):
#   DGPT_PREFECT_DIR      state folder: PID files, logs, api_url, env.sh (default: <repo>/.cache/prefect-local)
#   PREFECT_HOME          Prefect's home (profiles, SQLite database) (default: $DGPT_PREFECT_DIR/home)
#   DGPT_PREFECT_PORT     server port on 127.0.0.1 (default 4200; when unset and 4200 is taken, a free port)
#   DGPT_PREFECT_TIMEOUT  seconds to wait for the server / a worker to come up (default 90)
#   PREFECT_API_URL       when set, the scripts talk to that server instead of the local one
# shellcheck shell=bash
set -euo pipefail

DGPT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export DGPT_ROOT
DGPT_PREFECT_DIR="$(mkdir -p "${DGPT_PREFECT_DIR:-$DGPT_ROOT/.cache/prefect-local}" && cd "${DGPT_PREFECT_DIR:-$DGPT_ROOT/.cache/prefect-local}" && pwd)"
export DGPT_PREFECT_DIR
export PREFECT_HOME="${PREFECT_HOME:-$DGPT_PREFECT_DIR/home}"
mkdir -p "$PREFECT_HOME"
DGPT_PREFECT_TIMEOUT="${DGPT_PREFECT_TIMEOUT:-90}"

# quiet: no telemetry, no analytics (offline switches are per deployment: see prefect.yaml)
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
export HF_HUB_DISABLE_TELEMETRY=1 HF_UPDATE_DOWNLOAD_COUNTS=0 TOKENIZERS_PARALLELISM=false

# the project's virtualenv unless one is active (worker.sh --setup creates it)
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$DGPT_ROOT/.venv/bin/python" ]; then
  # shellcheck disable=SC1091
  source "$DGPT_ROOT/.venv/bin/activate"
fi

PY="$(command -v python || command -v python3)"

log() { echo "[dgpt-prefect] $*" >&2; }
die() { echo "[dgpt-prefect] error: $*" >&2; exit 1; }

require_prefect() {
  command -v prefect >/dev/null 2>&1 \
    || die "the prefect CLI is not on PATH: activate the project's virtualenv (or run deploy/prefect/worker.sh --setup)"
}

# is PID alive and a prefect process (guards against a stale PID file whose PID was reused)?
is_prefect_pid() {
  local pid="$1"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q prefect
}

read_pid() { [ -f "$1" ] && tr -dc '0-9' <"$1" || true; }

# the API URL: $PREFECT_API_URL if set, else the local server's (written by server.sh start)
api_url() {
  if [ -n "${PREFECT_API_URL:-}" ]; then
    echo "$PREFECT_API_URL"
  elif [ -s "$DGPT_PREFECT_DIR/api_url" ]; then
    cat "$DGPT_PREFECT_DIR/api_url"
  else
    die "no Prefect server: start one with deploy/prefect/server.sh start (or set PREFECT_API_URL)"
  fi
}

healthy() { curl -fsS --max-time 3 "$1/health" 2>/dev/null | grep -q true; }

use_api() {
  PREFECT_API_URL="$(api_url)"
  export PREFECT_API_URL
  healthy "$PREFECT_API_URL" || die "the Prefect server at $PREFECT_API_URL is not healthy (deploy/prefect/server.sh status)"
}

port_in_use() {
  "$PY" - "$1" <<'EOF'
import socket, sys
with socket.socket() as s:
    sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
EOF
}

free_port() {
  "$PY" - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

# stop_pid NAME PIDFILE SIGNAL...: send each signal to the process (a few seconds apart while it is
# alive), then SIGTERM and SIGKILL to its process group (started with setsid, so group id = PID)
stop_pid() {
  local name="$1" pidfile="$2" pid sig waited
  shift 2
  pid="$(read_pid "$pidfile")"
  if ! is_prefect_pid "$pid"; then
    [ -f "$pidfile" ] && log "$name: not running (stale PID file removed)"
    rm -f "$pidfile"
    return 0
  fi
  log "$name: stopping PID $pid"
  for sig in "$@" TERM KILL; do
    case "$sig" in
      TERM | KILL) kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true ;;
      *) kill "-$sig" "$pid" 2>/dev/null || true ;;
    esac
    waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "${DGPT_PREFECT_STOP_WAIT:-10}" ]; do
      sleep 1
      waited=$((waited + 1))
    done
    kill -0 "$pid" 2>/dev/null || break
    [ "$sig" = KILL ] || log "$name: still running after SIG$sig"
  done
  # children left in the group (e.g. a flow run of a stopped worker)
  kill -TERM -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
  log "$name: stopped"
}
