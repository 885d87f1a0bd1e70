"""The stages of the pretrain-sft flow and which of them a run executes or recomputes
(no Prefect import, so the `dgpt run` parser loads fast)."""

from __future__ import annotations

FLOW_STAGES = ("data", "pretrain", "sft", "eval", "publish")
UPSTREAM = {"data": (), "pretrain": ("data",), "sft": ("data", "pretrain"), "eval": ("data", "pretrain", "sft"),
            "publish": ("sft", "eval")}


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
