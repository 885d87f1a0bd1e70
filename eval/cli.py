"""`dgpt eval MODEL_DIR [--out DIR] [--tasks ...] [--strategies ...] [--limit N]`.

Registered in flows.cli.SUBCOMMANDS as "eval": ("eval.cli", "add_eval_parser"); also runs
as `python -m eval.cli MODEL_DIR ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dgpt_core.cli_errors import NotFoundError, UsageError, run_command

_QUIET_ENV = {
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a saved model folder (perplexity bounds, lm-eval tasks, repetition)",
        description="Evaluate a saved model folder: ELBO perplexity bounds, held-out skills and "
        "chitchat through lm-eval, strategy comparison; writes metrics.json, report.md and plots.",
    )
    p.add_argument("model_dir", help="a saved model folder (safetensors + config + tokenizer)")
    p.add_argument("--out", default=None, help="output folder (default: <model_dir>/../eval)")
    p.add_argument("--config", default=None,
                   help="EvalConfig YAML (default: the eval section of the folder's run_config.yaml, else the "
                        "defaults); the flags below override it")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="ppl dgpt_skills dgpt_chitchat_mc dgpt_heldout_text repetition editing dgpt_world storage, "
                        "or lm-eval task names")
    p.add_argument("--strategies", nargs="+", default=None,
                   help="decoding methods: random confidence margin entropy threshold eb, each optionally with "
                        "+guard, +remdm_cap, +remdm_rescale, +remdm_conf (e.g. confidence+guard)")
    p.add_argument("--limit", type=int, default=None, help="items per task (per skill for dgpt_skills)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps")
    p.add_argument("--steps-grid", type=int, nargs="*", default=None, help="steps of the quality-vs-steps sweep")
    p.add_argument("--block-size", type=int, default=None, help="semi-autoregressive block length")
    p.add_argument("--long-answer-blocks", type=int, default=None,
                   help="windows of long answers revealed left to right inside the canvas (1 = the whole canvas at once)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--mc-num", type=int, default=None, help="Monte-Carlo draws of loglikelihood")
    p.add_argument("--model-kind", choices=["auto", "untrained", "pretrain", "sft"], default=None)
    p.add_argument("--skills-jsonl", default=None, help="held-out skills JSONL")
    p.add_argument("--pretrain-data", default=None, help="pretraining data folder (validation split)")
    p.add_argument("--sft-data", default=None, help="SFT data folder (validation split, skills_test.jsonl)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run_eval_command)
    return p


def config_from_args(args: argparse.Namespace):
    """The EvalConfig of the command: --config, else the eval settings the model's run used (its
    folder's run_config.yaml), else the defaults; the flags override it."""
    from dgpt_core.config import read_folder_run_config
    from dgpt_core.config.evaluation import EvalConfig

    if args.config:
        if not Path(args.config).is_file():
            raise NotFoundError(f"--config {args.config} does not exist")
        data = EvalConfig.from_yaml(args.config).model_dump()
    else:
        run = read_folder_run_config(args.model_dir)
        data = run.eval.model_dump() if run is not None else {}
    flags = {
        "tasks": args.tasks, "strategies": args.strategies, "limit": args.limit, "steps": args.steps,
        "steps_grid": args.steps_grid, "block_size": args.block_size, "long_answer_blocks": args.long_answer_blocks,
        "seed": args.seed, "mc_num": args.mc_num,
        "model_kind": args.model_kind, "skills_jsonl": args.skills_jsonl,
        "pretrain_data_dir": args.pretrain_data, "sft_data_dir": args.sft_data,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.no_plots:
        data["plots"] = False
    return EvalConfig.model_validate(data)


def run_eval_command(args: argparse.Namespace) -> int:
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    model_dir = Path(args.model_dir)
    if not model_dir.exists():
        raise NotFoundError(f"model folder {model_dir} does not exist")
    if not (model_dir / "config.json").exists():
        raise UsageError(f"{model_dir} is not a saved model folder (no config.json)")
    cfg = config_from_args(args)
    out = Path(args.out) if args.out else model_dir.resolve().parent / "eval"
    from .benchmarks import check_standard_tasks

    try:
        check_standard_tasks(cfg.standard_tasks())
    except RuntimeError as err:  # a standard task that needs the unreachable Hub: the task list's to fix
        raise UsageError(str(err)) from err
    from .suite import run_eval

    metrics = run_eval(model_dir, out, cfg)
    print(summary(metrics))
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'}")
    return 0


def summary(metrics: dict) -> str:
    """A few headline numbers for the terminal."""
    lines = []
    ppl = metrics.get("ppl_bound") or {}
    if ppl:
        lines.append(f"ppl bound (text): {ppl['value']:.3f} +- {ppl['stderr']:.3f} over {ppl['n_tokens']} tokens")
        if "conditional" in ppl:
            c = ppl["conditional"]
            lines.append(f"ppl bound (answers | prompts): {c['value']:.3f} +- {c['stderr']:.3f} over {c['n_tokens']} tokens")
    for strategy, row in (metrics.get("benchmarks", {}).get("dgpt_skills") or {}).items():
        lines.append(f"skills exact match [{strategy}]: {row['exact_match']:.3f} (NFE/call {row['nfe']:.1f})")
    storage = metrics.get("storage")
    if storage:
        lines.append(f"storage cloze: {storage['cloze_accuracy']:.3f} (token accuracy {storage['token_accuracy']:.3f}) "
                     f"over {storage['n']} probes")
    for strategy, row in (metrics.get("benchmarks", {}).get("dgpt_world") or {}).items():
        if "heldout" in row:
            lines.append(f"world held-out exact match [{strategy}]: {row['heldout']:.3f} "
                         f"(train {row.get('train', float('nan')):.3f}, NFE/call {row['nfe']:.1f})")
    mc = metrics.get("benchmarks", {}).get("dgpt_chitchat_mc")
    if mc:
        lines.append(f"chitchat MC: acc {mc.get('acc', float('nan')):.3f}, acc_norm {mc.get('acc_norm', float('nan')):.3f}")
    for strategy, row in (metrics.get("repetition") or {}).items():
        lines.append(f"repetition [{strategy}]: distinct-2 {row['distinct_2']:.3f}, rep-4 {row['rep_4']:.3f}, "
                     f"loops {row['loop_rate']:.2f}, stop {row['stop_rate']:.2f}")
    lines.append(f"wall time: {metrics.get('meta', {}).get('wall_time_s')} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgpt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    return run_command(parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
