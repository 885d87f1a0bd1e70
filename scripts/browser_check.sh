#!/usr/bin/env bash
# The chat page in a real (headless) browser: installs Chromium from Debian when missing, starts
# `dgpt serve MODEL_DIR`, sends a message from the page, saves a screenshot once the answer is done.
#   scripts/browser_check.sh [MODEL_DIR] [--message TEXT] [--out runs/browser_check/chat.png]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR="${1:-runs/latest/models/sft}"
shift || true
if ! command -v chromium >/dev/null 2>&1; then
  echo "[browser_check] installing chromium from Debian"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi
source scripts/bootstrap.sh
exec python -m deploy.serve.browser_check "$MODEL_DIR" "$@"
