#!/usr/bin/env bash
# Stop what the scripts started, by PID: every background worker (SIGINT twice: a Prefect worker
# needs two), then the server (SIGINT). Each escalates to SIGTERM / SIGKILL of its process group after
# DGPT_PREFECT_STOP_WAIT seconds (default 10) per signal.
#
#   deploy/prefect/stop.sh                # workers, then the server
#   deploy/prefect/stop.sh --workers      # workers only
#   deploy/prefect/stop.sh --worker POOL  # one pool's worker
set -euo pipefail
# shellcheck source=deploy/prefect/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop_workers() {
  local pidfile pool
  for pidfile in "$DGPT_PREFECT_DIR"/worker-*.pid; do
    [ -e "$pidfile" ] || continue
    pool="$(basename "$pidfile" .pid)"
    stop_pid "${pool/-/ }" "$pidfile" INT INT
  done
}

case "${1:-}" in
  "")
    stop_workers
    stop_pid server "$DGPT_PREFECT_DIR/server.pid" INT INT
    rm -f "$DGPT_PREFECT_DIR/api_url" "$DGPT_PREFECT_DIR/env.sh"
    ;;
  --workers) stop_workers ;;
  --worker)
    [ -n "${2:-}" ] || { echo "usage: $0 [--workers | --worker POOL]" >&2; exit 2; }
    stop_pid "worker $2" "$DGPT_PREFECT_DIR/worker-$2.pid" INT INT
    ;;
  *) echo "usage: $0 [--workers | --worker POOL]" >&2; exit 2 ;;
esac
