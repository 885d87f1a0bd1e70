"""The `dgpt` command: one sub-command per stage, each parser defined beside the code it runs.

This dispatcher sits in the top layer because its sub-commands come from every layer (library,
eval, deploy, bench, flows). A sub-command's module is imported only when that command (or the
full `dgpt --help`) is asked for, so `dgpt chat` does not load Prefect, MLflow or lm-eval.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name -> (module, function adding its parser)
SUBCOMMANDS = {
    "train": ("dgpt_core.train_cli", "add_train_parser"),
    "generate": ("dgpt_core.generate_cli", "add_generate_parser"),
    "chat": ("dgpt_core.generate_cli", "add_chat_parser"),
    "prepare": ("dgpt_core.data.cli", "add_prepare_parser"),
    "eval": ("eval.cli", "add_eval_parser"),
    "publish": ("deploy.publish_cli", "add_publish_parser"),
    "bench": ("bench.cli", "add_bench_parser"),
    "run": ("flows.run_cli", "add_run_parser"),
}


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgpt", description="diffusionGPT: masked-diffusion chat models")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in names or SUBCOMMANDS:
        module, function = SUBCOMMANDS[name]
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser([command] if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
