"""`dgpt generate` and `dgpt chat`: sample from a saved model folder on the command line.

    dgpt generate MODEL_DIR --prompt "Hi there" [--prompt ...] [--strategy confidence --steps 16
                  --max-new-tokens 32 --block-size 16 --temperature 0.7 --seed 0 --edit --stream]
    dgpt generate MODEL_DIR --prompt "Hi there" --strategy threshold --steps 16
                  --max-new-tokens 256 --block-size 32 --prefix-cache     # fast decoding
    dgpt generate MODEL_DIR --prompt "Tell me about Sam Davis." --strategy confidence+guard
                  --max-new-tokens 64 --steps 64             # confidence order, no repeated 5-gram
    dgpt chat MODEL_DIR [--system "You are terse."] [sampler options]

Prompts go through the tokenizer's chat template as a user turn unless `--raw`. On a terminal,
`--stream` and the chat redraw the canvas after every denoising step, masks shown as '░'.
The sampler options are the fields of `SamplerConfig` (`--max-new-tokens` for max_new_tokens,
`--edit` / `--no-edit` for a bool, the field's docstring as help); those not given come from the
model folder's `sampler_defaults`. `--strategy` takes a decoding method: a strategy with optional
`+modifier`s (`+guard`, `+remdm_cap`, `+remdm_rescale`, `+remdm_conf`), whose options the other
options given override. The chat sends the model no more history than its SFT examples
had (`context_messages` of the folder's model info); the pipeline's warnings (e.g. a prompt cut
to fit the model's window) are printed as one line.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import math
import shutil
import sys
import textwrap
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForMaskedLM, AutoTokenizer

from ..cli_errors import NotFoundError, UsageError
from ..generation.options import FIELD_RANGES, SamplerConfig, method_options
from ..generation.pipeline import MASK_SYMBOL, Message, TextDiffusionPipeline
from ..hub import hub_reachable
from ..models.info import model_info_of

NOT_ON_COMMAND_LINE: frozenset[str] = frozenset()
"""SamplerConfig fields without a command-line option: those whose values cannot be typed in (a
callable, say); none so far. A field of a type `_sampler_argument` cannot map must be named here."""


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `generate MODEL_DIR --prompt ...`; sets `func` to the command's runner."""
    parser = subparsers.add_parser("generate", help="sample answers from a saved model folder")
    parser.add_argument("model_dir", help="folder written by save_model_folder (or any such Hub folder)")
    parser.add_argument(
        "--prompt", action="append", required=True, type=_non_empty, help="a prompt; repeat for a batch"
    )
    parser.add_argument(
        "--raw", action="store_true", help="continue the prompt as plain text, no chat template"
    )
    parser.add_argument("--stream", action="store_true", help="show the canvas after every denoising step")
    _add_common_arguments(parser)
    parser.set_defaults(func=run_generate)
    return parser


def add_chat_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `chat MODEL_DIR`; sets `func` to the command's runner."""
    parser = subparsers.add_parser("chat", help="terminal chat that shows the denoising live")
    parser.add_argument("model_dir", help="folder written by save_model_folder")
    parser.add_argument("--system", default=None, help="system message opening the conversation")
    _add_common_arguments(parser)
    parser.set_defaults(func=run_chat)
    return parser


def _non_empty(text: str) -> str:
    """argparse type of --prompt: the text, refused when blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty prompt: give some text to answer")
    return text


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampler (default: the model folder's sampler_defaults)")
    hints = typing.get_type_hints(SamplerConfig)
    docs = _field_docs(SamplerConfig)
    for name in sampler_fields():
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=name, default=None, help=docs[name].replace("%", "%%"),
                           **_sampler_argument(name, hints[name]))
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def sampler_fields() -> list[str]:
    """The SamplerConfig fields that are command-line options, in declaration order."""
    return [f.name for f in dataclasses.fields(SamplerConfig) if f.name not in NOT_ON_COMMAND_LINE]


def _sampler_argument(name: str, hint: Any) -> dict[str, Any]:
    """argparse keywords for a field of type `hint`; `X | None` is taken as X (None = not given)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if name == "strategy":
        return {"type": _method_name, "metavar": "METHOD"}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str):
        return {"type": _in_range(name, hint) if name in FIELD_RANGES else hint}
    if typing.get_origin(hint) is Literal:
        return {"choices": args}
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": args[0], "nargs": "*"}
    raise TypeError(f"SamplerConfig.{name}: no command-line form for {hint}; add it to NOT_ON_COMMAND_LINE")


def _in_range(name: str, number: type) -> Callable[[str], Any]:
    """argparse type of a numeric option: the number, refused outside `FIELD_RANGES[name]`, so a
    value out of range is one error line naming the option."""
    allowed = FIELD_RANGES[name]

    def parse(text: str) -> Any:
        value = number(text)
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"must be {allowed} (got {text})")
        return value

    parse.__name__ = number.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a class, whitespace collapsed: read from the source,
    since Python keeps no field docstrings at run time."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    assert isinstance(node, ast.ClassDef)
    return {
        field.target.id: " ".join(doc.value.value.split())
        for field, doc in zip(node.body, node.body[1:])
        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
        and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
    }


def _method_name(name: str) -> str:
    try:
        method_options(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler options given on the command line: `--strategy` names a decoding method (a
    strategy and `+modifier`s), which the other options given override."""
    given = {name: getattr(args, name) for name in sampler_fields() if getattr(args, name) is not None}
    return {**method_options(given.pop("strategy")), **given} if "strategy" in given else given


def _check_model_source(model_dir: str) -> None:
    """Raise a UsageError unless `model_dir` is a saved model folder or, when no such path exists,
    a Hub model id with the Hub reachable; transformers would say so in a 40-line traceback."""
    path = Path(model_dir)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{model_dir} is not a saved model folder (no config.json)")
        return
    try:
        validate_repo_id(model_dir)
    except HFValidationError:
        raise NotFoundError(f"model folder {model_dir} does not exist",
                            hint="training writes model folders, e.g. runs/latest/models/sft") from None
    if not hub_reachable():
        raise UsageError(f"{model_dir} is not a local folder, and as a Hub model id it cannot be downloaded: "
                         "the Hugging Face Hub is not reachable (or HF_HUB_OFFLINE is set)")


def load_pipeline(model_dir: str, device: str | None = None) -> TextDiffusionPipeline:
    """The text-diffusion pipeline on a model folder (or Hub model id), with this package's sampler code."""
    _check_model_source(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return TextDiffusionPipeline(
        model=model, tokenizer=tokenizer, device=torch.device(device), task="text-diffusion"
    )


class LiveView:
    """Redraw a block of text in place on a terminal; elsewhere print only the final text."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.lines = 0

    def update(self, text: str, final: bool = False) -> None:
        if not self.tty:
            if final:
                print(text, file=self.out, flush=True)
            return
        if self.lines:
            self.out.write(f"\x1b[{self.lines}F\x1b[J")  # back to the first drawn line, clear below
        self.out.write(text + "\n")
        self.out.flush()
        cols = max(1, shutil.get_terminal_size().columns)
        self.lines = sum(max(1, math.ceil(len(line) / cols)) for line in text.split("\n"))


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Print each warning raised inside as one `warning: ...` line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        print("warning: " + " ".join(str(warning.message).split()), file=sys.stderr)


def chat_context(
    history: Sequence[Message], system: str | None, context_messages: int | None
) -> list[Message]:
    """The messages sent for the next answer: the system message, if any, then `history` (which
    ends with the new user message), trimmed to the `context_messages` messages SFT put before an
    answer (None = no limit); the system message counts among them and is dropped below 2."""
    opening = [{"role": "system", "content": system}] if system else []
    if context_messages is None:
        return opening + list(history)
    if context_messages < 2:
        opening = []
    keep = max(1, context_messages) - len(opening)
    return opening + list(history[-keep:])


def _show(updates: Iterable[dict[str, Any]], prefix: str = "") -> dict[str, Any]:
    """Draw every streamed update; returns the last one."""
    view, update = LiveView(), {}
    for update in updates:
        texts = update["generated_text"]
        body = texts if isinstance(texts, str) else "\n".join(texts)
        view.update(prefix + body, update["done"])
    return update


def run_generate(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model_dir, args.device)
    use_chat = not args.raw and pipe.tokenizer.chat_template is not None
    prompts = [[{"role": "user", "content": p}] if use_chat else p for p in args.prompt]
    options = sampler_options(args)
    start = time.perf_counter()
    if args.stream:
        with _warnings_as_lines():
            updates = pipe(prompts, stream=True, **options)
        last = _show(updates)
        print(f"[nfe={last['nfe']} {time.perf_counter() - start:.2f}s]", file=sys.stderr)
        return 0
    with _warnings_as_lines():
        results = pipe(prompts, **options)
    for (result,) in results:
        print(result["generated_text"])
        print(f"[nfe={result['nfe']} stopped={result['stopped']}]", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model_dir, args.device)
    options = sampler_options(args)
    info = model_info_of(pipe.model)
    limit = None if info is None else info.context_messages
    history: list[Message] = []
    print(
        f"chatting with {args.model_dir}; /reset clears the history, /exit or Ctrl-D quits ({MASK_SYMBOL} = mask)"
    )
    if limit is not None and limit <= 1:
        print("single-turn model: each message is answered on its own (the history is not sent)")
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            history = []
            print("history cleared")
            continue
        if not user:
            continue
        history.append({"role": "user", "content": user})
        start = time.perf_counter()
        with _warnings_as_lines():
            updates = pipe(chat_context(history, args.system, limit), stream=True, **options)
        last = _show(updates, prefix="bot> ")
        print(f"     [nfe={last['nfe']} {time.perf_counter() - start:.2f}s]", file=sys.stderr)
        history.append({"role": "assistant", "content": last["generated_text"]})
