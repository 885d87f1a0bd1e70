"""Save a trained model as one self-contained folder for the `text-diffusion` pipeline.

The folder holds the safetensors weights, config.json (with `custom_pipelines` and optional
`sampler_defaults`), the tokenizer files with the chat template, and flat copies of the modules of
`dgpt_core.generation` (the pipeline, the sampler, its options and ops, the block attention and the
noise schedules; `PIPELINE_FILES`), so that in any process with torch and transformers

    transformers.pipeline("text-diffusion", model=folder, trust_remote_code=True)

loads and generates. The same folder is what gets published to the Hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..generation.options import DEFAULTS_KEY, SamplerConfig
from ..generation.pipeline import TASK
from .backbone import unwrap
from .info import INFO_KEY, ModelInfo

PIPELINE_FILES = ("pipeline.py", "sampler.py", "options.py", "ops.py", "attention.py", "schedules.py")
"""The modules of `dgpt_core.generation` copied beside the weights (they import only torch,
transformers and each other)."""
CUSTOM_PIPELINES = {
    TASK: {"impl": "pipeline.TextDiffusionPipeline", "pt": ["AutoModelForMaskedLM"], "type": "text"},
}


def save_model_folder(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    sampler_defaults: dict[str, Any] | None = None,
    info: ModelInfo | None = None,
) -> Path:
    """Write the model folder and return its path.

    `info` (what the model is: kind, schedule, answer canvas; see `models/info.py`) goes into
    config.json. `sampler_defaults` are SamplerConfig fields (validated here) that the pipeline
    uses unless a call overrides them, e.g. {"strategy": "confidence", "steps": 16,
    "max_new_tokens": 32}; None takes `info.initial_sampler_defaults()` when `info` is given, else
    keeps whatever defaults the model's config already carries; {} removes them.
    The model may be wrapped (DDP, DeepSpeed engine, torch.compile); under ZeRO-3 gather the
    weights first (the trainer's consolidated save).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sampler_defaults is None and info is not None:
        sampler_defaults = info.initial_sampler_defaults()
    defaults = None if sampler_defaults is None else dict(sampler_defaults)
    if defaults is not None:
        SamplerConfig(**defaults)  # raises on unknown fields or invalid values
        if defaults.get("stop_token_ids") is not None:
            defaults["stop_token_ids"] = [int(i) for i in defaults["stop_token_ids"]]

    unwrap(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = Path(__file__).parents[1] / "generation"
    for name in PIPELINE_FILES:
        shutil.copyfile(source / name, out / name)

    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["custom_pipelines"] = CUSTOM_PIPELINES
    if info is not None:
        config[INFO_KEY] = info.to_dict()
    if defaults:
        config[DEFAULTS_KEY] = defaults
    elif defaults is not None:
        config.pop(DEFAULTS_KEY, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
