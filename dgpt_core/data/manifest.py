"""Stage manifests: written last, so a folder without one is never taken as done.

A stage writes into `<folder>.partial-<pid>`, writes `manifest.json` there last, then swaps the
finished folder into place. `is_complete(folder, key)` is what the data stages check before
reusing a folder (`dgpt prepare`, `dgpt train` and the flow's data task all go through them; the
flow's Prefect cache sits on top, keyed by flows/caching.py); `manifest["key"]` hashes the
stage's inputs and code so a changed config or code is never served from an old folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@cache
def code_version() -> str:
    """Package version plus a hash of the data-stage, tokenizer and data-config source files."""
    here = Path(__file__).parent
    files = sorted(here.glob("*.py")) + [here.parent / "models" / "tokenizer.py", here.parent / "config" / "data.py"]
    digest = hashlib.sha256()
    for f in files:
        if f.exists():
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
    try:
        from importlib.metadata import version

        pkg = version("diffusiongpt")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        pkg = "0+checkout"
    return f"{pkg}+{digest.hexdigest()[:12]}"


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """Hash of the stage name, its JSON-able inputs and the code version."""
    blob = json.dumps({"stage": stage, "inputs": inputs, "code": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(folder: str | Path, key: str | None = None) -> bool:
    """True when the folder holds a finished stage (its manifest exists and parses), and, when
    `key` is given, was made from the same inputs and code."""
    manifest = read_manifest(folder)
    if not manifest or manifest.get("format_version") != FORMAT_VERSION:
        return False
    return key is None or manifest.get("key") == key


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json atomically (temp file + rename), stamping version and time."""
    folder = Path(folder)
    data = {"format_version": FORMAT_VERSION, "code_version": code_version(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


@contextmanager
def staging(folder: str | Path) -> Iterator[Path]:
    """Yield a fresh partial folder; on success (the body must write the manifest) replace
    `folder` with it; on failure remove it and leave `folder` untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        if not is_complete(partial):
            raise RuntimeError(f"stage wrote no manifest into {partial}")
        if folder.exists():
            old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(partial, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
