"""`dgpt publish MODEL_DIR [--repo-id ID] [--dry-run] [--out DIR] [--eval-dir NAME=DIR ...]`.

Registered in flows.cli.SUBCOMMANDS as "publish": ("deploy.publish_cli", "add_publish_parser").
The token is read from the environment variable named by `token_env` (default HF_TOKEN); there is
deliberately no flag for it, so it never lands in shell history or process listings.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dgpt_core.cli_errors import ConfigError, DgptError, UsageError, report, validation_message
from dgpt_core.config import parse_override, read_yaml
from dgpt_core.config.publish import PublishConfig


def add_publish_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "publish",
        help="publish a saved model folder to the Hugging Face Hub (or a verified dry run)",
        description="Stage the upload folder (model files, README.md model card, eval outputs, resolved "
        "config), verify in a fresh process that it loads with pipeline('text-diffusion', "
        "trust_remote_code=True) and generates, then upload it in one atomic commit. Without a repo "
        "id, without a token in $HF_TOKEN, or offline, it stops after the verified folder (dry run).",
    )
    p.add_argument("model_dir", help="a saved model folder (safetensors + config + tokenizer + pipeline.py)")
    p.add_argument("--repo-id", default=None, help="target model repo, namespace/name")
    p.add_argument("--dry-run", action="store_true", help="stage and verify only, upload nothing")
    p.add_argument("--out", default=None, help="staging folder (default: MODEL_DIR/../publish)")
    p.add_argument(
        "--eval-dir",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="eval output folder to publish under eval/NAME/ (repeatable; the first, or the "
        "one evaluating MODEL_DIR, fills the card's model-index)",
    )
    p.add_argument(
        "--run-config", default=None, help="resolved run config YAML (default: MODEL_DIR/run_config.yaml)"
    )
    p.add_argument(
        "--config",
        default=None,
        help="PublishConfig YAML, or a run config YAML with a `publish` section "
        "(default: the `publish` section of the run config, if any)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="PublishConfig override, e.g. --set private=false --set mode=pull_request",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the fresh-process load-and-generate check")
    p.set_defaults(func=run_publish_command)
    return p


def _publish_section(path: Path, whole_file_fallback: bool) -> dict[str, Any]:
    """The `publish` section of a YAML file; without one, the whole file (a PublishConfig YAML)
    or nothing (a run config from before the publish section existed)."""
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} does not hold a YAML mapping")
    return dict(tree.get("publish") or (tree if whole_file_fallback else {}))


def config_from_args(args: argparse.Namespace) -> PublishConfig:
    """Base config (--config, else the run config's publish section), then --set, then flags."""
    run_config = Path(args.run_config) if args.run_config else Path(args.model_dir) / "run_config.yaml"
    if args.config:
        data = _publish_section(Path(args.config), whole_file_fallback=True)
    else:
        data = _publish_section(run_config, whole_file_fallback=False) if run_config.is_file() else {}
    for item in args.overrides:
        key, value = parse_override(item)
        data[key] = value
    if args.repo_id is not None:
        data["repo_id"] = args.repo_id
    if args.dry_run:
        data["dry_run"] = True
    if args.no_verify:
        data["verify"] = False
    try:
        return PublishConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid publish config: {validation_message(err)}") from None


def parse_eval_dirs(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--eval-dir {item!r} is not of the form NAME=DIR")
        out[name] = Path(path)
    return out


def run_publish_command(args: argparse.Namespace) -> int:
    from .publish import PublishError, publish

    model_dir = Path(args.model_dir)
    try:
        cfg = config_from_args(args)
        eval_dirs = parse_eval_dirs(args.eval_dir)
    except UsageError as err:  # reported here as well, for callers of `func` without the dispatcher
        return report("publish", err)
    out = Path(args.out) if args.out else model_dir.resolve().parent / "publish"
    try:
        result = publish(model_dir, out, cfg, eval_dirs=eval_dirs, run_config_path=args.run_config)
    except PublishError as err:
        raise DgptError(str(err)) from err
    print(f"staged {len(result.files)} files in {result.folder}")
    if result.verified:
        print(f"verified in a fresh process: {result.verification['text']['generated_text']!r}")
    if result.uploaded:
        print(f"published to {result.repo_url}: {result.commit_url}")
        if result.pr_url:
            merged = "merged" if cfg.merge_pull_request else "open for review"
            print(f"pull request ({merged}): {result.pr_url}")
    else:
        print(f"dry run ({result.dry_run_reason}): nothing uploaded")
    return 0
