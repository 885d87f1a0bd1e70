"""`dgpt generate` and `dgpt chat`: sample from a saved model folder on the command line.

    dgpt generate MODEL_DIR --prompt "Hi there" [--prompt ...] [--strategy confidence --steps 16
                  --max-new-tokens 32 --block-size 16 --temperature 0.7 --seed 0 --edit --stream]
    dgpt generate MODEL_DIR --prompt "Hi there" --strategy threshold --threshold 0.9 --steps 16
                  --max-new-tokens 256 --block-size 32 --prefix-cache     # fast decoding
    dgpt chat MODEL_DIR [--system "You are terse."] [sampler options]

Prompts go through the tokenizer's chat template as a user turn unless `--raw`. On a terminal,
`--stream` and the chat redraw the canvas after every denoising step, masks shown as '░'.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO, get_args

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from .pipeline import MASK_SYMBOL, TextDiffusionPipeline
from .sampling import PositionSelection, Strategy

SAMPLER_ARGS = (
    "strategy",
    "position_selection",
    "threshold",
    "steps",
    "max_new_tokens",
    "block_size",
    "temperature",
    "top_p",
    "seed",
    "edit",
    "edit_threshold",
    "edit_rate",
    "prefix_cache",
)


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `generate MODEL_DIR --prompt ...`; sets `func` to the command's runner."""
    parser = subparsers.add_parser("generate", help="sample answers from a saved model folder")
    parser.add_argument("model_dir", help="folder written by save_model_folder (or any such Hub folder)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
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


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampler (default: the model folder's sampler_defaults)")
    group.add_argument("--strategy", choices=get_args(Strategy), default=None)
    group.add_argument("--position-selection", choices=get_args(PositionSelection), default=None)
    group.add_argument("--threshold", type=float, default=None, help="confidence to reveal a mask (threshold strategy)")
    group.add_argument("--steps", type=int, default=None, help="denoising steps (per block)")
    group.add_argument("--max-new-tokens", type=int, default=None, help="canvas length")
    group.add_argument("--block-size", type=int, default=None, help="semi-autoregressive block length")
    group.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--edit", action=argparse.BooleanOptionalAction, default=None, help="Seed-style edits")
    group.add_argument("--edit-threshold", type=float, default=None)
    group.add_argument("--edit-rate", type=float, default=None)
    group.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=None,
                       help="approximate prefix key/value cache for block decoding")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler options given on the command line."""
    return {name: getattr(args, name) for name in SAMPLER_ARGS if getattr(args, name) is not None}


def load_pipeline(model_dir: str, device: str | None = None) -> TextDiffusionPipeline:
    """The text-diffusion pipeline on a model folder, with this package's sampler code."""
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
        last = _show(pipe(prompts, stream=True, **options))
        print(f"[nfe={last['nfe']} {time.perf_counter() - start:.2f}s]", file=sys.stderr)
        return 0
    for (result,) in pipe(prompts, **options):
        print(result["generated_text"])
        print(f"[nfe={result['nfe']} stopped={result['stopped']}]", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model_dir, args.device)
    options = sampler_options(args)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    print(
        f"chatting with {args.model_dir}; /reset clears the history, /exit or Ctrl-D quits ({MASK_SYMBOL} = mask)"
    )
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            messages = list(opening)
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        start = time.perf_counter()
        last = _show(pipe(messages, stream=True, **options), prefix="bot> ")
        print(f"     [nfe={last['nfe']} {time.perf_counter() - start:.2f}s]", file=sys.stderr)
        messages.append({"role": "assistant", "content": last["generated_text"]})
