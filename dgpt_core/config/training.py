"""Settings of a training stage: the optimisation loop (mapped onto transformers.TrainingArguments),
its diffusion objective and how its processes are launched."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .adapter import AdapterConfig
from .base import StrictConfig
from .diffusion import DiffusionConfig


class TrainingConfig(StrictConfig):
    """Optimisation and loop settings, mapped onto transformers.TrainingArguments."""

    max_steps: int = Field(200, gt=0)
    """Optimizer steps to run."""
    per_device_batch_size: int = Field(16, gt=0)
    """Sequences per device per micro-batch."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    """Fraction of steps spent in linear warmup."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name (cosine, linear, constant_with_warmup, ...)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; bf16 works on CPU and CUDA, fp16 only on CUDA."""
    gradient_checkpointing: bool = False
    """Keep only each ModernBERT layer's input from the forward and recompute the layer inside the
    backward (transformers' per-layer checkpointing, non-reentrant): activation memory falls from
    every layer's to one layer's plus the layer inputs, for about one more forward of compute per
    step. Forwards without gradients (validation, RL rollouts) are not affected."""
    logging_steps: int = Field(10, gt=0)
    """Log metrics every N optimizer steps."""
    save_steps: int | None = None
    """Checkpoint every N steps (None = only at the end)."""
    save_total_limit: int = Field(2, gt=0)
    """Keep at most this many checkpoints."""
    eval_steps: int | None = Field(None, gt=0)
    """Compute the validation ELBO (logged as val_elbo) every N optimizer steps; None = only at
    the end."""
    val_max_sequences: int = Field(64, gt=0)
    """The validation ELBO is computed on the first N sequences of the stage's validation split."""
    val_t_points: int = Field(8, gt=0)
    """Points of the validation ELBO's fixed t grid; each row gets one seeded mask per point, so a
    validation pass costs about val_max_sequences * val_t_points / per_device_batch_size forwards."""
    train_sampling: Literal["random", "group_by_length"] = "random"
    """Order of the training examples: `random`, or `group_by_length` (the transformers Trainer's
    LengthGroupedSampler: random groups of a few batches, each sorted by length, so long answers
    share batches and short ones are not padded to them)."""
    dataloader_num_workers: int = Field(0, ge=0)
    """DataLoader worker processes (the collator is safe in workers)."""
    seed: int = 0
    """Seed for model init, data order and dropout."""
    deepspeed: str | dict[str, Any] | None = None
    """DeepSpeed config: a dict, the name of a config shipped in dgpt_core/training/deepspeed (zero1, zero2,
    zero3, zero2_offload: no path separator, no .json suffix), or the path of a JSON file; None
    trains without DeepSpeed."""
    use_cpu: bool = False
    """Force CPU even when CUDA is available (needed for DeepSpeed on CPU)."""


class LaunchedTrainingConfig(TrainingConfig):
    """The loop settings plus how the stage's processes are launched (one in-process, or torchrun /
    the deepspeed launcher on one or several nodes)."""

    num_processes: int = Field(1, gt=0)
    """Training processes per node (GPUs, or CPU processes with use_cpu); 1 trains in-process."""
    num_nodes: int = Field(1, gt=0)
    """Nodes for multi-node training: launcher=deepspeed starts them all from its hostfile; with
    launcher=torchrun every node runs `dgpt train-node` itself (the flow cannot start them)."""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    """Launcher used when more than one process is asked for."""
    hostfile: str | None = None
    """DeepSpeed hostfile (`host slots=N` lines; multi-node with launcher=deepspeed): the launcher
    starts the first num_nodes hosts over ssh (pdsh), in the same working directory and Python."""
    rdzv_endpoint: str | None = None
    """host:port every node reaches: the c10d rendezvous of `dgpt train-node` (torchrun), or rank
    0's address and port for launcher=deepspeed (default: the first host's `hostname -I`, 29500)."""
    max_restarts: int = Field(0, ge=0)
    """torchrun launches: how often the processes are all restarted after one of them dies (a
    crash, an OOM kill, a lost node); each restart resumes from the last complete checkpoint, so
    set save_steps. The deepspeed launcher does not restart: it needs 0."""
    ddp_timeout: int = Field(1800, gt=0)
    """Launched runs: seconds a process waits at a collective (gradient all-reduce, barrier) for
    the others before it fails, so a rank that died or hangs ends the job instead of stalling it."""
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    """A peft adapter (LoRA, ...) trained instead of every weight of the starting model (SFT and RL;
    a stage that adapts needs a model to start from), and whether its folder is merged."""

    @model_validator(mode="after")
    def _restarts_need_torchrun(self) -> LaunchedTrainingConfig:
        if self.max_restarts and self.launcher != "torchrun":
            raise ValueError(f"max_restarts={self.max_restarts} needs launcher=torchrun (the deepspeed launcher "
                             "does not restart processes)")
        return self


class StageConfig(LaunchedTrainingConfig):
    """A training stage (pretraining or SFT): the loop settings plus its diffusion objective."""

    enabled: bool = True
    """Run this stage; a disabled SFT stage publishes the pretrained model, a disabled pretraining
    stage starts SFT from `init_from` or a fresh model."""
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    """Noise schedule, edit corruption and curriculum of this stage."""
    pretrain_replay: float = Field(0.0, ge=0.0, lt=1.0)
    """SFT only: the share of the training rows that are pretraining text (rows of the data
    stage's pretraining split, scored on every token), so the facts pretraining stored survive
    SFT (`dgpt_core.data.replay`); 0 replays nothing. The `sft_control` model never replays: it
    must not read the biographies."""
    pretrain_replay_tokens: int | None = Field(None, gt=0)
    """Replayed pretraining rows are cut into pieces of at most this many tokens, each piece a
    replayed row (None: whole rows). Short pieces batch at about the cost of SFT rows."""
    init_from: str | None = None
    """Start from this saved model folder instead of the previous stage's model (SFT) or a fresh
    model (pretraining)."""
