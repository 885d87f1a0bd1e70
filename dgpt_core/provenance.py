"""Where a result came from: the project's git state and the versions of the libraries it ran with.

Used by the eval suite (metrics.json meta.commit and meta.versions), the MLflow run tags and the
run report card; no orchestration or tracking imports.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "datasets", "lm_eval", "evaluate", "deepspeed", "prefect", "mlflow")
"""Packages whose versions `library_versions` reports (those installed)."""


def git_state(root: str | Path = PROJECT_ROOT) -> dict[str, str]:
    """{"git.commit": HEAD's sha, "git.dirty": "true" / "false"} of the checkout at `root` (default:
    this project); "unknown" where git cannot tell (no git, not a checkout). Untracked files do not
    make a checkout dirty."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or "unknown"
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", "unknown"
    return {"git.commit": commit, "git.dirty": dirty}


def commit_label(state: dict[str, str] | None = None) -> str:
    """The commit as one string: the sha, with "-dirty" when the checkout has uncommitted changes."""
    state = state or git_state()
    return state["git.commit"] + ("-dirty" if state["git.dirty"] == "true" else "")


def library_versions(packages: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """{"python": version, package: version} for each of `packages` that is installed."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
