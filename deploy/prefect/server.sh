#!/usr/bin/env bash
# A local Prefect server on 127.0.0.1 (loopback only), run in the background.
#
#   deploy/prefect/server.sh start    start (no-op when already running), wait until /api/health answers
#   deploy/prefect/server.sh status   print the API URL and PID; exit 1 when not running/healthy
#   deploy/prefect/server.sh stop     stop it by PID (workers: deploy/prefect/stop.sh)
#
# Writes $DGPT_PREFECT_DIR/server.pid, server.log, api_url and env.sh (`source` it to point the
# prefect CLI at this server). Settings: see common.sh (DGPT_PREFECT_PORT, PREFECT_HOME, ...).
set -euo pipefail
# shellcheck source=deploy/prefect/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PIDFILE="$DGPT_PREFECT_DIR/server.pid"
LOGFILE="$DGPT_PREFECT_DIR/server.log"

local_url() { [ -s "$DGPT_PREFECT_DIR/api_url" ] && cat "$DGPT_PREFECT_DIR/api_url" || true; }

status() {
  local pid url
  pid="$(read_pid "$PIDFILE")"
  url="$(local_url)"
  if is_prefect_pid "$pid" && [ -n "$url" ] && healthy "$url"; then
    echo "running: PID $pid, PREFECT_API_URL=$url"
    return 0
  fi
  echo "not running"
  return 1
}

start() {
  require_prefect
  if status >/dev/null; then
    log "server already running: $(status)"
    return 0
  fi
  local old_pid port url pid waited
  old_pid="$(read_pid "$PIDFILE")"
  is_prefect_pid "$old_pid" && die "server PID $old_pid is alive but not healthy: deploy/prefect/server.sh stop, then start"
  rm -f "$PIDFILE" "$DGPT_PREFECT_DIR/api_url"

  if [ -n "${DGPT_PREFECT_PORT:-}" ]; then
    port="$DGPT_PREFECT_PORT"
    ! port_in_use "$port" || die "port $port on 127.0.0.1 is in use (set DGPT_PREFECT_PORT to another port)"
  else
    port=4200
    if port_in_use "$port"; then
      port="$(free_port)"
      log "port 4200 is in use; using $port"
    fi
  fi
  url="http://127.0.0.1:$port/api"

  log "starting Prefect server on $url (PREFECT_HOME=$PREFECT_HOME, log: $LOGFILE)"
  # own session and process group (group id = PID), detached from this shell's terminal;
  # PREFECT_API_URL of the caller must not leak into the server
  (
    unset PREFECT_API_URL
    cd "$DGPT_PREFECT_DIR"
    exec setsid prefect server start --host 127.0.0.1 --port "$port" --analytics-off \
      </dev/null >"$LOGFILE" 2>&1
  ) &
  pid=$!
  echo "$pid" >"$PIDFILE"

  waited=0
  until healthy "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      tail -n 30 "$LOGFILE" >&2 || true
      die "the Prefect server exited during startup (log above: $LOGFILE)"
    fi
    if [ "$waited" -ge "$DGPT_PREFECT_TIMEOUT" ]; then
      tail -n 30 "$LOGFILE" >&2 || true
      stop_pid server "$PIDFILE" INT
      die "the Prefect server was not healthy after ${DGPT_PREFECT_TIMEOUT}s (log: $LOGFILE)"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "$url" >"$DGPT_PREFECT_DIR/api_url"
  cat >"$DGPT_PREFECT_DIR/env.sh" <<EOF
# source this file to point the prefect CLI at the local server
export PREFECT_HOME="$PREFECT_HOME"
export PREFECT_API_URL="$url"
EOF
  log "server healthy after ${waited}s: PID $pid"
  log "use it from a shell: source $DGPT_PREFECT_DIR/env.sh"
  echo "$url"
}

case "${1:-}" in
  start) start ;;
  status) status ;;
  stop) stop_pid server "$PIDFILE" INT INT && rm -f "$DGPT_PREFECT_DIR/api_url" "$DGPT_PREFECT_DIR/env.sh" ;;
  *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
