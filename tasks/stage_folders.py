"""Completion markers of the flow's stage folders.

A stage task unmarks its folder before it writes anything and marks it, with the list of every file
it holds, only when it returns. A folder that carries the marker is therefore complete; one that was
being (re)built when its process died carries none, and the flow recomputes it (training resumes
from its last complete checkpoint) instead of serving it from the cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

STAGE_MARKER = "stage_complete.json"


@contextlib.contextmanager
def building(out_dir: str | Path) -> Iterator[Path]:
    """Unmark `out_dir` (created if missing) while the block writes it; mark it when the block returns."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAGE_MARKER).unlink(missing_ok=True)
    yield folder
    mark_complete(folder)


def mark_complete(folder: Path) -> None:
    """Write the marker (atomically) with the relative paths of every file under `folder`."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != STAGE_MARKER)
    tmp = folder / f".{STAGE_MARKER}.{os.getpid()}"
    tmp.write_text(json.dumps({"completed_at": time.time(), "files": files}))
    tmp.replace(folder / STAGE_MARKER)


def is_complete(folder: str | Path) -> bool:
    """Whether `folder` carries the marker and every file it lists still exists."""
    folder = Path(folder)
    try:
        files = json.loads((folder / STAGE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((folder / name).is_file() for name in files)
