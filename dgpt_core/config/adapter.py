"""Parameter-efficient fine-tuning of a stage: a peft adapter trained instead of the full model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictConfig

AdapterMethod = Literal["none", "lora", "dora", "loha", "lokr", "ia3"]


class AdapterConfig(StrictConfig):
    """Which peft adapter the stage trains (the base weights stay frozen) and how it is saved."""

    method: AdapterMethod = "none"
    """`none` trains every weight; `lora` (LoRA), `dora` (weight-decomposed LoRA), `loha`, `lokr`
    (Hadamard / Kronecker low-rank products) or `ia3` (learned rescaling of activations) train only
    the adapter's parameters on `target_modules`."""
    rank: int = Field(8, gt=0)
    """Rank of the low-rank update (lora, dora, loha, lokr)."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator of the update (alpha / rank; lora, dora, loha, lokr)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (lora, dora)."""
    target_modules: list[str] = Field(default_factory=lambda: ["Wqkv", "Wo", "Wi"])
    """Names of the adapted linear layers: ModernBERT's attention projections (Wqkv, Wo) and MLP
    (Wi, and Wo, which shares the attention output's name)."""
    save: Literal["merged", "adapter"] = "merged"
    """`merged`: the saved model folder holds the adapter merged into the weights and loads exactly
    as a fully trained one. `adapter`: it holds the adapter (adapter_config.json,
    adapter_model.safetensors) and a link to its base's weights, which transformers, the
    text-diffusion pipeline and dgpt serve load as base + adapter; the base folder must stay."""

    @property
    def enabled(self) -> bool:
        """Whether the stage trains an adapter (any method but `none`)."""
        return self.method != "none"

    @model_validator(mode="after")
    def _folder_loads_back(self) -> AdapterConfig:
        if self.method == "dora" and self.save == "adapter":
            # measured: transformers' load_adapter leaves DoRA's magnitude vectors at their initial
            # values (a key-name mismatch), so the folder would not decode as the trained model
            raise ValueError("adapter.method=dora needs adapter.save=merged: transformers does not load DoRA's "
                             "magnitude vectors from an adapter folder")
        return self
