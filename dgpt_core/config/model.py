"""Shape of the ModernBERT backbone, or the pretrained checkpoint to start from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictConfig


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
