"""Prefect tasks of the pretrain-sft flow. Each is cached on an explicit stage key computed by the
flow (config section + upstream keys + code hash, see flows/caching.py), takes the typed config
objects the flow parsed once, and returns a small JSON-able dict of paths and headline numbers.
Task runs are named for what they do (train-pretrain, eval-sft, ...)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from dgpt_core.config import FOLDER_CONFIG_NAME, DataConfig, RunConfig, TokenizerConfig
from dgpt_core.config.evaluation import EvalConfig
from dgpt_core.config.publish import PublishConfig

from .stage_folders import building


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return parameters["key"]


# log_prints off: Prefect's print patch also logs prints into a redirected sys.stdout, which turns
# dill's captured bytecode disassembly (datasets fingerprinting) into hundreds of log lines and
# leaves dill's globals scan empty. The library logs through `logging` (see flows/__init__.py).
CACHED = dict(cache_key_fn=stage_cache_key, persist_result=True, log_prints=False)


@task(name="data", task_run_name="data", **CACHED)
def data_task(key: str, data: DataConfig, tokenizer: TokenizerConfig, max_seq_len: int, out_dir: str) -> dict[str, Any]:
    """Tokenizer, pretraining text and SFT examples (dgpt_core.data.stages.prepare_all)."""
    from dgpt_core.data.manifest import read_manifest
    from dgpt_core.data.stages import prepare_all

    with building(out_dir):
        folders = prepare_all(data, tokenizer, max_seq_len, out_dir)
    return {
        "folders": {name: str(path) for name, path in folders.items()},
        "manifests": {name: read_manifest(path) for name, path in folders.items()},
    }


@task(name="untrained-model", task_run_name="untrained-model", **CACHED)
def untrained_model_task(key: str, run: RunConfig, tokenizer_dir: str, out_dir: str) -> dict[str, Any]:
    """The freshly initialised model saved as a model folder: the floor every eval is compared to."""
    from transformers import set_seed

    from dgpt_core.models.backbone import build_model
    from dgpt_core.models.export import save_model_folder
    from dgpt_core.models.info import info_for_stage
    from dgpt_core.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    set_seed(run.pretrain.seed)
    with building(out_dir) as folder:
        model_dir = save_model_folder(build_model(run.model, tokenizer), tokenizer, folder / "model",
                                      info=info_for_stage(run, "untrained"))
        run.save_yaml(model_dir / FOLDER_CONFIG_NAME)
    return {"model_dir": str(model_dir), "metrics": {}}


@task(name="train", task_run_name="train-{stage}", **CACHED)
def train_task(
    key: str,
    stage: str,
    run: RunConfig,
    dataset_dir: str,
    tokenizer_dir: str,
    out_dir: str,
    init_model_dir: str | None,
    tracking_env: dict[str, str],
    resume: bool,
    trial_env: dict[str, str] | None = None,
    in_subprocess: bool = False,
) -> dict[str, Any]:
    """One training stage through tasks.launch (in-process, torchrun or deepspeed). `resume`
    continues an interrupted stage from its last complete checkpoint; False (a forced rerun)
    retrains from scratch. `trial_env` and `in_subprocess`: how a sweep trial trains (see
    run_training_stage); like the tracking environment they are not part of the cache key."""
    from .launch import run_training_stage

    with building(out_dir):
        return run_training_stage(run, stage, dataset_dir, tokenizer_dir, out_dir, init_model_dir, tracking_env, resume,
                                  trial_env, in_subprocess)


@task(name="eval", task_run_name="eval-{model_kind}", **CACHED)
def eval_task(key: str, model_kind: str, model_dir: str, out_dir: str, cfg: EvalConfig) -> dict[str, Any]:
    """The eval suite on one model folder (the flow's `model_kind` model); metrics.json, report.md
    and plots in out_dir."""
    from eval.suite import run_eval

    with building(out_dir):
        metrics = run_eval(model_dir, out_dir, cfg)
    out = Path(out_dir)
    return {"metrics_path": str(out / "metrics.json"), "report_path": str(out / "report.md"),
            "out_dir": str(out), "metrics": metrics}


@task(name="publish", task_run_name="publish", **CACHED)
def publish_task(key: str, model_dir: str, out_dir: str, cfg: PublishConfig, eval_dirs: dict[str, str],
                 run_config_path: str) -> dict[str, Any]:
    """Stage, verify and (with a repo id and token) upload the model folder, card and eval reports;
    the run's run_config.yaml is uploaded beside them."""
    from deploy.publish import publish

    # the folder is the flow's own: what a killed publish left in it is cleared, which publish()
    # refuses to do for a folder it does not recognise
    shutil.rmtree(out_dir, ignore_errors=True)
    with building(out_dir):
        result = publish(model_dir, out_dir, cfg, {k: Path(v) for k, v in eval_dirs.items()}, run_config_path)
    return result.to_dict()
