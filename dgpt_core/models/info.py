"""What a saved model folder is and how to decode it, recorded in its `config.json`.

Every folder the pipeline writes carries, beside the transformers config:

- `diffusion_gpt` (`ModelInfo`): the model kind (untrained, pretrain, sft), the noise schedule it
  was trained with, the SFT answer canvas and padding mode, and how many chat messages preceded
  an answer in SFT;
- `sampler_defaults`: the `SamplerConfig` fields the `text-diffusion` pipeline, `dgpt generate`,
  `dgpt chat`, the eval suite and the lm-eval adapter use unless told otherwise. A first guess
  from the model info is written at save time; the pipeline replaces it by the best setting of
  the model's own eval (`choose_sampler_defaults`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ..generation.options import DEFAULTS_KEY, INFO_KEY, SamplerConfig, method_options

ModelKind = Literal["untrained", "pretrain", "sft"]
MODEL_KINDS: tuple[str, ...] = ("untrained", "pretrain", "sft")


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder is: enough to prompt, score and decode it the way it was trained."""

    kind: ModelKind
    """untrained (fresh init), pretrain (plain text) or sft (chat answers)."""
    schedule: str = "linear"
    """Noise schedule alpha(t) of the training objective (the ancestral sampler and the ELBO follow it)."""
    t_eps: float = 1e-3
    """Lower clamp of t in training."""
    answer_canvas: int | None = None
    """SFT answer canvas (tokens of answer + <|im_end|> + padding) it was trained on; None = none."""
    long_answer_canvas: int | None = None
    """SFT canvas of answers longer than `answer_canvas` (biographies, open-ended replies); None = none."""
    answer_padding: str = "none"
    """SFT answer padding: eos (answers padded with end-of-text to the canvas) or none."""
    context_messages: int | None = None
    """Most chat messages that preceded an answer in SFT (1 = single-turn: one user message);
    chat front ends send at most this much history. None = unknown / not a chat model."""
    block_size: int | None = None
    """Block diffusion: the model attends block-causally in blocks of this many tokens (the sampler
    decodes it block by block with an exact cache); None = a full-canvas model."""

    @property
    def trained_long_canvas(self) -> int | None:
        """The long-answer canvas an SFT model was trained on; None for other kinds."""
        return self.long_answer_canvas if self.kind == "sft" else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("kind") not in MODEL_KINDS:
            raise ValueError(f"model info has kind {known.get('kind')!r}; expected one of {MODEL_KINDS}")
        return cls(**known)

    @property
    def longest_answer(self) -> int | None:
        """The most new tokens an SFT model answers with: its long-answer canvas, else its answer canvas."""
        return self.long_answer_canvas or self.answer_canvas

    def initial_sampler_defaults(self) -> dict[str, Any]:
        """Sampler options before any eval: the trained schedule, and for SFT models the trained
        answer canvas decoded one argmax token per step by confidence; a block-causal SFT model
        decodes its blocks by confidence threshold (Fast-dLLM), up to its longest trained answer
        (a block holding end-of-text ends the answer)."""
        defaults: dict[str, Any] = {"schedule": self.schedule, "t_eps": self.t_eps}
        if self.kind == "sft" and self.block_size and self.longest_answer:
            defaults.update(strategy="threshold", steps=self.block_size, max_new_tokens=self.longest_answer,
                            temperature=0.0)
        elif self.kind == "sft" and self.answer_canvas:
            defaults.update(strategy="confidence", steps=self.answer_canvas, max_new_tokens=self.answer_canvas,
                            temperature=0.0)
        return defaults


def _config_path(model_dir: str | Path) -> Path:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} is not a model folder: no config.json")
    return path


def _rewrite_config(model_dir: str | Path, updates: Mapping[str, Any]) -> None:
    """Set top-level keys of config.json atomically (a reader never sees a half-written file)."""
    path = _config_path(model_dir)
    config = json.loads(path.read_text())
    config.update(updates)
    tmp = path.with_name(f".config.json.{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def model_info_of(model: Any) -> ModelInfo | None:
    """The ModelInfo a loaded model's config carries (transformers keeps config.json's extra keys
    as attributes), or None."""
    data = getattr(getattr(model, "config", None), INFO_KEY, None)
    return None if data is None else ModelInfo.from_dict(data)


def read_model_info(model_dir: str | Path) -> ModelInfo | None:
    """The folder's ModelInfo, or None for a folder written without one (e.g. a Hub checkpoint)."""
    data = json.loads(_config_path(model_dir).read_text()).get(INFO_KEY)
    return None if data is None else ModelInfo.from_dict(data)


def write_model_info(model_dir: str | Path, info: ModelInfo) -> None:
    _rewrite_config(model_dir, {INFO_KEY: info.to_dict()})


def read_sampler_defaults(model_dir: str | Path) -> dict[str, Any]:
    return dict(json.loads(_config_path(model_dir).read_text()).get(DEFAULTS_KEY) or {})


def write_sampler_defaults(model_dir: str | Path, defaults: Mapping[str, Any]) -> None:
    """Replace the folder's sampler defaults (validated as SamplerConfig fields)."""
    SamplerConfig(**defaults)  # raises on unknown fields or invalid values
    _rewrite_config(model_dir, {DEFAULTS_KEY: dict(defaults)})


def choose_sampler_defaults(
    skills: Mapping[str, Mapping[str, Any]],
    sweep: Mapping[str, Mapping[str, list[float]]],
    canvas: int,
    base: Mapping[str, Any] | None = None,
    tolerance: float = 0.01,
) -> dict[str, Any]:
    """The cheapest (strategy, steps) whose exact match is within `tolerance` of the best one.

    `skills`: per decoding method (a strategy, or a strategy with `+modifier`s) a row with
    `exact_match` and `steps` (the eval's dgpt_skills); `sweep`: per method {"steps": [...],
    "exact_match": [...]} (dgpt_skills_steps). Among the settings
    within tolerance of the best exact match, the fewest steps wins, then the higher exact match.
    """
    points: list[tuple[str, int, float]] = []
    for strategy, row in skills.items():
        points.append((strategy, int(row["steps"]), float(row["exact_match"])))
    for strategy, curve in sweep.items():
        points += [(strategy, int(s), float(em)) for s, em in zip(curve["steps"], curve["exact_match"])]
    if not points:
        raise ValueError("no exact-match results to choose sampler defaults from")
    best = max(em for _, _, em in points)
    method, steps, _ = min((p for p in points if p[2] >= best - tolerance), key=lambda p: (p[1], -p[2]))
    return {**(base or {}), **method_options(method), "steps": steps, "max_new_tokens": canvas}


def info_for_stage(run: Any, kind: ModelKind, context_messages: int | None = None) -> ModelInfo:
    """The ModelInfo of a model made by `run` (a RunConfig): untrained and pretrain models follow
    the pretraining objective, SFT models the SFT objective and answer canvas."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {MODEL_KINDS}")
    diffusion = (run.sft if kind == "sft" else run.pretrain).diffusion
    if kind != "sft":
        return ModelInfo(kind, diffusion.schedule, diffusion.t_eps, block_size=diffusion.block_size)
    sft = run.data.sft
    return ModelInfo(kind, diffusion.schedule, diffusion.t_eps, sft.answer_canvas, sft.long_answer_canvas,
                     sft.answer_padding, context_messages, diffusion.block_size)


def context_messages_of(input_ids: Any, im_start_id: int) -> int:
    """Most messages before the answer over SFT examples: <|im_start|> count minus the answer's own."""
    return max((sum(1 for t in ids if t == im_start_id) - 1 for ids in input_ids), default=0)
