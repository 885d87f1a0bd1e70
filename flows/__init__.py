"""Prefect flows: the `pretrain-sft` pipeline and its orchestration helpers (caching keys,
MLflow tracking, launching, reporting). The library they orchestrate is `dgpt_core`."""
