"""Data stages: sources, tokenizer, pretraining packing, SFT examples with assistant-only masks.

Public API (see each module):
    config:   DataConfig, TokenizerConfig, SourceSpec, SkillsConfig, PretrainDataConfig, SFTDataConfig
    stages:   prepare_tokenizer_stage, prepare_pretrain_stage, prepare_sft_stage, prepare_all
    manifest: is_complete, read_manifest
    skills:   SkillItem, generate_skills, check_answer, read_skills_jsonl
    sft:      render_example, eligible_text
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")  # before datasets is imported anywhere below

from .config import (  # noqa: E402
    DataConfig,
    PretrainDataConfig,
    SFTDataConfig,
    SkillsConfig,
    SourceSpec,
    TokenizerConfig,
)
from .manifest import is_complete, read_manifest  # noqa: E402

__all__ = [
    "DataConfig",
    "PretrainDataConfig",
    "SFTDataConfig",
    "SkillsConfig",
    "SourceSpec",
    "TokenizerConfig",
    "is_complete",
    "read_manifest",
    "prepare_all",
    "prepare_tokenizer_stage",
    "prepare_pretrain_stage",
    "prepare_sft_stage",
]


def __getattr__(name: str):  # lazy: importing the configs must not import datasets/transformers
    if name in {"prepare_all", "prepare_tokenizer_stage", "prepare_pretrain_stage", "prepare_sft_stage"}:
        from . import stages

        return getattr(stages, name)
    raise AttributeError(name)
