"""Prefect tasks of the pretrain-sft flow. Each is cached on an explicit stage key computed by the
flow (config section + upstream keys + code hash, see flows/caching.py) and returns a small
JSON-able dict of paths and headline numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return parameters["key"]


CACHED = dict(cache_key_fn=stage_cache_key, persist_result=True)


@task(name="data", log_prints=False, **CACHED)  # datasets prints dill disassembly while fingerprinting
def data_task(key: str, run_config_path: str, out_dir: str) -> dict[str, Any]:
    """Tokenizer, pretraining text and SFT examples (dgpt_core.data.stages.prepare_all)."""
    from dgpt_core.data.manifest import read_manifest
    from dgpt_core.data.stages import prepare_all
    from dgpt_core.run_config import RunConfig

    run = RunConfig.from_yaml(run_config_path)
    folders = prepare_all(run.data, run.tokenizer, run.model.max_seq_len, out_dir)
    return {
        "folders": {name: str(path) for name, path in folders.items()},
        "manifests": {name: read_manifest(path) for name, path in folders.items()},
    }


@task(name="untrained-model", **CACHED)
def untrained_model_task(key: str, run_config_path: str, tokenizer_dir: str, out_dir: str) -> dict[str, Any]:
    """The freshly initialised model saved as a model folder: the floor every eval is compared to."""
    from transformers import set_seed

    from dgpt_core.export import save_model_folder
    from dgpt_core.model import build_model
    from dgpt_core.model_info import info_for_stage
    from dgpt_core.run_config import RunConfig
    from dgpt_core.tokenizer import load_tokenizer

    run = RunConfig.from_yaml(run_config_path)
    tokenizer = load_tokenizer(tokenizer_dir)
    set_seed(run.pretrain.seed)
    model_dir = save_model_folder(build_model(run.model, tokenizer), tokenizer, Path(out_dir) / "model",
                                  info=info_for_stage(run, "untrained"))
    run.save_yaml(model_dir / "run_config.yaml")
    return {"model_dir": str(model_dir), "metrics": {}}


@task(name="train", **CACHED)
def train_task(
    key: str,
    stage: str,
    run_config_path: str,
    dataset_dir: str,
    tokenizer_dir: str,
    out_dir: str,
    init_model_dir: str | None,
    tracking_env: dict[str, str],
    resume: bool,
) -> dict[str, Any]:
    """One training stage through flows.launch (in-process, torchrun or deepspeed). `resume`
    continues an interrupted stage from its last complete checkpoint; False (a forced rerun)
    retrains from scratch."""
    from flows.launch import run_training_stage

    return run_training_stage(run_config_path, stage, dataset_dir, tokenizer_dir, out_dir, init_model_dir,
                              tracking_env, resume)


@task(name="eval", **CACHED)
def eval_task(key: str, model_dir: str, out_dir: str, run_config_path: str, data_folders: dict[str, str]) -> dict[str, Any]:
    """The eval suite on one model folder; metrics.json, report.md and plots in out_dir."""
    from dgpt_core.run_config import RunConfig
    from eval.suite import run_eval

    run = RunConfig.from_yaml(run_config_path)
    cfg = run.eval.model_copy(update={
        "skills_jsonl": run.eval.skills_jsonl or str(Path(data_folders["sft"]) / "skills_test.jsonl"),
        "pretrain_data_dir": run.eval.pretrain_data_dir or data_folders.get("pretrain"),
        "sft_data_dir": run.eval.sft_data_dir or data_folders.get("sft"),
    })
    metrics = run_eval(model_dir, out_dir, cfg)
    out = Path(out_dir)
    return {"metrics_path": str(out / "metrics.json"), "report_path": str(out / "report.md"),
            "out_dir": str(out), "metrics": metrics}


@task(name="publish", **CACHED)
def publish_task(key: str, model_dir: str, out_dir: str, run_config_path: str, eval_dirs: dict[str, str]) -> dict[str, Any]:
    """Stage, verify and (with a repo id and token) upload the model folder, card and eval reports."""
    from deploy.publish import publish
    from dgpt_core.run_config import RunConfig

    run = RunConfig.from_yaml(run_config_path)
    result = publish(model_dir, out_dir, run.publish, {k: Path(v) for k, v in eval_dirs.items()}, run_config_path)
    return result.to_dict()
