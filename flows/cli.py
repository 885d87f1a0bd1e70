"""The `dgpt` command: one sub-command per stage, each parser defined beside the code it runs.

This dispatcher sits in the top layer because its sub-commands come from every layer (library,
eval, deploy, bench, flows). A sub-command's module is imported only when that command (or the
full `dgpt --help`) is asked for, so `dgpt chat` does not load Prefect, MLflow or lm-eval.

Every error ends the command with one line on stderr and a non-zero exit code (see
`dgpt_core.cli_errors`): 2 for a bad option, config or path, 1 for a failed run; `--debug`
(before or after the sub-command) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dgpt_core.cli_errors import OneLineArgumentParser, add_debug_flag, run_command

# sub-command name -> (module, function adding its parser)
SUBCOMMANDS = {
    "train": ("dgpt_core._cli.train", "add_train_parser"),
    "train-node": ("dgpt_core._cli.train_node", "add_train_node_parser"),
    "generate": ("dgpt_core._cli.generate", "add_generate_parser"),
    "chat": ("dgpt_core._cli.generate", "add_chat_parser"),
    "prepare": ("dgpt_core._cli.prepare", "add_prepare_parser"),
    "eval": ("eval.cli", "add_eval_parser"),
    "publish": ("deploy.publish_cli", "add_publish_parser"),
    "bench": ("bench.cli", "add_bench_parser"),
    "run": ("flows.run_cli", "add_run_parser"),
    "sweep": ("flows.sweep_cli", "add_sweep_parser"),
    "serve": ("deploy.serve.cli", "add_serve_parser"),
}


def build_parser(names: list[str] | None = None) -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="dgpt", description="diffusionGPT: masked-diffusion chat models")
    add_debug_flag(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in names or SUBCOMMANDS:
        module, function = SUBCOMMANDS[name]
        add_debug_flag(getattr(importlib.import_module(module), function)(subparsers))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser([command] if command in SUBCOMMANDS else None)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
