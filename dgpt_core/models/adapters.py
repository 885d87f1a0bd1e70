"""peft adapters on the ModernBERT backbone: attach one for a stage (`attach_adapter`), save the
adapted model folder merged or as the adapter beside its base (`save_adapted_folder`), and load
either kind of folder back as one plain model to train from (`load_merged_model`).

An adapter folder is a model folder (config.json with the model info and sampler defaults, the
tokenizer, the pipeline files) whose model.safetensors is a relative link to the base folder's
weights, plus peft's adapter_config.json and adapter_model.safetensors. transformers loads such a
folder as base + adapter by itself (peft installed), so `from_pretrained`, the text-diffusion
pipeline and dgpt serve need nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import ModernBertForMaskedLM, PreTrainedTokenizerBase

from ..config.adapter import AdapterConfig
from .export import save_model_folder
from .info import ModelInfo

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = "model.safetensors"


def peft_config(cfg: AdapterConfig):
    """The peft config of `cfg.method` on `cfg.target_modules`."""
    import peft

    targets = list(cfg.target_modules)
    if cfg.method in ("lora", "dora"):
        return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                               use_dora=cfg.method == "dora")
    if cfg.method == "loha":
        return peft.LoHaConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=targets)
    if cfg.method == "lokr":
        return peft.LoKrConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=targets)
    if cfg.method == "ia3":  # the MLP's input projection is rescaled on its input, the others on their output
        return peft.IA3Config(target_modules=targets, feedforward_modules=[m for m in targets if m == "Wi"])
    raise ValueError(f"adapter.method={cfg.method!r} attaches no adapter")


def attach_adapter(model: ModernBertForMaskedLM, cfg: AdapterConfig) -> torch.nn.Module:
    """`model` with `cfg`'s adapter attached: a peft model whose only trainable parameters are the
    adapter's. Not under ZeRO-3 (its gathered save of a peft model is not a model folder)."""
    import peft
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise ValueError(f"adapter.method={cfg.method} is trained under ZeRO stage 0-2, not ZeRO-3")

    return peft.get_peft_model(model, peft_config(cfg))


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def save_adapted_folder(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    base_dir: str | Path,
    save: str,
    sampler_defaults: dict[str, Any] | None = None,
    info: ModelInfo | None = None,
) -> Path:
    """Save the trained peft `model` (attached to the weights of the model folder `base_dir`) as a
    model folder: `save="merged"` merges the adapter into the weights; `save="adapter"` keeps the
    adapter and links the base's weights. The model is merged in place either way."""
    out = Path(out_dir)
    if save == "adapter":
        if is_adapter_folder(base_dir):
            raise ValueError(f"{base_dir} is an adapter folder: an adapter folder's base must hold its own weights "
                             "(save the earlier stage with adapter.save=merged)")
        base_weights = Path(base_dir).resolve() / WEIGHTS
        if not base_weights.is_file():
            raise FileNotFoundError(f"{base_dir}: no {WEIGHTS} for the adapter folder to link")
        model.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)  # peft's empty model card; publishing writes the card
        adapter_config = json.loads((out / ADAPTER_CONFIG).read_text())
        adapter_config["base_model_name_or_path"] = str(base_weights.parent)
        (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    save_model_folder(model.merge_and_unload(), tokenizer, out, sampler_defaults=sampler_defaults, info=info)
    if save == "adapter":
        weights = out / WEIGHTS
        weights.unlink()
        weights.symlink_to(os.path.relpath(base_weights, out.resolve()))
    return out


def load_merged_model(folder: str | Path) -> ModernBertForMaskedLM:
    """The model of a model folder as one plain ModernBertForMaskedLM, an adapter folder's adapter
    merged into its base's weights (what a later stage trains from)."""
    if not is_adapter_folder(folder):
        return ModernBertForMaskedLM.from_pretrained(folder)
    import peft

    base = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    return peft.PeftModel.from_pretrained(ModernBertForMaskedLM.from_pretrained(base), folder).merge_and_unload()
