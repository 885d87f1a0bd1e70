#!/usr/bin/env bash
# The test suite (fast tests; slow ones: scripts/test.sh -m slow). Creates its environment itself.
source "$(dirname "$0")/bootstrap.sh"
exec python -m pytest "$@"
