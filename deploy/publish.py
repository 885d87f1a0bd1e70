"""Publish a saved model folder to the Hugging Face Hub, or do a verified dry run.

    folder = stage_publish_folder(model_dir, out_dir, {"sft": eval_dir}, run_config_path)
    verify_folder(folder)              # fresh process: pipeline(..., trust_remote_code=True) generates
    result = publish(model_dir, out_dir, PublishConfig(repo_id="me/dgpt-tiny"), eval_dirs=...)

The staged folder is exactly what is uploaded: the model files, README.md (the model card),
eval/<name>/ (metrics.json, report.md, samples, plots) and run_config.yaml. An upload is one
atomic commit (`create_commit` with explicit operations; or one commit on a pull request, then
merged); every Hub request is bounded by `request_timeout_seconds`, and each Hub call is retried
with exponential backoff on timeouts, network errors and retryable statuses. A failed upload
deletes the repository when this run created it (never one that existed before). The token is
read from the environment at upload time, passed only to HfApi (it ends up in the Authorization
header), and scrubbed from every message this module logs or raises.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dgpt_core.config.publish import PublishConfig
from dgpt_core.hub import HUB_OFFLINE_VARS, offline_vars

from .hub_client import create_repo, is_retryable, request_timeout
from .model_card import build_model_card, load_metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

EVAL_SUFFIXES = (".json", ".md", ".png")
KEEP_REMOTE = frozenset({".gitattributes"})
_EVAL_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

VERIFY_SCRIPT = """
import json, sys, transformers
pipe = transformers.pipeline("text-diffusion", model=sys.argv[1], trust_remote_code=True, device="cpu")
cls = type(pipe)
if not cls.__module__.startswith("transformers_modules") or "dgpt_core" in sys.modules:
    sys.exit(f"the pipeline did not come from the folder's own code: {cls.__module__}.{cls.__name__}")
options = {"steps": 4, "max_new_tokens": 8, "seed": 0}
out = {"pipeline": f"{cls.__module__}.{cls.__name__}", "text": pipe("Hello", **options)[0]}
if pipe.tokenizer.chat_template:
    out["chat"] = pipe([{"role": "user", "content": "Hello, how are you?"}], **options)[0]
for key in ("text", "chat"):
    if key in out and not isinstance(out[key].get("generated_text"), str):
        sys.exit(f"{key} generation returned no text: {out[key]!r}")
print(json.dumps(out))
"""


class PublishError(RuntimeError):
    """Staging, verification or upload failed; the message never contains the token."""


@dataclass
class PublishResult:
    """What the publish stage did; safe to log and to store in summary.json."""

    folder: Path
    files: list[str]
    uploaded: bool
    dry_run_reason: str | None = None
    verified: bool = False
    verification: dict[str, Any] = field(default_factory=dict)
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    attempts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "folder": str(self.folder)}


# ----------------------------------------------------------------------------------------------
# staging


def list_upload_files(folder: Path) -> list[str]:
    """Every regular file under `folder`, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def _prepare_out_dir(out: Path, model_dir: Path) -> None:
    resolved, model = out.resolve(), model_dir.resolve()
    if resolved == model or model.is_relative_to(resolved) or resolved.is_relative_to(model):
        raise PublishError(f"the publish folder {out} must lie outside the model folder {model_dir}")
    if out.exists() and any(out.iterdir()):
        if not ((out / "README.md").is_file() and (out / "config.json").is_file()):
            raise PublishError(
                f"{out} is not empty and is not an earlier publish folder: refusing to clear it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _pick_primary(evals: dict[str, dict[str, Any]], model_dir: Path) -> str | None:
    """The eval of the published model: the one whose meta.model.path is `model_dir`, else the first."""
    for name, metrics in evals.items():
        path = ((metrics.get("meta") or {}).get("model") or {}).get("path")
        if path and Path(path).resolve() == model_dir.resolve():
            return name
    return next(iter(evals), None)


def stage_publish_folder(
    model_dir: str | Path,
    out_dir: str | Path,
    eval_dirs: dict[str, Path] | None = None,
    run_config_path: str | Path | None = None,
    cfg: PublishConfig | None = None,
) -> Path:
    """Write the exact folder that would be uploaded and return it.

    `out_dir` is replaced (it must be empty, absent, or an earlier publish folder). `eval_dirs`
    maps names (e.g. "sft", "pretrain") to eval output folders; a missing folder or metrics.json
    is skipped with a warning. The eval of the published model (meta.model.path matching, else the
    first entry) provides the card's model-index. `run_config_path` (default: the model folder's
    own run_config.yaml) is copied as run_config.yaml.
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    cfg = cfg or PublishConfig()
    if not (model_dir / "config.json").is_file():
        raise PublishError(f"{model_dir} is not a saved model folder (no config.json)")
    _prepare_out_dir(out, model_dir)
    for src in sorted(model_dir.iterdir()):
        if src.is_file() and not src.name.startswith(".") and src.name != "README.md":
            shutil.copy2(src, out / src.name)
    if run_config_path is not None:
        shutil.copyfile(run_config_path, out / "run_config.yaml")
    elif not (out / "run_config.yaml").exists():
        log.warning("no run_config.yaml beside %s: the card will lack training settings", model_dir)

    evals: dict[str, dict[str, Any]] = {}
    links: dict[str, list[str]] = {}
    for name, src_dir in (eval_dirs or {}).items():
        if not _EVAL_NAME.fullmatch(name):
            raise PublishError(f"eval name {name!r} must be a plain folder name (letters, digits, ._-)")
        src_dir = Path(src_dir)
        files = (
            sorted(p for p in src_dir.glob("*") if p.is_file() and p.suffix in EVAL_SUFFIXES)
            if src_dir.is_dir()
            else []
        )
        if not files:
            log.warning("eval %r: no eval outputs in %s, skipped", name, src_dir)
            continue
        dest = out / "eval" / name
        dest.mkdir(parents=True, exist_ok=True)
        for src in files:
            shutil.copy2(src, dest / src.name)
        links[name] = [f"eval/{name}/{p.name}" for p in files]
        metrics = load_metrics(src_dir)
        if metrics is not None:
            evals[name] = metrics

    card = build_model_card(out, cfg, evals, _pick_primary(evals, model_dir), links)
    card.save(out / "README.md")
    return out


# ----------------------------------------------------------------------------------------------
# verification


def verify_folder(folder: str | Path, timeout: float = 300.0, token_env: str = "HF_TOKEN") -> dict[str, Any]:
    """Load `folder` with pipeline("text-diffusion", trust_remote_code=True) in a fresh Python
    process, offline and without any token in its environment (`token_env` and the standard
    variables are removed), and generate (plain text, and a chat when the tokenizer has a chat
    template). Returns the generations; raises PublishError."""
    folder = Path(folder).resolve()
    hidden = {"PYTHONPATH", token_env, *_TOKEN_VARS}
    with tempfile.TemporaryDirectory(prefix="dgpt_verify_") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in hidden}
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HOME=str(Path(tmp) / "hf"),
            HF_MODULES_CACHE=str(Path(tmp) / "modules"),
        )
        try:
            proc = subprocess.run(
                [sys.executable, "-c", VERIFY_SCRIPT, str(folder)],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise PublishError(f"verification of {folder} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise PublishError(f"{folder} does not load and generate in a fresh process:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("verified %s in a fresh process: %r", folder, result["text"]["generated_text"])
    return result


# ----------------------------------------------------------------------------------------------
# upload


def scrub(text: str, token: str | None) -> str:
    """`text` with every occurrence of the token replaced."""
    return text.replace(token, "<token>") if token else text


def with_retries(call: Callable[[], T], what: str, cfg: PublishConfig, token: str | None) -> tuple[T, int]:
    """(result, attempts) of `call`, retried with exponential backoff on retryable errors; a final
    error is re-raised as PublishError with the token scrubbed and the original chain dropped."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return call(), attempt
        except Exception as err:  # classified below, re-raised scrubbed
            message = scrub(f"{type(err).__name__}: {err}", token)
            if attempt > cfg.max_retries or not is_retryable(err):
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise PublishError(f"{what} failed{tries}: {message}") from None
            wait = min(cfg.backoff_seconds * 2 ** (attempt - 1), cfg.max_backoff_seconds)
            log.warning(
                "%s failed (%s); retry %d/%d in %.1f s",
                what,
                message.splitlines()[0],
                attempt,
                cfg.max_retries,
                wait,
            )
            time.sleep(wait)


def dry_run_reason(cfg: PublishConfig, token: str | None) -> str | None:
    """Why nothing is uploaded, or None when the upload goes ahead. Offline mode means the
    variables huggingface_hub itself obeys (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE), named in the
    reason; HF_DATASETS_OFFLINE only concerns dataset downloads and does not stop an upload."""
    from huggingface_hub import constants

    if cfg.dry_run:
        return "dry_run requested"
    if cfg.repo_id is None:
        return "no repo_id"
    if not token:
        return f"no token in ${cfg.token_env}"
    if offline := offline_vars(HUB_OFFLINE_VARS):
        return f"offline mode ({', '.join(f'{var}={value}' for var, value in offline.items())})"
    if constants.is_offline_mode():  # read from the environment when huggingface_hub was imported
        return "offline mode (huggingface_hub.constants.HF_HUB_OFFLINE)"
    return None


def _upload(folder: Path, files: list[str], cfg: PublishConfig, token: str, result: PublishResult) -> None:
    from huggingface_hub import HfApi

    assert cfg.repo_id is not None
    endpoint = cfg.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    api = HfApi(endpoint=endpoint.rstrip("/"), token=token)
    repo = cfg.repo_id

    def step(what: str, call: Callable[[], T]) -> T:
        value, result.attempts[what] = with_retries(call, what, cfg, token)
        return value

    with request_timeout(cfg.request_timeout_seconds):
        url, created = step("create_repo", lambda: create_repo(api, repo, cfg.private))
        result.repo_url = url
        try:
            _commit_folder(api, folder, files, cfg, step, result)
        except PublishError as err:
            if not created:
                raise
            try:
                step("delete_repo", lambda: api.delete_repo(repo, missing_ok=True))
            except PublishError as cleanup:
                raise PublishError(
                    f"{err}\nthe repo {repo} created by this run is left behind: {cleanup}"
                ) from None
            raise PublishError(f"{err}\nthe repo {repo} created by this run was deleted") from None


def _commit_folder(
    api: Any,
    folder: Path,
    files: list[str],
    cfg: PublishConfig,
    step: Callable[[str, Callable[[], Any]], Any],
    result: PublishResult,
) -> None:
    """Everything after the repo exists: the branch, the stale files, the one commit, the merge."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    repo = cfg.repo_id
    if cfg.revision != "main":
        step("create_branch", lambda: api.create_branch(repo, branch=cfg.revision, exist_ok=True))
    target = "main" if cfg.mode == "pull_request" else cfg.revision
    stale: list[str] = []
    if cfg.delete_stale_files:
        remote = step("list_repo_files", lambda: api.list_repo_files(repo, revision=target))
        stale = sorted(set(remote) - set(files) - KEEP_REMOTE)

    def commit() -> Any:  # fresh operations per attempt: a failed attempt may have mutated them
        ops: list[Any] = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        return api.create_commit(
            repo,
            ops,
            commit_message=cfg.commit_message,
            revision=target,
            create_pr=cfg.mode == "pull_request",
        )

    info = step("create_commit", commit)
    result.commit_url, result.commit_oid, result.pr_url = info.commit_url, info.oid, info.pr_url
    if cfg.mode == "pull_request" and cfg.merge_pull_request:
        step(
            "merge_pull_request",
            lambda: api.merge_pull_request(repo, info.pr_num, comment=cfg.commit_message),
        )
    result.uploaded = True
    log.info(
        "published %d files to %s (%s)%s",
        len(files),
        repo,
        result.commit_url,
        f", deleted {len(stale)} stale files" if stale else "",
    )


def _refuse_token_in_files(folder: Path, files: list[str], token: str) -> None:
    needle = token.encode()
    leaked = [f for f in files if needle in (folder / f).read_bytes()]
    if leaked:
        raise PublishError(f"the Hub token appears in staged files {leaked}: refusing to upload")


def publish(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: PublishConfig | None = None,
    eval_dirs: dict[str, Path] | None = None,
    run_config_path: str | Path | None = None,
) -> PublishResult:
    """Stage the folder, verify it (cfg.verify), then upload it in one commit, or stop there as a
    dry run when there is no repo id, no token, offline mode, or cfg.dry_run."""
    cfg = cfg or PublishConfig()
    token = (os.environ.get(cfg.token_env) or "").strip() or None
    folder = stage_publish_folder(model_dir, out_dir, eval_dirs, run_config_path, cfg)
    result = PublishResult(folder=folder, files=list_upload_files(folder), uploaded=False)
    result.dry_run_reason = dry_run_reason(cfg, token)
    if cfg.verify:
        result.verification = verify_folder(folder, cfg.verify_timeout_seconds, cfg.token_env)
        result.verified = True
    if result.dry_run_reason is not None:
        log.info(
            "dry run (%s): %d files staged in %s, nothing uploaded",
            result.dry_run_reason,
            len(result.files),
            folder,
        )
        return result
    assert token is not None
    _refuse_token_in_files(folder, result.files, token)
    _upload(folder, result.files, cfg, token, result)
    return result
