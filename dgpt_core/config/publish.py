"""Typed settings of the publish stage (the `publish` section of the run config).

The token itself is never part of the config: only the name of the environment variable that
holds it, so the resolved config can be logged, saved and uploaded safely.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import StrictConfig

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class PublishConfig(StrictConfig):
    """Where and how the model folder is published to the Hugging Face Hub."""

    repo_id: str | None = None
    """Target model repo, `namespace/name` (or `name` for the token owner's namespace); None =
    dry run: the upload folder is written and verified, nothing is uploaded."""
    dry_run: bool = False
    """Force a dry run even with a repo id and a token (the stage is also a dry run without a
    token and whenever the Hub is declared offline by HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE;
    HF_DATASETS_OFFLINE is about dataset downloads and does not stop an upload)."""
    private: bool = True
    """Create the repo as private (ignored when the repo already exists)."""
    revision: str = "main"
    """Branch the commit lands on; created from main when it does not exist yet."""
    mode: Literal["commit", "pull_request"] = "commit"
    """`commit`: one atomic commit straight onto `revision`; `pull_request`: one atomic commit on
    a new pull request against main (then merged when `merge_pull_request`)."""
    merge_pull_request: bool = True
    """In `pull_request` mode, merge the pull request right after its commit (off: leave it open
    for review)."""
    commit_message: str = Field("Upload diffusionGPT model", min_length=1)
    """Summary line of the commit (and title of the pull request)."""
    delete_stale_files: bool = True
    """Delete files of the target revision that are not in the new folder (in the same commit),
    so the repo mirrors the staged folder exactly; `.gitattributes` is always kept."""
    max_retries: int = Field(4, ge=0)
    """Retries of each Hub call after a network error or a retryable status (408, 429, 5xx)."""
    backoff_seconds: float = Field(2.0, ge=0.0)
    """Wait before the first retry; doubled at every further retry."""
    max_backoff_seconds: float = Field(60.0, ge=0.0)
    """Upper bound of a single wait between retries."""
    request_timeout_seconds: float = Field(60.0, gt=0.0)
    """Time limit of every HTTP request to the Hub, for connecting and for each read or write on
    the connection (a long upload that keeps moving is not cut); a request that stalls longer fails
    with a timeout, which is retried like any network error."""
    token_env: str = Field("HF_TOKEN", min_length=1)
    """Name of the environment variable holding the Hub token (the token is read at upload time
    and never logged, stored or written to any file)."""
    endpoint: str | None = None
    """Hub URL; None = the HF_ENDPOINT environment variable, else https://huggingface.co."""
    verify: bool = True
    """Before uploading (and in a dry run), load the staged folder in a fresh Python process with
    `pipeline("text-diffusion", model=folder, trust_remote_code=True)` and generate."""
    verify_timeout_seconds: float = Field(300.0, gt=0.0)
    """Time limit of the fresh-process verification."""
    license: str = "mit"
    """License identifier written to the model card metadata."""
    model_name: str | None = None
    """Title of the model card and name in its `model-index`; None = the repo name, else
    `diffusiongpt-<preset>`."""
    tags: list[str] = Field(default_factory=list)
    """Extra model card tags, added to the built-in ones (diffusion, masked-diffusion, ...)."""

    @field_validator("repo_id")
    @classmethod
    def _valid_repo_id(cls, value: str | None) -> str | None:
        if value is not None and not _REPO_ID.fullmatch(value):
            raise ValueError(f"repo_id {value!r} is not of the form 'namespace/name'")
        return value

    @model_validator(mode="after")
    def _pull_requests_target_main(self) -> PublishConfig:
        if self.mode == "pull_request" and self.revision != "main":
            raise ValueError("mode 'pull_request' opens the pull request against main: leave revision='main'")
        return self
