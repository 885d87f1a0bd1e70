"""The top layer: the `pretrain-sft` Prefect flow and its orchestration helpers (stage plan,
caching keys, MLflow tracking, report card) and the `dgpt` command's dispatcher. The flow runs the
Prefect tasks of `tasks/`, which call the library (`dgpt_core`), `eval` and `deploy`."""

import os

# Prefect's temporary server gets 20 s to start by default; a first run (creating and migrating
# its database) on 2 busy cores can take longer. Set before any prefect import reads its settings.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
