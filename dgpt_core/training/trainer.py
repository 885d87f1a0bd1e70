"""`DiffusionTrainer`: the HF Trainer with the diffusion loss, so DeepSpeed, accelerate,
checkpointing and tracking callbacks work unchanged."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..cli_errors import NotFoundError
from ..config import DiffusionConfig, TrainingConfig
from ..diffusion.collator import IGNORE_INDEX, DiffusionCollator
from ..diffusion.elbo import Row, elbo_per_token
from ..diffusion.loss import LossParts, diffusion_loss
from ..generation.schedules import NoiseSchedule


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm; raised instead of silently skipping it."""


class CurriculumCallback(TrainerCallback):
    """Starts the collator's curriculum clock at the current step, so every batch knows the step
    it is trained at (the edit-stage switch and annealing follow it); on resume the clock restarts
    at the checkpoint's step, so the curriculum state is restored with it."""

    def __init__(self, collator: DiffusionCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.start_epoch(state.global_step, state.max_steps, args.gradient_accumulation_steps)


class _SessionStartCallback(TrainerCallback):
    """Once the engine is set up and any checkpoint is loaded: starts the throughput clock and
    records the step this training session starts from."""

    def __init__(self, trainer: StageTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._start_session()


class ValidationElboCallback(TrainerCallback):
    """Logs `val_elbo`, the ELBO in nats per target token of fixed validation rows (fixed t grid,
    masks seeded per row), every `eval_steps` optimizer steps and at the last step.

    It goes through `trainer.log`, so every reporting integration records it as a curve of the
    training run; the last value is computed at the final step's end, before `on_train_end` (where
    the MLflow callback ends its run). Every process computes it on the unwrapped model (ZeRO-3
    gathers parameters in the forward), with gradients off and the train mode restored.
    """

    def __init__(
        self, trainer: DiffusionTrainer, rows: list[Row], *, pad_id: int, schedule: NoiseSchedule,
        t_points: int, eval_steps: int | None, batch_size: int,
    ):
        self.trainer = trainer
        self.rows = rows
        self.pad_id = pad_id
        self.schedule = schedule
        self.t_points = t_points
        self.eval_steps = eval_steps
        self.batch_size = batch_size
        self.last: float | None = None
        """The latest val_elbo (the final one once training has ended)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        due = control.should_training_stop or (self.eval_steps and state.global_step % self.eval_steps == 0)
        if not due:
            return
        self.last = elbo_per_token(
            model, self.rows, mask_id=self.trainer.mask_token_id, pad_id=self.pad_id, schedule=self.schedule,
            t_points=self.t_points, batch_size=self.batch_size, block_size=self.trainer.diffusion_config.block_size,
        )
        loss_log_due = control.should_log  # trainer.log clears it, which would drop this step's loss log
        self.trainer.log({"val_elbo": self.last})
        control.should_log = loss_log_due


COMPLETE_MARKER = "checkpoint_complete.json"


def mark_complete(folder: Path, step: int) -> None:
    """Write the completion marker of a fully saved checkpoint folder."""
    (folder / COMPLETE_MARKER).write_text(f'{{"global_step": {step}}}\n')


def rotate_checkpoints(checkpoint_dir: str | Path, keep: int, protected: Path | None = None) -> list[Path]:
    """Delete all but the `keep` highest-step checkpoint-N folders (never `protected`); returns them.
    Each folder loses its marker before its files, so a kill midway leaves an unmarked folder
    that resuming ignores, never a marked half-deleted one."""
    folders = sorted(Path(checkpoint_dir).glob("checkpoint-*"), key=checkpoint_step)
    doomed = [f for f in folders[:max(len(folders) - keep, 0)] if protected is None or f.resolve() != protected.resolve()]
    for folder in doomed:
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder)
    return doomed


def checkpoint_step(folder: Path) -> int:
    """The optimizer step a checkpoint-N folder was saved at."""
    return int(folder.name.rsplit("-", 1)[1])


def latest_complete_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The highest-step checkpoint-N folder under `checkpoint_dir` that carries the marker."""
    folders = [p for p in Path(checkpoint_dir).glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return max(folders, key=checkpoint_step, default=None)


def resumable_checkpoint(checkpoint_dir: str | Path, max_steps: int) -> Path | None:
    """The latest complete checkpoint when it is short of `max_steps`. A finished one is not
    resumed from: the Trainer would run one more step past it and report only that step."""
    checkpoint = latest_complete_checkpoint(checkpoint_dir)
    return checkpoint if checkpoint is not None and checkpoint_step(checkpoint) < max_steps else None


def remove_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Delete every checkpoint-N folder (complete or not) under `checkpoint_dir`; returns them."""
    return rotate_checkpoints(checkpoint_dir, keep=0)


DEEPSPEED_CONFIG_DIR = Path(__file__).parent / "deepspeed"


def resolve_deepspeed(value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """A DeepSpeed config dict (returned as is), the name of one shipped in dgpt_core/training/deepspeed
    (`zero2`: no path separator, no .json suffix; never looked up in the working directory), or
    the path of a JSON file, which must exist; a NotFoundError names what is missing."""
    if not isinstance(value, str):
        return value
    if Path(value).name == value and not value.endswith(".json"):
        shipped = DEEPSPEED_CONFIG_DIR / f"{value}.json"
        if not shipped.is_file():
            names = sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob("*.json"))
            raise NotFoundError(f"unknown DeepSpeed config {value!r}: use one of {names} or a path to a JSON file")
        return str(shipped)
    if not Path(value).is_file():
        raise NotFoundError(f"DeepSpeed config file {value} does not exist")
    return value


def join_deepspeed_comm(args: TrainingArguments) -> None:
    """Hand the process group the TrainingArguments started to deepspeed.comm. On the CPU
    accelerate starts only torch.distributed, and ZeRO-3's zero.Init (the model is built before
    the engine) checks its batch sizes against deepspeed.comm's world size before it initialises
    deepspeed.comm itself: 1, so `train_batch_size` (filled for the whole world) fails the check."""
    from deepspeed import comm

    if args.world_size > 1 and not comm.is_initialized():
        comm.init_distributed(dist_backend=args.distributed_state.backend, auto_mpi_discovery=False)


CHECKPOINTING_ARGUMENT = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                              if name in TrainingArguments.__dataclass_fields__)
"""The TrainingArguments field of per-layer activation (gradient) checkpointing: later transformers
5.x releases renamed `gradient_checkpointing`, which stays as a deprecated alias that warns."""


def training_arguments(cfg: TrainingConfig, output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """TrainingArguments from the typed config, with the settings the diffusion trainer relies on;
    with DeepSpeed, deepspeed.comm joins the process group (`join_deepspeed_comm`)."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or cfg.max_steps,
        save_total_limit=cfg.save_total_limit,
        dataloader_num_workers=cfg.dataloader_num_workers,
        train_sampling_strategy=cfg.train_sampling,
        dataloader_pin_memory=torch.cuda.is_available() and not cfg.use_cpu,
        seed=cfg.seed,
        data_seed=cfg.seed,
        deepspeed=resolve_deepspeed(cfg.deepspeed),
        use_cpu=cfg.use_cpu,
        remove_unused_columns=False,  # eligible_mask is not a model argument
        logging_nan_inf_filter=False,  # a NaN must surface, not be replaced by the running mean
        report_to="none",
        include_num_input_tokens_seen="non_padding",
    )
    if cfg.gradient_checkpointing:
        # non-reentrant, torch's recommended variant: the reentrant one needs an input that requires grad
        kwargs[CHECKPOINTING_ARGUMENT] = True
        kwargs[f"{CHECKPOINTING_ARGUMENT}_kwargs"] = {"use_reentrant": False}
    kwargs.update(overrides)
    args = TrainingArguments(**kwargs)
    if args.deepspeed:
        join_deepspeed_comm(args)
    return args


def call_as_forward(model: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """`fn()` run as the forward of the module a DeepSpeed engine or DDP wraps, called through the
    wrapper; a plain module just runs `fn()`. The wrapper's forward does bookkeeping its backward
    relies on (ZeRO counts accumulation micro-steps and hooks its backward prologue onto the output
    tensors, DDP prepares its reducer), which calling the module's submodules directly skips: under
    ZeRO-3 every micro-batch's gradients then overwrite the previous ones'."""
    module = getattr(model, "module", None)
    if module is None:
        return fn()
    own = module.__dict__.get("forward")  # accelerate may have set one (autocast)
    module.forward = fn
    try:
        return model()
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


class StageTrainer(Trainer):
    """The HF Trainer as every training stage of the project runs it: checkpoints marked complete
    before older ones are rotated away (what resuming after `kill -9` relies on), a NaN/inf loss
    or gradient norm raised instead of skipped, and `train_loss` the mean over the steps this
    session ran (after a resume: since the checkpoint). Subclasses define the loss."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.add_callback(_SessionStartCallback(self))
        self._session_start_step = 0
        self._session_start_tokens = 0

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's save with the marker written before older checkpoints are rotated away
        (the Trainer rotates first and calls `on_save` after, so a kill during rotation could
        leave no marked checkpoint but a half-deleted one still marked)."""
        keep, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = keep
        if self.args.world_size > 1:
            torch.distributed.barrier()  # every rank's own files (rng_state_N.pth, ZeRO shards) are written
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            mark_complete(folder, self.state.global_step)
            if keep:
                best = self.state.best_model_checkpoint
                rotate_checkpoints(folder.parent, keep, protected=Path(best) if best else None)

    def _start_session(self) -> None:
        self._session_start_step = self.state.global_step
        self._session_start_tokens = self.state.num_input_tokens_seen

    @property
    def session_tokens(self) -> int:
        """Input tokens the Trainer counted (`include_num_input_tokens_seen`; all processes) since
        this training session started (after a resume: since the checkpoint)."""
        return self.state.num_input_tokens_seen - self._session_start_tokens

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.state.global_step}; "
                "lower the learning rate, check the data, or use fp32/bf16 instead of fp16"
            )
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise NonFiniteLossError(f"non-finite gradient norm ({float(grad_norm)}) at step {self.state.global_step}")
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs:  # this session's mean; transformers 5.0 divides by global_step
            logs["train_loss"] = self._total_loss_scalar / max(self.state.global_step - self._session_start_step, 1)
        super().log(logs, start_time)


class DiffusionTrainer(StageTrainer):
    """Trainer whose loss is the ELBO-weighted masked loss plus the edit loss.

    The loss of each micro-batch is divided by the normaliser of the whole gradient-accumulation
    window (and of all processes), so 2 x batch 4 gives the same update as 1 x batch 8.
    Logs per step: loss, masked_loss, edit_loss, mean_t, edit_prob, edit_stage, tokens_per_second;
    at the end train_loss, the mean loss over the steps this session ran (after a resume: since
    the checkpoint).
    """

    def __init__(self, *args: Any, diffusion_config: DiffusionConfig, mask_token_id: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.diffusion_config = diffusion_config
        self.mask_token_id = mask_token_id
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        if isinstance(self.data_collator, DiffusionCollator):
            self.add_callback(CurriculumCallback(self.data_collator))
        self._reset_log_accumulators()

    def _start_session(self) -> None:
        super()._start_session()
        self._reset_log_accumulators()

    def _reset_log_accumulators(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._micro_steps = 0
        self._tokens = 0
        self._log_clock = time.perf_counter()
        self._log_step = self.state.global_step if hasattr(self, "state") else 0

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        if self.diffusion_config.loss_normalization == "token":
            count = sum((batch["labels"] != IGNORE_INDEX).sum() for batch in batch_samples)
        else:
            count = torch.tensor(sum(batch["labels"].shape[0] for batch in batch_samples))
        count = count.to(device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        def objective() -> tuple[torch.Tensor, LossParts]:
            parts = diffusion_loss(
                model,
                inputs,
                mask_id=self.mask_token_id,
                normalization=self.diffusion_config.loss_normalization,
                normalizer=num_items_in_batch,
                edit_loss_weight=self.diffusion_config.edit_loss_weight,
            )
            return parts.total, parts  # DeepSpeed hooks the tensor, not the dataclass

        loss, parts = call_as_forward(model, objective)
        if num_items_in_batch is not None and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP/ZeRO average gradients over processes
        if model.training:
            self._accumulate_logs(inputs, parts)
        return (loss, None) if return_outputs else loss

    def _accumulate_logs(self, inputs: dict[str, torch.Tensor], parts) -> None:
        values = {
            "masked_loss": parts.masked.detach(),
            "edit_loss": parts.edit.detach(),
            "mean_t": inputs["t"].float().mean(),
            "edit_prob": inputs["edit_prob"].float(),
            "edit_stage": inputs["edit_active"].float(),
        }
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._micro_steps += 1
        self._tokens += int(inputs["attention_mask"].sum())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._micro_steps:
            keys = ("masked_loss", "edit_loss", "mean_t", "edit_prob", "edit_stage")
            totals = torch.stack([torch.as_tensor(self._sums[k], dtype=torch.float64).cpu() for k in keys]
                                 + [torch.tensor(float(self._tokens)), torch.tensor(float(self._micro_steps))])
            if self.args.world_size > 1:  # every rank logs; sum the parts like the Trainer sums the loss
                totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum").cpu()
            sums = dict(zip(keys, totals[:5].tolist()))
            tokens, micro_steps = totals[5].item(), totals[6].item()
            steps = max(self.state.global_step - self._log_step, 1)
            # masked/edit losses are per optimizer step (window-normalised), the rest per micro-batch
            for key in ("masked_loss", "edit_loss"):
                logs[key] = round(sums[key] / steps, 6)
            for key in ("mean_t", "edit_prob", "edit_stage"):
                logs[key] = round(sums[key] / micro_steps, 6)
            elapsed = time.perf_counter() - self._log_clock
            logs["tokens_per_second"] = round(tokens / max(elapsed, 1e-9), 1)
            self._reset_log_accumulators()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
