#!/usr/bin/env bash
# The main job: the tiny preset end to end, offline, on CPU. Extra arguments go to `dgpt train`.
source "$(dirname "$0")/bootstrap.sh"
exec dgpt train --preset tiny "$@"
