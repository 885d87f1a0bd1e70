"""Errors of the `dgpt` command: what it reports as one line on stderr, and how.

Code anywhere below the command raises `UsageError` (a bad option, config or path: exit code 2)
or `DgptError` (a run that failed: exit code 1) with a message fit to print on its own; the
dispatcher (`flows/cli.py`) runs every sub-command through `run_command`, the one place that turns
an exception into `dgpt <command>: <message>` (plus an optional hint line), printed after the full
traceback under `--debug`. A pydantic ValidationError is one line per field error (exit code 2);
any other exception is its type and the first line of its message (exit code 1).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any, NoReturn

from pydantic import ValidationError


class DgptError(Exception):
    """A failure the command reports as its message alone (one line), with `hint` (or else the
    message's second line) as a second line; exit code 1."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(DgptError):
    """A bad option, config, preset or path: the user's to fix; exit code 2."""

    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A run config (preset file or `--set` override) that does not parse or validate."""


class NotFoundError(UsageError, FileNotFoundError):
    """A preset, model folder or file that does not exist."""


_COMPARISONS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def validation_message(err: ValidationError) -> str:
    """A pydantic ValidationError as one line: `field.path: reason (got value)` per error, joined
    by '; ' (e.g. `pretrain.max_steps: must be > 0 (got -1)`, `sft.lr: unknown key`)."""
    return "; ".join(_error_line(error) for error in err.errors())


def _error_line(error: dict[str, Any]) -> str:
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return f"{where}: unknown key"
    if kind == "missing":
        return f"{where}: required"
    if kind in _COMPARISONS:
        reason = f"must be {_COMPARISONS[kind]} {next(iter(error['ctx'].values()))}"
    else:
        reason = error["msg"].removeprefix("Value error, ").replace("Input should", "must")
    got = "" if isinstance(value, dict | list) else f" (got {value!r})"
    return f"{where + ': ' if where else ''}{reason}{got}"


def one_line(text: str) -> str:
    """The first non-blank line of `text` (whitespace collapsed); '' when there is none."""
    return next((" ".join(line.split()) for line in text.splitlines() if line.strip()), "")


def report(command: str, err: Exception, traced: bool = False) -> int:
    """Print `err` as `dgpt <command>: <message>` (and a hint line) on stderr; returns the exit
    code. A DgptError: its own code, its message's first line, and its hint or else the message's
    next line (the detail of a wrapped multi-line error); an invalid config (ValidationError): 2;
    anything else: 1, with the hint to rerun under --debug (unless `traced`: its traceback is
    printed already), since the cause is unexpected."""
    if isinstance(err, DgptError):
        first, _, rest = str(err).strip().partition("\n")
        message, hint, code = one_line(first), err.hint or one_line(rest), err.exit_code
    elif isinstance(err, ValidationError):
        message, hint, code = validation_message(err), None, 2
    else:
        detail = one_line(str(err))
        message = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        hint, code = None if traced else "run again with --debug for the full traceback", 1
    print(f"dgpt {command}: {message}", file=sys.stderr)
    if hint:
        print(hint, file=sys.stderr)
    return code


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed sub-command (`args.func`) and return its exit code; an exception becomes
    one reported line (see `report`), after its full traceback when `args.debug` is set."""
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        debug = getattr(args, "debug", False)
        if debug:
            traceback.print_exc()
        return report(args.command, err, traced=debug)


def add_debug_flag(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """`--debug` on the top-level parser (default False) or on a sub-command's parser, where it
    sets the flag only when given, so `dgpt --debug CMD` and `dgpt CMD --debug` both work."""
    parser.add_argument("--debug", action="store_true", default=False if top_level else argparse.SUPPRESS,
                        help="on an error, show the full traceback before the error line")


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: message`) and a pointer to
    `--help`, instead of the whole usage text; its sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nsee '{self.prog} --help'\n")
