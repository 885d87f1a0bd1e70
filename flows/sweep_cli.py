"""`dgpt sweep`: many pretrain-sft runs of one preset over a grid or an Optuna search (Prefect flow
`sweep`, locally on Prefect's temporary server).

    dgpt sweep --preset tiny --grid sft.learning_rate=1e-3,3e-4 --grid sft.diffusion.edit_prob=0,0.05 \\
               --seeds 0,1,2 [--metric eval/sft/benchmarks/dgpt_world/confidence/heldout] [--max-parallel N]
    dgpt sweep --preset tiny --search optuna --trials 20 --grid sft.learning_rate=1e-4:3e-3:log --seeds 0

Every trial is a run into the same output root: stages a trial does not change come from the
cache. The report is `<output root>/sweeps/<name>/sweep.md`; the trials are nested under the
sweep's run in MLflow, and the best model becomes the registry's `champion` when it beats it.
"""

from __future__ import annotations

import argparse
import json

from dgpt_core.cli_errors import UsageError
from dgpt_core.config import add_config_arguments


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("sweep", help="sweep settings of the pipeline: a grid or an Optuna search (Prefect flow sweep)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--grid", dest="space", action="append", default=[], metavar="KEY=V1,V2|KEY=LOW:HIGH[:log]",
                        help="a swept config key and its values (repeatable; ranges with --search optuna)")
    parser.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated seeds of every setting (default 0)")
    parser.add_argument("--seed-key", default=None, help="config key the seed goes to (default sft.seed)")
    parser.add_argument("--metric", default=None, help="the objective, a trial run's MLflow metric name "
                        "(default train/sft/val_elbo)")
    parser.add_argument("--direction", choices=["minimize", "maximize"], default=None,
                        help="default: minimize losses, bounds and times, maximize the rest")
    parser.add_argument("--search", choices=["grid", "optuna"], default="grid")
    parser.add_argument("--trials", type=int, default=None, help="settings an Optuna search tries (default 8)")
    parser.add_argument("--no-pruning", dest="pruning", action="store_false",
                        help="Optuna: do not stop unpromising settings on their validation curve")
    parser.add_argument("--max-parallel", type=int, default=1, help="trial runs at the same time (default 1)")
    parser.add_argument("--name", default=None, help="sweep name (default sweep-<preset>-<UTC time>)")
    parser.add_argument("--output-dir", default=None, help="output root (default: the preset's output_dir)")
    parser.add_argument("--trial-deployment", default=None,
                        help="run trials as runs of this deployment (e.g. pretrain-sft/trial) on its work pool")
    parser.set_defaults(func=run_sweep)
    return parser


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def run_sweep(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from dgpt_core.cli_errors import validation_message
    from dgpt_core.config import load_run_config
    from dgpt_core.config.sweep import SweepConfig, check_keys, default_sweep_name, parse_dimension

    if not args.space:
        raise UsageError("give at least one --grid KEY=V1,V2")
    run = load_run_config(args.preset, args.overrides)  # an invalid base config fails here, before Prefect loads
    given = {"seed_key": args.seed_key, "metric": args.metric, "direction": args.direction, "trials": args.trials}
    try:
        cfg = SweepConfig(name=args.name or default_sweep_name(args.preset), preset=args.preset,
                          overrides=args.overrides, space=[parse_dimension(d) for d in args.space], seeds=args.seeds,
                          search=args.search, pruning=args.pruning, max_parallel=args.max_parallel,
                          output_dir=args.output_dir, trial_deployment=args.trial_deployment,
                          **{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise UsageError(f"invalid sweep: {validation_message(err)}") from None
    check_keys(run, cfg.space, cfg.seed_key)
    from flows.run_cli import console_without_failure_tracebacks
    from flows.sweep import sweep

    with console_without_failure_tracebacks(args.debug):  # a failed trial is a line of the report
        summary = sweep(config=cfg, run_config=run)
    print(json.dumps({"name": summary["name"], "counts": summary["counts"],
                      "best": summary["best"] and {k: summary["best"][k] for k in ("values", "mean", "run_name")},
                      "executions_saved": summary["cache"]["executions_saved"],
                      "report": str(summary.get("report"))}, indent=2, default=str))
    return 0 if summary["counts"]["completed"] else 1
