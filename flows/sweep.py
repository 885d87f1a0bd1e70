"""The `sweep` flow: many pretrain-sft runs of one base config over a grid or an Optuna search,
sharing every cached stage they can, compared in MLflow and in a sweep report.

    dgpt sweep --preset tiny --grid sft.learning_rate=1e-3,3e-4 --seeds 0,1
    prefect deployment run sweep/tiny-sft --param 'grid=["sft.learning_rate=1e-3,3e-4"]'

Each trial is a pretrain-sft run (a subflow here, or a run of `trial_deployment` on a work pool)
into the same output root, so a stage whose config the trial does not change (data, pretraining
in a sweep of SFT settings) is built once and taken from the cache by the others. A trial that
fails is reported, and the sweep goes on with the others.
"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from dgpt_core.cli_errors import DgptError
from dgpt_core.config import RunConfig, load_run_config
from dgpt_core.config.sweep import (
    Dimension,
    SweepConfig,
    better,
    check_keys,
    default_sweep_name,
    grid_settings,
    parse_dimension,
)
from dgpt_core.provenance import git_state
from dgpt_core.training.pruning import pruning_env, sweep_pruner

from .plan import SweepTrial
from .pretrain_sft import library_logs_in_prefect, pretrain_sft
from .sweep_report import TrialRecord, settings_table, write_sweep_report
from .tracking import Tracker

CHAMPION_ALIAS = "champion"
"""Registry alias of the best model any sweep found (moved only by a better one on the sweep's metric)."""


@flow(name="sweep", log_prints=True)
def sweep(
    grid: list[str] | None = None,
    preset: str = "tiny",
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    metric: str | None = None,
    search: str = "grid",
    trials: int = 8,
    max_parallel: int = 1,
    name: str | None = None,
    output_dir: str | None = None,
    trial_deployment: str | None = None,
    config: SweepConfig | None = None,
    run_config: RunConfig | None = None,
) -> dict[str, Any]:
    """Run the trials of a sweep and write its report; returns the sweep summary (sweep.json).
    `grid` holds the dimensions (`key=v1,v2` or, for `search="optuna"`, `key=low:high[:log]`);
    `config` is the whole SweepConfig already parsed and `run_config` its base run config (`dgpt
    sweep` passes both, a deployment run passes the fields and the flow loads them)."""
    if config is None:
        fields = {"preset": preset, "overrides": overrides or [], "search": search, "trials": trials,
                  "max_parallel": max_parallel, "output_dir": output_dir, "trial_deployment": trial_deployment,
                  "space": [parse_dimension(d) for d in grid or []], "seeds": seeds or [0],
                  "name": name or default_sweep_name(preset)}
        config = SweepConfig(**fields, **({"metric": metric} if metric else {}))
    with library_logs_in_prefect():
        return _run_sweep(config, run_config or load_run_config(config.preset, config.overrides))


def _run_sweep(cfg: SweepConfig, base: RunConfig) -> dict[str, Any]:
    logger = get_run_logger()
    check_keys(base, cfg.space, cfg.seed_key)
    root = Path(cfg.output_dir or base.output_dir).resolve()
    sweep_dir = root / "sweeps" / cfg.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(sweep_dir / "sweep_config.yaml")
    base.save_yaml(sweep_dir / "run_config.yaml")
    tracker = Tracker(base.tracking, root) if base.tracking.enabled else None
    if tracker:
        tracker.start_parent(cfg.name, {"dgpt.sweep": cfg.name, "dgpt.kind": "sweep", "preset": cfg.preset,
                                        "prefect.flow_run_id": str(get_run_context().flow_run.id), **git_state()},
                             {"sweep": {**cfg.model_dump(mode="json", exclude={"space"}),
                                        "space": [d.spec() for d in cfg.space]}})
        tracker.log_artifact(tracker.parent_id, sweep_dir / "sweep_config.yaml")
    runner = TrialRunner(cfg, root, tracker.parent_id if tracker else None)
    logger.info("sweep %s: %s search over %s, seeds %s, metric %s (%s) -> %s", cfg.name, cfg.search,
                [d.spec() for d in cfg.space], cfg.seeds, cfg.metric, cfg.direction, sweep_dir)
    started = time.perf_counter()
    status = "FAILED"
    try:
        records = runner.run_grid() if cfg.search == "grid" else runner.run_optuna()
        summary = write_sweep_report(sweep_dir, cfg, records, time.perf_counter() - started)
        if tracker:
            summary["champion"] = _promote_champion(tracker, base, cfg, summary)
            tracker.log_metrics(tracker.parent_id, {"sweep": summary["counts"], "cache": {
                "executions_saved": summary["cache"]["executions_saved"]}, **summary["best"]["metrics"]}
                if summary["best"] else {"sweep": summary["counts"]})
            summary["mlflow"] = {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
                                 "sweep_run_id": tracker.parent_id}
            (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
            for path in [sweep_dir / "sweep.md", sweep_dir / "sweep.json", *sorted(sweep_dir.glob("*.png"))]:
                tracker.log_artifact(tracker.parent_id, path)
        status = "FINISHED"
    finally:
        if tracker:
            tracker.end(tracker.parent_id, status)
    create_markdown_artifact(key="sweep-report", markdown=(sweep_dir / "sweep.md").read_text(), description=cfg.name)
    print(f"\n{settings_table(cfg, records)}\n\nsweep folder: {sweep_dir}\nreport:       {sweep_dir / 'sweep.md'}")
    return summary


class TrialRunner:
    """Runs the trials of a sweep, `max_parallel` at a time, each a pretrain-sft run."""

    def __init__(self, cfg: SweepConfig, root: Path, mlflow_parent_run_id: str | None):
        self.cfg, self.root, self.parent = cfg, root, mlflow_parent_run_id

    def run_grid(self) -> list[TrialRecord]:
        jobs = [(number, setting, seed) for number, setting in enumerate(grid_settings(self.cfg.space))
                for seed in self.cfg.seeds]
        return self._in_parallel(lambda job: self.run_trial(*job), jobs)

    def run_optuna(self) -> list[TrialRecord]:
        """A TPE search: each Optuna trial is one setting run with every seed (the first seed's run
        reports its validation curve to the pruner; a pruned setting skips its other seeds)."""
        import optuna

        storage = f"sqlite:///{self.root}/optuna.db"
        study = optuna.create_study(
            study_name=self.cfg.name, storage=storage, direction=self.cfg.direction, load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=self.cfg.seeds[0]),
            pruner=sweep_pruner() if self.cfg.pruning else optuna.pruners.NopPruner())
        asking = threading.Lock()

        def one_setting(_: int) -> list[TrialRecord]:
            with asking:
                trial = study.ask()
            setting = {d.key: _suggest(trial, d) for d in self.cfg.space}
            records: list[TrialRecord] = []
            for index, seed in enumerate(self.cfg.seeds):
                env = pruning_env(storage, self.cfg.name, trial.number, self.cfg.direction == "maximize")
                records.append(self.run_trial(trial.number, setting, seed, env if index == 0 else {}))
                if records[-1].status == "pruned":
                    break
            values = [r.value for r in records if r.value is not None]
            if records[0].status == "pruned":
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            elif values:
                study.tell(trial, sum(values) / len(values))
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return records

        return [r for batch in self._in_parallel(one_setting, list(range(self.cfg.trials))) for r in batch]

    def _in_parallel(self, work, jobs: list) -> list:
        if self.cfg.max_parallel == 1:
            return [work(job) for job in jobs]
        # each job runs in a copy of this thread's context (this flow run's), so Prefect nests its runs
        with ThreadPoolExecutor(self.cfg.max_parallel, thread_name_prefix="trial") as pool:
            futures = [pool.submit(contextvars.copy_context().run, work, job) for job in jobs]
            return [future.result() for future in futures]

    def run_trial(self, number: int, setting: dict[str, Any], seed: int,
                  env: dict[str, str] | None = None) -> TrialRecord:
        """One pretrain-sft run of `setting` with `seed`; a failure is recorded, never raised."""
        run_name = f"{self.cfg.name}-t{number:02d}-s{seed}"
        record = TrialRecord(number=number, seed=seed, setting=setting, run_name=run_name)
        overrides = self.cfg.trial_overrides(setting, seed)
        trial = SweepTrial(sweep=self.cfg.name, number=number, seed=seed, mlflow_parent_run_id=self.parent,
                           pruning_env=env or {}, in_subprocess=self.cfg.max_parallel > 1)
        try:
            run = load_run_config(self.cfg.preset, overrides)
        except DgptError as err:
            return record.failed(str(err))
        print(f"\n##### trial {run_name}: {setting} seed {seed}")
        try:
            if self.cfg.trial_deployment:
                self._run_deployment(run_name, overrides, trial)
            else:
                pretrain_sft(preset=self.cfg.preset, overrides=overrides, output_dir=str(self.root),
                             run_name=run_name, run_config=run, trial=trial)
        except Exception as err:  # a failed trial is part of the sweep's result, not its end
            record.error = f"{type(err).__name__}: {err}"
        return record.read_summary(self.root / run_name / "summary.json", self.cfg.metric)

    def _run_deployment(self, run_name: str, overrides: list[str], trial: SweepTrial) -> None:
        from prefect.deployments import run_deployment

        flow_run = run_deployment(self.cfg.trial_deployment, as_subflow=True, parameters={
            "preset": self.cfg.preset, "overrides": overrides, "output_dir": str(self.root),
            "run_name": run_name, "trial": trial.model_dump(mode="json")})
        if not flow_run.state or not flow_run.state.is_completed():
            raise RuntimeError(f"deployment run {flow_run.name} ended {flow_run.state.name if flow_run.state else 'unknown'}")


def _suggest(trial, dimension: Dimension) -> Any:
    if dimension.values is not None:
        return trial.suggest_categorical(dimension.key, dimension.values)
    if dimension.integer:
        return trial.suggest_int(dimension.key, int(dimension.low), int(dimension.high), log=dimension.log)
    return trial.suggest_float(dimension.key, dimension.low, dimension.high, log=dimension.log)


def _promote_champion(tracker: Tracker, base: RunConfig, cfg: SweepConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Register the best trial's model with the alias `champion` when it beats the current
    champion on the sweep's metric (the champion's value is the metric of the run that trained it;
    one without that metric is kept: the two cannot be compared)."""
    best = summary["best"]
    name = base.tracking.registered_model_name
    if not best or not best["model_run_id"]:
        return {"promoted": False, "reason": "no completed trial has a model in MLflow"}
    current = _champion(tracker, name, cfg.metric)
    if current is not None and current["value"] is None:
        return {"promoted": False, "current": current,
                "reason": f"the champion (version {current['version']}) has no {cfg.metric} to compare with"}
    if current is not None and not better(best["value"], current["value"], cfg.direction):
        return {"promoted": False, "current": current,
                "reason": f"the best trial ({best['value']:.4g}) does not beat the champion ({current['value']:.4g})"}
    _, version = tracker.log_text_diffusion_model(best["model_run_id"], Path(best["model_dir"]), alias=CHAMPION_ALIAS)
    print(f"MLflow: {name} version {version} ({best['run_name']}, {cfg.metric} {best['value']:.4g}) is now "
          f"'{CHAMPION_ALIAS}'" + (f", replacing version {current['version']} ({current['value']:.4g})" if current else ""))
    return {"promoted": True, "version": version, "run_name": best["run_name"], "previous": current}


def _champion(tracker: Tracker, name: str, metric: str) -> dict[str, Any] | None:
    """The current champion's version and its value of `metric`; None when there is no champion."""
    from mlflow.exceptions import MlflowException

    try:
        version = tracker.client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:  # no such registered model, or no version has the alias
        return None
    run = tracker.client.get_run(version.run_id)
    trainer_run = run.data.tags.get("mlflow.parentRunId", version.run_id)
    return {"version": str(version.version), "value": tracker.client.get_run(trainer_run).data.metrics.get(metric)}
