"""One training stage (pretraining or SFT) as a plain function: datasets and tokenizer folders in,
a saved `text-diffusion` model folder out."""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from transformers import ModernBertForMaskedLM, TrainerCallback, set_seed
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ..config import FOLDER_CONFIG_NAME, LaunchedTrainingConfig, RunConfig, StageConfig
from ..data.replay import pretrain_split_beside, with_replay
from ..diffusion.collator import DiffusionCollator
from ..diffusion.elbo import dataset_rows
from ..generation.schedules import get_schedule
from ..models.adapters import attach_adapter, load_merged_model, save_adapted_folder
from ..models.backbone import build_model, count_parameters
from ..models.export import save_model_folder
from ..models.info import ModelInfo, context_messages_of, info_for_stage
from ..models.tokenizer import load_tokenizer, special_token_ids
from .memory import PeakMemory
from .pruning import pruning_callbacks
from .trainer import (
    DiffusionTrainer,
    ValidationElboCallback,
    remove_checkpoints,
    resumable_checkpoint,
    training_arguments,
)

log = logging.getLogger(__name__)

TRAINING_STAGES = ("pretrain", "sft")


@dataclass
class StageResult:
    """What a training stage produced."""

    model_dir: Path
    """The saved model folder (loads with pipeline("text-diffusion", trust_remote_code=True))."""
    metrics: dict[str, Any]
    """Final training metrics: train_loss, runtime, steps, tokens seen, parameters and
    trainable_parameters, the training loop's peak memory (`memory.PeakMemory`: peak_rss_mb, and
    gpu_peak_allocated_mb / gpu_peak_reserved_mb where CUDA is available), tokens_per_second
    (pretraining and SFT: the non-padding input tokens of this session per second of
    train_runtime, which includes validation and checkpoint saving; RL: the trained answer tokens
    of this session's rollouts per second) and, with a validation split, val_elbo (the validation
    ELBO in nats per eligible token)."""


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env() -> dict[str, str]:
    """What DeepSpeed needs to run as a one-process group without a launcher (else it looks for
    mpi4py): rank 0 of 1 with a free loopback port. Existing values are kept."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    if "MASTER_PORT" not in os.environ:
        env["MASTER_PORT"] = str(free_port())
    return {key: os.environ.get(key, value) for key, value in env.items()}


def stage_model_info(run: RunConfig, stage: str, train: datasets.Dataset, token_ids: dict[str, int]) -> ModelInfo:
    """What the stage's model is; for SFT also how many chat messages preceded its answers."""
    if stage != "sft":
        return info_for_stage(run, "pretrain")
    return info_for_stage(run, "sft", context_messages_of(train["input_ids"], token_ids["im_start"]))


def load_stage_datasets(dataset_dir: str | Path) -> datasets.DatasetDict:
    """The train / validation splits a data stage wrote with save_to_disk."""
    data = datasets.load_from_disk(str(dataset_dir))
    if "train" not in data:
        raise ValueError(f"{dataset_dir} has no 'train' split (found {list(data)})")
    return data


def training_rows(cfg: StageConfig, stage: str, data: datasets.DatasetDict, dataset_dir: str | Path) -> datasets.Dataset:
    """The stage's training split; for SFT with `pretrain_replay`, mixed with the pretraining rows
    the data stage wrote beside it."""
    if stage != "sft" or not cfg.pretrain_replay:
        return data["train"]
    pretrain = load_stage_datasets(pretrain_split_beside(dataset_dir))["train"]
    mixed = with_replay(data["train"], pretrain, cfg.pretrain_replay, cfg.seed, cfg.pretrain_replay_tokens)
    log.info("sft replays %d pretraining rows beside %d SFT rows", len(mixed) - len(data["train"]), len(data["train"]))
    return mixed


def validation_callback(
    trainer: DiffusionTrainer, cfg: StageConfig, validation: datasets.Dataset | None, pad_id: int
) -> ValidationElboCallback | None:
    """The val_elbo callback on the first cfg.val_max_sequences validation rows, added to
    `trainer`; None when the stage has no validation data."""
    if validation is None or not len(validation):
        return None
    callback = ValidationElboCallback(
        trainer, dataset_rows(validation, cfg.val_max_sequences), pad_id=pad_id,
        schedule=get_schedule(cfg.diffusion.schedule, cfg.diffusion.t_eps), t_points=cfg.val_t_points,
        eval_steps=cfg.eval_steps, batch_size=cfg.per_device_batch_size,
    )
    trainer.add_callback(callback)
    return callback


def train_stage(
    run: RunConfig,
    stage: str,
    dataset_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    init_model_dir: str | Path | None = None,
    resume: bool = False,
    report_to: str | list[str] = "none",
    callbacks: list[TrainerCallback] | None = None,
    show_progress: bool = True,
) -> StageResult:
    """Train `stage` ("pretrain" or "sft") of `run` and save the model to out_dir/model.

    The model starts from `init_model_dir` (or the stage's `init_from`), else it is built fresh
    from run.model. Checkpoints go to out_dir/checkpoints; `resume` continues from the last
    complete one short of max_steps. Otherwise (no such checkpoint, or `resume` False) the stage
    trains from scratch and the folder's old checkpoints are removed first.
    """
    if stage not in TRAINING_STAGES:
        raise ValueError(f"unknown stage {stage!r}: expected one of {TRAINING_STAGES}")
    cfg = getattr(run, stage)
    out_dir = Path(out_dir)
    if cfg.deepspeed and "RANK" not in os.environ:
        os.environ.update(single_process_env())
    tokenizer = load_tokenizer(tokenizer_dir)
    data = load_stage_datasets(dataset_dir)
    checkpoint_dir = out_dir / "checkpoints"
    args = training_arguments(
        cfg, checkpoint_dir, report_to=report_to, disable_tqdm=not show_progress, eval_strategy="no",
    )
    checkpoint = resumable_checkpoint(checkpoint_dir, cfg.max_steps) if resume else None
    if checkpoint is not None:
        log.info("resuming %s from %s", stage, checkpoint)
    else:
        with args.main_process_first(local=False):
            if args.should_save and (stale := remove_checkpoints(checkpoint_dir)):
                log.info("%s starts from scratch: removed %s", stage, [p.name for p in stale])
    set_seed(cfg.seed)
    start = init_model_dir or cfg.init_from
    # built after TrainingArguments so a ZeRO-3 config creates the parameters inside zero.Init
    model = load_merged_model(start) if start else build_model(run.model, tokenizer)
    adapting = cfg.adapter.enabled
    if adapting:
        if not start:
            raise ValueError(f"{stage}.adapter.method={cfg.adapter.method} needs a model to adapt: "
                             f"{stage} starts from a fresh model (set {stage}.init_from)")
        model = attach_adapter(model, cfg.adapter)
    collator = DiffusionCollator.from_tokenizer(cfg.diffusion, tokenizer, run.model.max_seq_len)
    token_ids = special_token_ids(tokenizer)
    trainer = DiffusionTrainer(
        model=model,
        args=args,
        train_dataset=training_rows(cfg, stage, data, dataset_dir),
        data_collator=collator,
        diffusion_config=cfg.diffusion,
        mask_token_id=token_ids["mask"],
        callbacks=[*(callbacks or []), *pruning_callbacks()],
    )
    validation = validation_callback(trainer, cfg, data.get("validation"), token_ids["pad"])
    with PeakMemory() as memory:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics: dict[str, Any] = {**output.metrics, **memory.metrics()}
    metrics["parameters"] = count_parameters(model)
    metrics["trainable_parameters"] = count_parameters(model, trainable_only=True)
    metrics["steps"] = trainer.state.global_step
    metrics["tokens_seen"] = trainer.state.num_input_tokens_seen
    metrics["tokens_per_second"] = round(trainer.session_tokens / max(output.metrics["train_runtime"], 1e-9), 1)
    metrics["world_size"] = trainer.args.world_size
    if validation is not None:
        metrics["val_elbo"] = validation.last

    model_dir = out_dir / "model"
    if trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 3:
        trainer.save_model(str(model_dir))  # every rank: gathers the ZeRO-3 shards into full weights
        unset_hf_deepspeed_config()  # else this load, and every later one in the process, is partitioned again
        if trainer.is_world_process_zero():  # the only writer; other ranks would race its save
            model = ModernBertForMaskedLM.from_pretrained(model_dir)
    if trainer.is_world_process_zero():
        info = stage_model_info(run, stage, data["train"], token_ids)
        if adapting:
            save_adapted_folder(model, tokenizer, model_dir, start, cfg.adapter.save, info=info)
        else:
            save_model_folder(model, tokenizer, model_dir, info=info)
        run.save_yaml(model_dir / FOLDER_CONFIG_NAME)
        (model_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return StageResult(model_dir=model_dir, metrics=metrics)


def join_process_group(cfg: LaunchedTrainingConfig, stage: str) -> int:
    """In a launched process of several: join the process group with the stage's ddp_timeout.
    Returns torchrun's restart count (above 0 the stage resumes from its last complete checkpoint)."""
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        # Every process group waits ddp_timeout at most. TrainingArguments passes no timeout on the
        # CPU, and DeepSpeed creates its ZeRO groups without one, so both get torch's default.
        timeout = timedelta(seconds=cfg.ddp_timeout)
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
        cuda = torch.cuda.is_available() and not cfg.use_cpu
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart:
        log.info("torchrun restart %d: %s resumes from its last complete checkpoint", restart, stage)
    return restart


@record  # a rank's exception goes to the error file torchrun names, read back by the launching process
def main(argv: list[str] | None = None) -> int:
    """Entry point of one training process, for `deepspeed` / `torchrun` launches:

    torchrun --nproc_per_node 2 -m dgpt_core.training.stage --run-config run_config.yaml --stage pretrain \\
        --dataset-dir D --tokenizer-dir T --out-dir O [--init-model-dir M] [--resume]

    Without --resume the stage starts clean (its old checkpoints are removed), except after a
    torchrun restart (TORCHELASTIC_RESTART_COUNT > 0), which resumes from the last complete
    checkpoint the failed attempt saved. With several processes this one joins the process group
    with the stage's ddp_timeout.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dgpt_core.training.stage", description=main.__doc__)
    parser.add_argument("--run-config", required=True, help="resolved RunConfig YAML")
    parser.add_argument("--stage", required=True, choices=TRAINING_STAGES)
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--tokenizer-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--init-model-dir", default=None)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last complete checkpoint short of max_steps")
    parser.add_argument("--report-to", default="none", help="transformers report_to (e.g. mlflow)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run = RunConfig.from_yaml(args.run_config)
    restart = join_process_group(getattr(run, args.stage), args.stage)
    result = train_stage(
        run, args.stage, args.dataset_dir, args.tokenizer_dir, args.out_dir,
        init_model_dir=args.init_model_dir, resume=args.resume or restart > 0, report_to=args.report_to,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(args.out_dir) / "stage_result.json").write_text(
            json.dumps({"model_dir": str(result.model_dir), "metrics": result.metrics}, indent=2, default=float)
        )
    if torch.distributed.is_initialized():
        # Left to interpreter teardown, gloo's threads can abort the process (SIGABRT, the launcher's
        # exit code 250) after a stage that finished and saved.
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
