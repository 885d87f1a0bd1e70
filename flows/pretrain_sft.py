"""The `pretrain-sft` flow: data -> pretrain -> SFT -> eval -> publish, with cached stages,
MLflow tracking and Prefect artifacts.

    dgpt run --preset tiny                                   # locally, Prefect's temporary server
    prefect deployment run pretrain-sft/full --param preset=fineweb
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.context import get_run_context
from prefect.logging.handlers import APILogHandler

from dgpt_core.config import RunConfig, load_run_config
from dgpt_core.config.evaluation import EvalConfig
from dgpt_core.generation.options import method_options
from dgpt_core.models.info import choose_sampler_defaults, read_model_info, write_sampler_defaults
from dgpt_core.provenance import git_state
from eval.answers import read_wide_tables
from eval.strategy_comparison import repetition_safe_method
from tasks.stages import data_task, eval_task, publish_task, train_task, untrained_model_task

from .caching import stage_key
from .plan import SweepTrial, plan_stages
from .report_card import write_report_card
from .stage_runner import StageFailedError, StageRunner
from .tracking import Tracker, flatten_metrics


@flow(name="pretrain-sft", log_prints=True)
def pretrain_sft(
    preset: str = "tiny",
    overrides: list[str] | None = None,
    output_dir: str | None = None,
    run_name: str | None = None,
    refresh: list[str] | None = None,
    from_stage: str | None = None,
    only: list[str] | None = None,
    run_config: RunConfig | None = None,
    wait_for_stages: bool = True,
    trial: SweepTrial | None = None,
) -> dict[str, Any]:
    """Run the flow for a preset with `--set`-style overrides; returns the run summary (also written
    to summary.json). `run_config` is the config already loaded from them (`dgpt run` parses it once
    to validate it); a deployment run passes only preset and overrides and the flow loads it.
    `wait_for_stages=False` fails at once when a stage this run needs is being built by another run
    into the same output root (by default it waits and then uses that run's result). `trial`
    makes the run a trial of a sweep (flows/sweep.py)."""
    with library_logs_in_prefect():
        return _run_flow(run_config or load_run_config(preset, overrides), output_dir, run_name, refresh, from_stage,
                         only, wait_for_stages, trial)


def _run_flow(run: RunConfig, output_dir: str | None, run_name: str | None, refresh: list[str] | None,
              from_stage: str | None, only: list[str] | None, wait_for_stages: bool,
              trial: SweepTrial | None) -> dict[str, Any]:
    logger = get_run_logger()
    root = Path(output_dir or run.output_dir).resolve()
    flow_run = get_run_context().flow_run
    run_dir = _new_run_dir(root, run_name, run.preset)
    run_name = run_dir.name
    config_path = str(run.save_yaml(run_dir / "run_config.yaml"))
    to_run, forced = plan_stages(from_stage, only, refresh)
    if trial:
        to_run = [stage for stage in to_run if stage != "publish"]
    logger.info("run %s: stages %s (forced: %s) -> %s", run_name, to_run, sorted(forced), run_dir)

    tracker = Tracker(run.tracking, root) if run.tracking.enabled else None
    if tracker:
        tags = {"prefect.flow_run_id": str(flow_run.id), "preset": run.preset, **git_state(), **_trial_tags(trial)}
        tracker.start_parent(run_name, tags, run.model_dump(mode="json"))
        if tracker.killed:
            print(f"MLflow: {len(tracker.killed)} runs left RUNNING by killed processes are now KILLED")
        tracker.log_artifact(tracker.parent_id, Path(config_path))
    runner = StageRunner(root, forced, tracker, run_name, wait_for_stages)
    progress_id = create_progress_artifact(progress=0.0, key="pretrain-sft-progress", description=run_name)
    summary: dict[str, Any] = {"run_name": run_name, "preset": run.preset, "status": "running",
                               "run_dir": str(run_dir), "run_config": config_path,
                               "flow_run_id": str(flow_run.id), "stages": to_run}
    started = time.perf_counter()
    try:
        results = _run_stages(run, config_path, root, to_run, runner, tracker, progress_id, trial)
        summary["status"] = "completed"
    except BaseException as err:
        summary.update(status="failed", failed_stage=runner.failed, error=f"{type(err).__name__}: {err}")
        if runner.failed is not None:
            raise StageFailedError(runner.failed, err, run_dir / "summary.json") from err
        raise
    finally:
        summary["wall_time_s"] = {**runner.wall, "total": round(time.perf_counter() - started, 2)}
        summary["cache_hit"] = runner.cache_hits
        if tracker:
            summary["mlflow"] = {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
                                 "parent_run_id": tracker.parent_id, "stage_run_ids": runner.child_runs}
            for name, run_id in runner.child_runs.items():
                tracker.end(run_id, runner.child_status(name))
            tracker.end(tracker.parent_id, "FINISHED" if summary["status"] == "completed" else "FAILED")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary.update(results)
    summary["metrics"] = run_metrics(results)
    if tracker:
        tracker.log_metrics(tracker.parent_id, {"train": results.get("train_metrics", {})})
    summary["model_links"] = _link_models(run_dir, results["models"])
    card = write_report_card(run_dir, run, summary)
    summary["report_card"] = str(card)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    create_markdown_artifact(key="run-report-card", markdown=card.read_text(), description=run_name)
    if tracker:
        tracker.log_artifact(tracker.parent_id, card)
        tracker.log_artifact(tracker.parent_id, run_dir / "summary.json")
    if trial is None:  # `latest` is the newest pipeline run, never a sweep's trial
        _point_latest(root, run_dir)
    print(f"\nrun folder: {run_dir}\nsummary:    {run_dir / 'summary.json'}\nreport:     {card}")
    return summary


def _run_stages(run: RunConfig, config_path: str, root: Path, to_run: list[str], runner: StageRunner,
                tracker: Tracker | None, progress_id, trial: SweepTrial | None) -> dict[str, Any]:
    stages_dir = root / "stages"
    out: dict[str, Any] = {"models": {}, "evals": {}}
    done = 0

    def step_done() -> None:
        nonlocal done
        done += 1
        update_progress_artifact(progress_id, progress=100.0 * done / len(to_run))

    data_key = stage_key("data", {"data": run.data.model_dump(mode="json"),
                                  "tokenizer": run.tokenizer.model_dump(mode="json"),
                                  "max_seq_len": run.model.max_seq_len})
    data = runner("data", "data", data_task, key=data_key, data=run.data, tokenizer=run.tokenizer,
                  max_seq_len=run.model.max_seq_len, out_dir=str(stages_dir / data_key))
    folders = data["folders"]
    out["data"] = folders
    if tracker:
        child = runner.child("data")
        tracker.log_metrics(child, {name: {"splits": m.get("splits", {}), **_numbers(m)}
                                    for name, m in data["manifests"].items() if m})
        for name in ("pretrain", "sft"):
            if name in folders:
                tracker.log_artifact(child, Path(folders[name]) / "report.md", f"data_report/{name}")
    _data_artifact(folders)
    step_done()

    keys = {"data": data_key}
    model_section = run.model.model_dump(mode="json")
    # a sweep's pruner watches the validation curve of the last stage the trial trains
    pruned_stage = "sft" if run.sft.enabled and "sft" in to_run else "pretrain"
    previous_model = None
    for stage in ("pretrain", "sft"):
        cfg = getattr(run, stage)
        if stage not in to_run or not cfg.enabled or stage not in folders:
            continue
        upstream = [data_key] + ([keys["pretrain"]] if stage == "sft" and "pretrain" in keys else [])
        key = stage_key(stage, {"model": model_section, stage: cfg.model_dump(mode="json")}, upstream)
        child = runner.child(stage)
        result = runner(stage, stage, train_task, key=key, stage=stage, run=run,
                        dataset_dir=folders[stage], tokenizer_dir=folders["tokenizer"],
                        out_dir=str(stages_dir / key), init_model_dir=cfg.init_from or previous_model,
                        tracking_env=tracker.stage_env(child) if tracker else {},
                        resume=stage not in runner.forced, **_trial_training(trial, stage == pruned_stage))
        keys[stage], previous_model = key, result["model_dir"]
        out["models"][stage] = result["model_dir"]
        out.setdefault("train_metrics", {})[stage] = result["metrics"]
        if tracker:
            tracker.log_metrics(child, {"final": result["metrics"]})
        if stage == "sft" and "sft_control" in run.eval_models:
            _train_sft_control(run, folders, keys, out, runner, tracker, stages_dir, trial)
        step_done()

    if "rl" in to_run and run.rl.enabled and "sft" in out["models"]:
        _train_rl(run, folders, keys, out, runner, tracker, stages_dir, trial)
        step_done()

    if "eval" in to_run:
        if "untrained" in run.eval_models:
            _untrained_model(run, folders, keys, out, runner, stages_dir)
        eval_cfg = eval_config_for(run.eval, folders)
        for name in run.eval_models:
            if name not in out["models"]:
                continue
            key = stage_key("eval", {"eval": run.eval.model_dump(mode="json"), "model": name}, [keys[name], data_key])
            cfg = eval_cfg if name != "sft_control" else eval_cfg.model_copy(
                update={"tasks": [t for t in eval_cfg.tasks if t in CONTROL_TASKS], "steps_grid": []})
            result = runner(f"eval-{name}", "eval", eval_task, key=key, model_kind=name, model_dir=out["models"][name],
                            out_dir=str(stages_dir / key), cfg=cfg)
            out["evals"][name] = {k: result[k] for k in ("metrics_path", "report_path", "out_dir")}
            keys[f"eval-{name}"] = key
            if name in ("sft", "rl"):
                _adopt_eval_sampler_defaults(out["models"][name], run.eval, result["metrics"])
            if name == "pretrain":
                _adopt_open_ended_defaults(out["models"][name], run.eval, result["metrics"])
            create_markdown_artifact(key=f"eval-report-{name.replace('_', '-')}", markdown=Path(result["report_path"]).read_text(),
                                     description=f"eval of the {name} model")
            if tracker:
                child = runner.child(f"eval-{name}")
                tracker.log_metrics(child, {"eval": {name: _eval_headline(result["metrics"])}})
                tracker.log_metrics(tracker.parent_id, {"eval": {name: _eval_headline(result["metrics"])}})
                tracker.log_artifact(child, Path(result["out_dir"]), "eval")
                tracker.log_tables(child, read_wide_tables(result["out_dir"]))
        step_done()

    final_stage = next((s for s in ("rl", "sft", "pretrain") if s in out["models"]), None)
    final_model = out["models"].get(final_stage) if final_stage else None
    if tracker and final_model and trial is None:  # a sweep registers only its best trial's model
        name, version = tracker.log_text_diffusion_model(runner.child(final_stage), Path(final_model))
        out["registered_model"] = {"name": name, "version": version, "alias": run.tracking.model_alias}

    if "publish" in to_run and final_model:
        eval_dirs = {name: paths["out_dir"] for name, paths in out["evals"].items() if name != "untrained"}
        upstream = [keys.get(final_stage, ""), *(keys.get(f"eval-{n}", "") for n in sorted(eval_dirs))]
        # the token's presence decides dry run vs upload, so it is part of the key (never its value)
        has_token = bool(os.environ.get(run.publish.token_env))
        key = stage_key("publish", {"publish": run.publish.model_dump(mode="json"), "token": has_token}, upstream)
        result = runner("publish", "publish", publish_task, key=key, model_dir=final_model,
                        out_dir=str(stages_dir / key), cfg=run.publish, eval_dirs=eval_dirs,
                        run_config_path=config_path)
        out["publish"] = result
        if tracker:
            child = runner.child("publish")
            tracker.log_metrics(child, {"publish": {"uploaded": result["uploaded"], "verified": result["verified"],
                                                    "files": len(result["files"])}})
        step_done()
    return out


def run_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Every number a run produced under the name MLflow shows on its run: `train/<stage>/<name>`
    (final training metrics) and `eval/<model>/...` (the eval headlines)."""
    evals = {name: _eval_headline(json.loads(Path(paths["metrics_path"]).read_text()))
             for name, paths in results.get("evals", {}).items()}
    return flatten_metrics({"train": results.get("train_metrics", {}), "eval": evals})


def _trial_training(trial: SweepTrial | None, pruned: bool) -> dict[str, Any]:
    """How a sweep trial trains a stage: in a process of its own, and reporting to Optuna when it is `pruned`."""
    if trial is None:
        return {}
    return {"trial_env": trial.pruning_env if pruned else {}, "in_subprocess": trial.in_subprocess}


def _trial_tags(trial: SweepTrial | None) -> dict[str, str]:
    if trial is None:
        return {}
    tags = {"dgpt.sweep": trial.sweep, "dgpt.trial": str(trial.number), "dgpt.seed": str(trial.seed)}
    return {**tags, "mlflow.parentRunId": trial.mlflow_parent_run_id} if trial.mlflow_parent_run_id else tags


def _untrained_model(run: RunConfig, folders: dict[str, str], keys: dict[str, str], out: dict[str, Any],
                     runner: StageRunner, stages_dir: Path) -> str:
    """The freshly initialised model folder (cached), recorded as out["models"]["untrained"]."""
    key = stage_key("untrained", {"model": run.model.model_dump(mode="json"), "seed": run.pretrain.seed,
                                  "diffusion": run.pretrain.diffusion.model_dump(mode="json")}, [keys["data"]])
    result = runner("untrained-model", "eval", untrained_model_task, key=key, run=run,
                    tokenizer_dir=folders["tokenizer"], out_dir=str(stages_dir / key))
    out["models"]["untrained"], keys["untrained"] = result["model_dir"], key
    return result["model_dir"]


def _train_sft_control(run: RunConfig, folders: dict[str, str], keys: dict[str, str], out: dict[str, Any],
                       runner: StageRunner, tracker: Tracker | None, stages_dir: Path, trial: SweepTrial | None) -> None:
    """The control: the SFT stage's exact recipe started from the untrained model instead of the
    pretrained one (cached like the others), recorded as out["models"]["sft_control"]. It replays
    no pretraining text: the biographies it would read are what the control must not know."""
    untrained = _untrained_model(run, folders, keys, out, runner, stages_dir)
    run = run.model_copy(update={"sft": run.sft.model_copy(update={"pretrain_replay": 0.0})})
    key = stage_key("sft_control", {"model": run.model.model_dump(mode="json"), "sft": run.sft.model_dump(mode="json")},
                    [keys["data"], keys["untrained"]])
    child = runner.child("sft_control")
    result = runner("sft_control", "sft", train_task.with_options(task_run_name="train-sft-control"), key=key,
                    stage="sft", run=run, dataset_dir=folders["sft"], tokenizer_dir=folders["tokenizer"],
                    out_dir=str(stages_dir / key), init_model_dir=untrained,
                    tracking_env=tracker.stage_env(child) if tracker else {}, resume="sft" not in runner.forced,
                    **_trial_training(trial, pruned=False))
    keys["sft_control"] = key
    out["models"]["sft_control"] = result["model_dir"]
    out.setdefault("train_metrics", {})["sft_control"] = result["metrics"]
    if tracker:
        tracker.log_metrics(child, {"final": result["metrics"]})


def _train_rl(run: RunConfig, folders: dict[str, str], keys: dict[str, str], out: dict[str, Any],
              runner: StageRunner, tracker: Tracker | None, stages_dir: Path, trial: SweepTrial | None) -> None:
    """The RL stage: GRPO of the SFT model (cached on the rl section and the SFT model's key),
    recorded as out["models"]["rl"]; its MLflow child run carries the reward, KL and length curves."""
    key = stage_key("rl", {"model": run.model.model_dump(mode="json"), "rl": run.rl.model_dump(mode="json"),
                           "world": run.data.world.model_dump(mode="json"),
                           "skills": run.data.skills.model_dump(mode="json")}, [keys["data"], keys["sft"]])
    child = runner.child("rl")
    result = runner("rl", "rl", train_task, key=key, stage="rl", run=run, dataset_dir=folders["sft"],
                    tokenizer_dir=folders["tokenizer"], out_dir=str(stages_dir / key),
                    init_model_dir=out["models"]["sft"], tracking_env=tracker.stage_env(child) if tracker else {},
                    resume="rl" not in runner.forced, **_trial_training(trial, pruned=False))
    keys["rl"] = key
    out["models"]["rl"] = result["model_dir"]
    out.setdefault("train_metrics", {})["rl"] = result["metrics"]
    if tracker:
        tracker.log_metrics(child, {"final": result["metrics"]})


def eval_config_for(cfg: EvalConfig, folders: dict[str, str]) -> EvalConfig:
    """The eval settings with the run's own held-out data where the config names none."""
    return cfg.model_copy(update={
        "skills_jsonl": cfg.skills_jsonl or str(Path(folders["sft"]) / "skills_test.jsonl"),
        "pretrain_data_dir": cfg.pretrain_data_dir or folders.get("pretrain"),
        "sft_data_dir": cfg.sft_data_dir or folders.get("sft"),
    })


CONTROL_TASKS = ("ppl", "dgpt_skills", "dgpt_world")
"""The eval tasks of the `sft_control` model: what the report card sets beside the SFT model's (at
the eval's steps only: no steps sweep, which chooses sampler defaults)."""
SAMPLER_CHOICE_TASKS = {"dgpt_skills": "exact_match", "dgpt_world": "heldout"}
"""Benchmarks whose exact match (the row key) chooses the SFT model's sampler defaults, first found wins."""


def _adopt_eval_sampler_defaults(model_dir: str, cfg: EvalConfig, metrics: dict[str, Any]) -> None:
    """Write the eval's best setting (skills, else the world's held-out questions) into the model folder's sampler defaults (idempotent,
    so a cached eval re-applies it to a retrained folder)."""
    benchmarks = metrics.get("benchmarks", {})
    info = read_model_info(model_dir)
    task = next((t for t in SAMPLER_CHOICE_TASKS if t in benchmarks), None)
    if task is None or info is None or info.block_size:
        return  # a block-causal model keeps the defaults it was saved with, which the eval measured as `defaults`
    canvas = cfg.skills_canvas or info.answer_canvas
    base = {"schedule": info.schedule, "t_eps": info.t_eps, "temperature": cfg.temperature,
            "threshold": cfg.threshold, "block_size": cfg.block_size, "seed": cfg.seed}
    rows = {strategy: {"steps": row["steps"], "exact_match": row[SAMPLER_CHOICE_TASKS[task]]}
            for strategy, row in benchmarks[task].items()}
    defaults = choose_sampler_defaults(rows, benchmarks.get(f"{task}_steps", {}), canvas, base)
    write_sampler_defaults(model_dir, defaults)


def _adopt_open_ended_defaults(model_dir: str, cfg: EvalConfig, metrics: dict[str, Any]) -> None:
    """A pretrain model only continues text: its sampler defaults become the confidence-family
    method that repeated no more than random order in the eval's repetition study, with the study's
    steps and canvas (`repetition_safe_method`); random order stays the default when none did."""
    info = read_model_info(model_dir)
    method = repetition_safe_method(metrics.get("repetition_by_mode", {}))
    if info is None or method is None:
        return
    write_sampler_defaults(model_dir, {"schedule": info.schedule, "t_eps": info.t_eps, **method_options(method),
                                       "steps": cfg.steps, "max_new_tokens": cfg.plain_canvas,
                                       "temperature": cfg.repetition_token_temperature, "threshold": cfg.threshold,
                                       "seed": cfg.seed})


LIBRARY_LOGGERS = ("dgpt_core", "eval", "deploy", "tasks")
"""Loggers of the layers the tasks run; their INFO records reach the console and the Prefect UI."""


@contextlib.contextmanager
def library_logs_in_prefect() -> Iterator[None]:
    """While the flow runs, the library's INFO records also go to the Prefect run logs (its tasks
    do not capture prints); afterwards the loggers are as they were."""
    added = []
    for name in LIBRARY_LOGGERS:
        logger, handler = logging.getLogger(name), APILogHandler()
        added.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, handler, level in added:
            logger.removeHandler(handler)
            logger.setLevel(level)


def _numbers(manifest: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in manifest.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _eval_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The comparable numbers of an eval: perplexity bound, benchmarks, repetition."""
    return {"ppl_bound": metrics.get("ppl_bound", {}), "benchmarks": metrics.get("benchmarks", {}),
            "repetition": metrics.get("repetition", {})}


def _data_artifact(folders: dict[str, str]) -> None:
    parts = [Path(folders[name], "report.md").read_text() for name in ("pretrain", "sft")
             if name in folders and Path(folders[name], "report.md").exists()]
    if parts:
        create_markdown_artifact(key="data-report", markdown="\n\n".join(parts), description="data stage report")


def _link_models(run_dir: Path, models: dict[str, str]) -> dict[str, str]:
    """`<run>/models/<kind>` -> the stage's model folder (relative links, so a moved output root
    keeps working): stable names for a run's untrained, pretrain and sft models."""
    folder = run_dir / "models"
    folder.mkdir(exist_ok=True)
    for kind, model_dir in models.items():
        _replace_symlink(folder / kind, os.path.relpath(model_dir, folder))
    return {kind: str(folder / kind) for kind in models}


def _new_run_dir(root: Path, run_name: str | None, preset: str) -> Path:
    """The run folder: `run_name` (reused if it exists), else a new `<preset>-<UTC time>` folder,
    suffixed -2, -3, ... when a concurrent run took that name in the same second."""
    if run_name:
        (root / run_name).mkdir(parents=True, exist_ok=True)
        return root / run_name
    stem = f"{preset}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    root.mkdir(parents=True, exist_ok=True)
    for suffix in itertools.count(1):
        run_dir = root / (stem if suffix == 1 else f"{stem}-{suffix}")
        with contextlib.suppress(FileExistsError):
            run_dir.mkdir()
            return run_dir


def _point_latest(root: Path, run_dir: Path) -> None:
    _replace_symlink(root / "latest", run_dir.name)


def _replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically (a reader sees the old or the new target, never none)."""
    tmp = link.with_name(f".{link.name}-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)
