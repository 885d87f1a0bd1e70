"""Typed configuration of the engine: model, diffusion objective and training loop.

Every field carries a docstring (pydantic turns it into the field description), unknown keys are
rejected, and each config round-trips through YAML so the resolved config can be saved beside
every checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictConfig(BaseModel):
    """Base of every config: unknown keys are errors, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def from_yaml(cls, path: str | Path) -> StrictConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)


class ModelConfig(StrictConfig):
    """Shape of the ModernBERT backbone, or the pretrained checkpoint to start from."""

    hidden_size: int = Field(256, gt=0)
    """Width of the residual stream."""
    num_layers: int = Field(4, gt=0)
    """Number of transformer layers."""
    num_heads: int = Field(4, gt=0)
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int = Field(512, gt=0)
    """Width of the GLU feed-forward block."""
    max_seq_len: int = Field(128, gt=0)
    """Maximum sequence length (positions) the model is built and trained for."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel; sdpa and eager train on CPU, flex_attention has no CPU backward."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout applied to embeddings, attention and MLP outputs."""
    global_attn_every_n_layers: int = Field(1, gt=0)
    """ModernBERT alternates global and local (sliding-window) attention; 1 = global everywhere."""
    local_attention: int = Field(128, gt=0)
    """Sliding-window size of the local-attention layers."""
    init_from: str | None = None
    """Pretrained checkpoint (Hub name or local folder) to start from instead of random init,
    e.g. answerdotai/ModernBERT-base; embeddings are resized to the tokenizer."""
    initializer_range: float = Field(0.02, gt=0)
    """Standard deviation of the truncated-normal weight init."""

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        return self


class DiffusionConfig(StrictConfig):
    """The MDLM masking objective and Seed Diffusion edit corruption."""

    schedule: Literal["linear", "loglinear", "cosine"] = "linear"
    """Noise schedule alpha(t); linear is the original project's, loglinear MDLM's default."""
    t_eps: float = Field(1e-3, gt=0.0, lt=0.5)
    """t is clamped to [t_eps, 1] so the ELBO weight w(t) stays bounded."""
    t_sampling: Literal["uniform", "stratified"] = "stratified"
    """uniform: i.i.d. t per sequence; stratified: low-discrepancy t over the batch (lower variance)."""
    loss_normalization: Literal["token", "sequence"] = "token"
    """token: divide summed loss by the number of eligible tokens (MDLM); sequence: by each
    sequence's eligible count, then average over sequences (LLaDA SFT)."""
    edit_start: float = Field(0.8, ge=0.0, le=1.0)
    """Fraction of training after which the edit stage starts (0.0 = edits from the first step,
    1.0 = never)."""
    edit_prob: float = Field(0.1, ge=0.0, le=1.0)
    """Probability that a visible eligible token is swapped for a random token in the edit stage."""
    edit_prob_final: float | None = Field(None, ge=0.0, le=1.0)
    """When set, edit_prob is linearly annealed to this value from the edit start to the end."""
    edit_loss_targets: Literal["visible", "corrupted"] = "visible"
    """Which visible tokens get the unweighted reconstruction loss in the edit stage: every
    visible eligible token (the original project) or only the swapped and inserted ones."""
    edit_loss_weight: float = Field(1.0, ge=0.0)
    """Multiplier of the edit loss in the total loss."""
    insert_prob: float = Field(0.0, ge=0.0, le=1.0)
    """Per visible eligible token, probability of inserting a spurious token before it (edit stage
    only), labelled <|delete|>: the model learns to flag tokens that should not be there, and the
    sampler's editing steps delete them."""
    insert_copy_prob: float = Field(0.5, ge=0.0, le=1.0)
    """Share of inserted tokens that copy the token they precede (a duplicated word); the rest
    are random non-special tokens."""
    seed: int = 0
    """Seed of the collator's generator; each batch derives its own stream from it."""


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
    dataloader_num_workers: int = Field(0, ge=0)
    """DataLoader worker processes (the collator is safe in workers)."""
    seed: int = 0
    """Seed for model init, data order and dropout."""
    deepspeed: str | dict[str, Any] | None = None
    """DeepSpeed config: a dict, the name of a config shipped in dgpt_core/deepspeed (zero1, zero2,
    zero3, zero2_offload: no path separator, no .json suffix), or the path of a JSON file; None
    trains without DeepSpeed."""
    use_cpu: bool = False
    """Force CPU even when CUDA is available (needed for DeepSpeed on CPU)."""
