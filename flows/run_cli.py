"""`dgpt run`: the pretrain-sft flow locally (Prefect starts a temporary server; no setup).

    dgpt run --preset tiny [--set sft.learning_rate=1e-4 ...] [--output-dir DIR]
             [--refresh sft eval] [--from sft] [--only eval] [--run-name NAME] [--no-wait]

Runs into one output root may overlap: a stage another run is building is waited for and then
taken from the cache (`--no-wait`: fail at once, naming the run that holds it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator

from dgpt_core.config import add_config_arguments
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
    parser.add_argument("--no-wait", dest="wait_for_stages", action="store_false",
                        help="fail at once when a stage this run needs is being built by another run into the same "
                             "output root (default: wait for it, then use its result)")
    parser.set_defaults(func=run_flow)
    return parser


@contextlib.contextmanager
def console_without_failure_tracebacks(debug: bool) -> Iterator[None]:
    """Prefect logs a failed task and flow with their tracebacks; on the console (its run logs keep
    them) a command's failure is its last line instead, unless --debug."""
    from prefect.logging.handlers import PrefectConsoleHandler

    def no_failure_traceback(record: logging.LogRecord) -> bool:
        return record.exc_info is None or not record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))

    consoles = [] if debug else [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    for handler in consoles:
        handler.addFilter(no_failure_traceback)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(no_failure_traceback)


def run_flow(args: argparse.Namespace) -> int:
    from dgpt_core.config import load_run_config

    run = load_run_config(args.preset, args.overrides)  # an invalid config fails here, before Prefect loads
    from flows.pretrain_sft import pretrain_sft

    with console_without_failure_tracebacks(args.debug):
        summary = pretrain_sft(preset=args.preset, overrides=args.overrides, output_dir=args.output_dir,
                               run_name=args.run_name, refresh=args.refresh, from_stage=args.from_stage,
                               only=args.only, run_config=run, wait_for_stages=args.wait_for_stages)
    print(json.dumps({k: summary.get(k) for k in ("run_name", "status", "wall_time_s", "cache_hit")}, indent=2))
    return 0 if summary.get("status") == "completed" else 1
