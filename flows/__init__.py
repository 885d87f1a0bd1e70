"""Prefect flows: the `pretrain-sft` pipeline and its orchestration helpers (caching keys,
MLflow tracking, launching, reporting). The library they orchestrate is `dgpt_core`."""

import os

# Prefect's temporary server gets 20 s to start by default; a first run (creating and migrating
# its database) on 2 busy cores can take longer. Set before any prefect import reads its settings.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
