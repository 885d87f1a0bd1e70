"""Run a training stage in this process or through torchrun / the deepspeed launcher."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dgpt_core.cli_errors import ConfigError
from dgpt_core.config import FOLDER_CONFIG_NAME, LaunchedTrainingConfig, RunConfig
from dgpt_core.rlhf.stage import train_rl_stage
from dgpt_core.training.launch import TORCHRUN_ENV, launch_error, launcher_command, write_deepspeed_env
from dgpt_core.training.stage import train_stage

log = logging.getLogger(__name__)

STAGE_MODULES = {"pretrain": "dgpt_core.training.stage", "sft": "dgpt_core.training.stage", "rl": "dgpt_core.rlhf.stage"}
"""The entry point a launched process of each training stage runs."""


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_training_stage(
    run: RunConfig,
    stage: str,
    dataset_dir: str,
    tokenizer_dir: str,
    out_dir: str,
    init_model_dir: str | None,
    tracking_env: dict[str, str],
    resume: bool = True,
    trial_env: dict[str, str] | None = None,
    in_subprocess: bool = False,
) -> dict[str, Any]:
    """Train one stage of `run`; returns model_dir and metrics. With `resume` it continues from the
    stage's last complete checkpoint short of max_steps (a rerun of an interrupted stage), else it
    starts clean, removing the old checkpoints (a forced rerun). One process trains here, on the
    config object; launched processes read it from out_dir/run_config.yaml. Several nodes need
    launcher=deepspeed, which starts them all; a failed launch raises a DgptError naming the stage
    and, under torchrun, the first failing rank and its error.

    `trial_env` is the environment of a sweep trial's stage (Optuna pruning, see
    dgpt_core.training.pruning); `in_subprocess` trains even one process through the launcher, so that
    concurrent trials of one sweep process never share a process's seeds and environment."""
    cfg: LaunchedTrainingConfig = getattr(run, stage)
    report_to = "mlflow" if tracking_env else "none"
    if cfg.num_processes * cfg.num_nodes == 1 and not in_subprocess:
        with patched_env({**tracking_env, **(trial_env or {})}):
            try:
                if stage == "rl":
                    result = train_rl_stage(run, tokenizer_dir, out_dir, init_model_dir, resume=resume,
                                            report_to=report_to)
                else:
                    result = train_stage(run, stage, dataset_dir, tokenizer_dir, out_dir,
                                         init_model_dir=init_model_dir, resume=resume, report_to=report_to)
            finally:
                _end_active_mlflow_runs()
        return {"model_dir": str(result.model_dir), "metrics": result.metrics}
    if cfg.num_nodes > 1 and cfg.launcher == "torchrun":
        raise ConfigError(f"{stage}: num_nodes={cfg.num_nodes} with launcher=torchrun would start this node only; "
                          "use launcher=deepspeed with a hostfile, or run `dgpt train-node` on every node")

    run_config_path = run.save_yaml(Path(out_dir) / FOLDER_CONFIG_NAME)
    module_args = ["--tokenizer-dir", tokenizer_dir, "--out-dir", out_dir, "--report-to", report_to,
                   "--run-config", str(run_config_path),
                   *(["--stage", stage, "--dataset-dir", dataset_dir] if stage != "rl" else [])]
    if resume:
        module_args.append("--resume")
    if init_model_dir:
        module_args += ["--init-model-dir", init_model_dir]
    env = {**os.environ, **tracking_env, **(trial_env or {})}
    with tempfile.TemporaryDirectory(prefix=f"dgpt-{stage}-launch-") as scratch:
        log_dir = Path(scratch) / "torchrun"
        cmd = launcher_command(cfg, module_args, log_dir=log_dir, module=STAGE_MODULES[stage])
        if cfg.launcher == "torchrun":
            env.update(TORCHRUN_ENV)
        elif cfg.num_nodes > 1:
            env["DS_ENV_FILE"] = str(write_deepspeed_env(Path(scratch) / "deepspeed_env", env))
        log.info("launching %s: %s", stage, shlex.join(cmd))
        returncode = subprocess.run(cmd, env=env).returncode
        if returncode:
            raise launch_error(stage, cfg.launcher, returncode, log_dir)
    return json.loads((Path(out_dir) / "stage_result.json").read_text())


def _end_active_mlflow_runs() -> None:
    """transformers' MLflowCallback leaves the run it resumed from MLFLOW_RUN_ID active in this
    process; end it so later stages can start their own."""
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
