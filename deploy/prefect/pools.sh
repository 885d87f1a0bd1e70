#!/usr/bin/env bash
# Create the process work pools of prefect.yaml (default: cpu-pool gpu-pool) unless they exist.
# Existing pools are left as they are (their base job template may have been customised).
#
#   deploy/prefect/pools.sh [POOL...]
#
# A pool-wide cap on concurrent runs: DGPT_GPU_POOL_LIMIT=N (applied to gpu-pool).
set -euo pipefail
# shellcheck source=deploy/prefect/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_prefect
use_api

pools=("$@")
[ ${#pools[@]} -gt 0 ] || pools=(cpu-pool gpu-pool)
for pool in "${pools[@]}"; do
  if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
    log "work pool $pool exists"
  else
    prefect --no-prompt work-pool create "$pool" --type process >/dev/null
    log "work pool $pool created (type process)"
  fi
  if [ "$pool" = gpu-pool ] && [ -n "${DGPT_GPU_POOL_LIMIT:-}" ]; then
    prefect work-pool set-concurrency-limit "$pool" "$DGPT_GPU_POOL_LIMIT" >/dev/null
    log "work pool $pool: concurrency limit $DGPT_GPU_POOL_LIMIT"
  fi
done
