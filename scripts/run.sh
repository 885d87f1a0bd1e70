#!/usr/bin/env bash
# The main job: the tiny preset through the whole pipeline (data, pretrain, SFT, eval, publish dry
# run), offline, on CPU. Extra arguments go to `dgpt run` (e.g. --set sft.max_steps=500).
source "$(dirname "$0")/bootstrap.sh"
exec dgpt run --preset tiny "$@"
