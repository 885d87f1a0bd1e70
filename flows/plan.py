"""The stages of the pretrain-sft flow and which of them a run executes or recomputes
(no Prefect import, so the `dgpt run` parser loads fast)."""

from __future__ import annotations

from pydantic import BaseModel, Field

FLOW_STAGES = ("data", "pretrain", "sft", "rl", "eval", "publish")
UPSTREAM = {"data": (), "pretrain": ("data",), "sft": ("data", "pretrain"), "rl": ("data", "pretrain", "sft"),
            "eval": ("data", "pretrain", "sft", "rl"), "publish": ("sft", "rl", "eval")}


def plan_stages(from_stage: str | None, only: list[str] | None, refresh: list[str] | None) -> tuple[list[str], set[str]]:
    """(stages to run in order, stages forced to recompute). `only` runs just those stages (their
    upstream stages run too, normally from the cache); `from_stage` recomputes it and everything
    after; `refresh` recomputes the named stages."""
    for name in [*(only or []), *(refresh or []), *([from_stage] if from_stage else [])]:
        if name not in FLOW_STAGES:
            raise ValueError(f"unknown stage {name!r}: expected one of {FLOW_STAGES}")
    forced = set(refresh or [])
    if only:
        wanted, stack = set(only), list(only)
        while stack:
            for dep in UPSTREAM[stack.pop()]:
                if dep not in wanted:
                    wanted.add(dep)
                    stack.append(dep)
        return [s for s in FLOW_STAGES if s in wanted], forced | set(only)
    if from_stage:
        forced |= set(FLOW_STAGES[FLOW_STAGES.index(from_stage):])
    return list(FLOW_STAGES), forced


class SweepTrial(BaseModel):
    """What makes a pretrain-sft run a trial of a sweep (flows/sweep.py): it skips publishing,
    nests its MLflow run under the sweep's, and may report its validation curve to Optuna."""

    sweep: str
    """The sweep's name (tag `dgpt.sweep` of the trial's MLflow run)."""
    number: int
    """The trial's setting number in the sweep (tag `dgpt.trial`)."""
    seed: int
    """The trial's seed (tag `dgpt.seed`)."""
    mlflow_parent_run_id: str | None = None
    """The sweep's MLflow run, under which the trial's run is nested."""
    pruning_env: dict[str, str] = Field(default_factory=dict)
    """Environment of the last trained stage: the Optuna trial it reports val_elbo to (empty: no pruning)."""
    in_subprocess: bool = False
    """Train every stage in a process of its own (trials running at once in one sweep process)."""
