#!/usr/bin/env bash
# Register the deployments of prefect.yaml with the server (all, or the named ones).
#
#   deploy/prefect/deploy.sh              # prefect --no-prompt deploy --all
#   deploy/prefect/deploy.sh smoke        # prefect --no-prompt deploy --name smoke
#
# DGPT_ROOT is unset for `prefect deploy` so that the pull step's {{ $DGPT_ROOT }} stays a
# placeholder and is resolved on each worker at run time (worker.sh exports the worker's checkout).
set -euo pipefail
# shellcheck source=deploy/prefect/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_prefect
use_api
cd "$DGPT_ROOT"

args=()
if [ $# -eq 0 ]; then
  args=(--all)
else
  for name in "$@"; do args+=(--name "$name"); done
fi
log "deploying ${*:-all deployments} from $DGPT_ROOT/prefect.yaml to $PREFECT_API_URL"
env -u DGPT_ROOT timeout "${DGPT_PREFECT_DEPLOY_TIMEOUT:-300}" prefect --no-prompt deploy "${args[@]}" \
  || die "prefect deploy failed (are the work pools there? deploy/prefect/pools.sh)"
