"""Data stages: sources (local files, Hub datasets, the synthetic world and skills, chitchat),
tokenizer training, pretraining packing, and SFT examples with assistant-only masks. Their typed
settings are `dgpt_core.config.DataConfig` and `TokenizerConfig`."""

from __future__ import annotations

import os

os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")  # before datasets is imported anywhere below

from .. import lazy_exports  # noqa: E402

_EXPORTS = {
    "prepare_all": "stages", "prepare_pretrain_stage": "stages", "prepare_sft_stage": "stages",
    "prepare_tokenizer_stage": "stages",
    "is_complete": "manifest", "read_manifest": "manifest",
    "SkillItem": "skills", "check_answer": "skills", "generate_skills": "skills", "read_skills_jsonl": "skills",
    "eligible_text": "sft", "render_example": "sft",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
