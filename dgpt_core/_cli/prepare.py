"""`dgpt prepare`: run the data stages alone and print their folders.

    dgpt prepare --preset tiny [--set data.sft.answer_canvas=16 ...] [--output-dir DIR]
                 [--stage all|tokenizer|pretrain|sft] [--force] [--list-sources]

Without --output-dir the stages go to `<output_dir>/<preset>/data/{tokenizer,pretrain,sft}`.
Finished stages whose inputs and code are unchanged are reused (their manifest key matches);
--force rebuilds them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..cli_errors import UsageError
from ..config import add_config_arguments


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prepare",
        help="build the tokenizer, pretraining and SFT datasets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument("--output-dir", default=None, help="data root (default: <output_dir>/<preset>/data)")
    parser.add_argument("--stage", choices=("all", "tokenizer", "pretrain", "sft"), default="all",
                        help="run one stage (its upstream tokenizer stage must exist or is built)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a matching finished stage exists")
    parser.add_argument("--list-sources", action="store_true", help="print the source registry and exit")
    parser.set_defaults(func=run_prepare)
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    if args.list_sources:
        from ..data.sources import describe_registry

        print(describe_registry())
        return 0
    from ..config import load_run_config

    cfg = load_run_config(args.preset, args.overrides)  # a bad config fails before the data libraries load
    from ..data import stages

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    t0 = time.perf_counter()
    root = Path(args.output_dir) if args.output_dir else Path(cfg.output_dir) / cfg.preset / "data"
    max_seq_len = cfg.model.max_seq_len
    try:
        if args.stage == "all":
            folders = stages.prepare_all(cfg.data, cfg.tokenizer, max_seq_len, root, force=args.force)
        else:
            tok_dir = stages.prepare_tokenizer_stage(
                cfg.tokenizer, cfg.data, root / "tokenizer", force=args.force and args.stage == "tokenizer"
            )
            folders = {"tokenizer": tok_dir}
            if args.stage == "pretrain":
                folders["pretrain"] = stages.prepare_pretrain_stage(cfg.data, tok_dir, max_seq_len, root / "pretrain", args.force)
            elif args.stage == "sft":
                folders["sft"] = stages.prepare_sft_stage(cfg.data, tok_dir, max_seq_len, root / "sft", args.force)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        # a source the config names that cannot be read (a missing file, the Hub unreachable) is
        # the config's to fix
        raise UsageError(str(err)) from err
    for name, folder in folders.items():
        print(f"{name}: {folder}  {json.dumps(stages.stage_summary(folder))}")
    print(f"done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0
