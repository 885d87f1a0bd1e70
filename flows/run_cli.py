"""`dgpt run`: the pretrain-sft flow locally (Prefect starts a temporary server; no setup).

    dgpt run --preset tiny [--set sft.learning_rate=1e-4 ...] [--output-dir DIR]
             [--refresh sft eval] [--from sft] [--only eval] [--run-name NAME]
"""

from __future__ import annotations

import argparse
import json
import sys

from dgpt_core.run_config import add_config_arguments
from flows.plan import FLOW_STAGES


def add_run_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("run", help="run the whole flow: data -> pretrain -> SFT -> eval -> publish (Prefect flow pretrain-sft)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--output-dir", default=None, help="output root (default: the preset's output_dir)")
    parser.add_argument("--run-name", default=None, help="name of the run folder (default: preset-timestamp)")
    parser.add_argument("--refresh", nargs="+", default=[], choices=FLOW_STAGES, help="recompute these stages")
    parser.add_argument("--from", dest="from_stage", choices=FLOW_STAGES, default=None,
                        help="recompute this stage and every later one")
    parser.add_argument("--only", nargs="+", default=None, choices=FLOW_STAGES,
                        help="run only these stages (upstream stages come from the cache)")
    parser.set_defaults(func=run_flow)
    return parser


def run_flow(args: argparse.Namespace) -> int:
    from dgpt_core.run_config import load_run_config
    from flows.pretrain_sft import pretrain_sft

    try:
        run = load_run_config(args.preset, args.overrides)  # invalid config: one line, before Prefect starts
    except (ValueError, FileNotFoundError) as err:
        print(f"dgpt run: {err}", file=sys.stderr)
        return 2
    summary = pretrain_sft(preset=args.preset, overrides=args.overrides, output_dir=args.output_dir,
                           run_name=args.run_name, refresh=args.refresh, from_stage=args.from_stage, only=args.only,
                           run_config=run)
    print(json.dumps({k: summary.get(k) for k in ("run_name", "status", "wall_time_s", "cache_hit")}, indent=2))
    return 0 if summary.get("status") == "completed" else 1
