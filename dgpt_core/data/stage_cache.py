"""Cache keys of the data stages: what each stage's output depends on, and whether a complete
output with that key can be reused."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import DataConfig, SourceSpec
from .manifest import is_complete
from .sources import resolve
from .world import WORLD_VERSION

log = logging.getLogger("dgpt_core.data")


def uses_skills(sources: list[SourceSpec]) -> bool:
    """Whether any source is the built-in synthetic skills generator."""
    return any(resolve(s).builtin == "skills" for s in sources)


def uses_world(sources: list[SourceSpec]) -> bool:
    """Whether any source is the built-in synthetic world of people."""
    return any(resolve(s).builtin == "world" for s in sources)


def source_inputs(data_cfg: DataConfig, sources: list[SourceSpec]) -> dict[str, Any]:
    """What a stage built from `sources` depends on: the source specs, the data seed and split, and
    the skills / world settings when a source generates them."""
    inputs: dict[str, Any] = {
        "sources": [s.model_dump(mode="json") for s in sources],
        "seed": data_cfg.seed,
        "validation_fraction": data_cfg.validation_fraction,
    }
    if uses_skills(sources):
        inputs["skills"] = data_cfg.skills.model_dump(mode="json")
    if uses_world(sources):
        inputs["world"] = {**data_cfg.world.model_dump(mode="json"), "version": WORLD_VERSION}
    return inputs


def tokenized_stage_inputs(data_cfg: DataConfig, stage: str, tokenizer_fingerprint: str, max_seq_len: int) -> dict[str, Any]:
    """What the pretrain or SFT stage's output depends on: its sources, its own settings, the
    tokenizer and the sequence length."""
    section = getattr(data_cfg, stage)
    return {**source_inputs(data_cfg, section.sources), stage: section.model_dump(mode="json"),
            "tokenizer": tokenizer_fingerprint, "max_seq_len": max_seq_len}


def reuse_complete(out_dir: Path, key: str, force: bool, stage: str) -> bool:
    """True (and logged) when out_dir already holds a complete stage with this key and no rerun is forced."""
    if not force and is_complete(out_dir, key):
        log.info("%s stage: reusing %s (manifest key %s)", stage, out_dir, key)
        return True
    return False
