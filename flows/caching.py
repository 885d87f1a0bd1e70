"""Cache keys of the flow stages.

A stage is skipped when its resolved config section, the keys of the stages it consumes, and the
source of the code it runs are unchanged. Prefect's TASK_SOURCE policy only hashes a task's own
body, so the code hash here covers every module a stage imports from this project.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# project paths whose source each stage runs (folders are hashed recursively)
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "data": ("dgpt_core/data", "dgpt_core/models/tokenizer.py", "dgpt_core/hub.py", "dgpt_core/config"),
    "untrained": ("dgpt_core",),
    "pretrain": ("dgpt_core", "tasks/launch.py"),
    "sft": ("dgpt_core", "tasks/launch.py"),
    "sft_control": ("dgpt_core", "tasks/launch.py"),
    "rl": ("dgpt_core", "tasks/launch.py"),
    "eval": ("dgpt_core", "eval"),
    "publish": ("dgpt_core", "deploy"),
}
_HASHED_SUFFIXES = {".py", ".yaml", ".yml", ".json", ".jinja"}


def _files(paths: Iterable[str]) -> list[Path]:
    found: set[Path] = set()
    for rel in paths:
        path = PROJECT_ROOT / rel
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.suffix in _HASHED_SUFFIXES and "__pycache__" not in p.parts)
        elif path.exists():
            found.add(path)
    return sorted(found)


@cache
def code_hash(stage: str) -> str:
    """sha256 over the relative paths and bytes of the project files the stage runs."""
    digest = hashlib.sha256()
    for path in _files(STAGE_CODE[stage]):
        digest.update(str(path.relative_to(PROJECT_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(stage: str, config: Any, upstream: Iterable[str] = ()) -> str:
    """Key of one stage run: its config (JSON-able), the upstream stage keys, and its code hash."""
    payload = json.dumps({"stage": stage, "config": config, "upstream": list(upstream), "code": code_hash(stage)},
                         sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"
