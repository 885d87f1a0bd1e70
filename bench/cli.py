"""`dgpt bench`: run the benchmark suites on a model folder and write bench.json / bench.md.

    dgpt bench --model runs/latest/models/sft --out runs/bench              # every suite
    dgpt bench --suite repetition --model runs/latest/models/sft --text-model runs/latest/models/pretrain
    dgpt bench --preset ci --out /tmp/bench                                 # random weights, seconds
    dgpt bench --preset ci --set 'data.sft.sources=[{name: world}]' --set data.sft.answer_canvas=64

Suites: `train` (diffusion vs masked-LM training step), `sample` (decoding methods on long answers:
quality, NFE and tokens/s against the fixed-step ancestral reference; sampler overhead; time vs
length), `repetition` (loops, rep-4 and fact precision of every decoding method at several step
counts, on the pretrain model's plain-text continuations and the SFT model's long answers),
`baseline` (the parameter-matched GPT-2 trained on the same data: perplexities, short answers,
long-answer tokens/s at batch 1 and 32) and `compile` (torch.compile of the backbone for sampling
and training). `--preset` picks the measurement sizes (bench/common.SIZES) and, without `--model`,
the run config whose shape a random-weight model takes and whose data is prepared into
`<out>/data`; `--set` overrides that run config (or the model folder's). When its SFT data is the
synthetic world, the comparisons run on the world's held-out people (bench/world.py), else on the
skills test items.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import ModernBertForMaskedLM

from dgpt_core.cli_errors import UsageError
from dgpt_core.generation.options import trained_block_size
from dgpt_core.generation.sampler import SamplerConfig
from dgpt_core.models.tokenizer import load_tokenizer

from .common import SIZES, load_subject
from .world import long_answer_canvas

SUITES = ("train", "sample", "repetition", "baseline", "compile")


def run_bench(
    out_dir: str | Path,
    *,
    suites: tuple[str, ...] = SUITES,
    model_dir: str | Path | None = None,
    preset: str = "tiny",
    data_dir: str | Path | None = None,
    skills_jsonl: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    run_overrides: list[str] | None = None,
    text_model_dir: str | Path | None = None,
    plots: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run `suites` and write bench.json, bench.md and the plots into out_dir; returns bench.json's
    content. `overrides` replace BenchSizes fields, `run_overrides` (`key.path=value`) change the
    run config; `text_model_dir` is the pretrain model of the repetition suite's plain-text workload
    (default: the `pretrain` folder beside an SFT model folder of a pipeline run). Suites not run this time are kept from an existing bench.json in out_dir, so the
    suites can run one command at a time."""
    from .baseline import baseline_suite
    from .compile import compile_suite
    from .repetition import find_text_model, repetition_suite
    from .report import write_report
    from .sample import sample_suite
    from .train import train_suite

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = dataclasses.replace(SIZES[preset], **(overrides or {}))
    start = time.perf_counter()
    subject = load_subject(model_dir, preset, out, data_dir, skills_jsonl, run_overrides)
    previous = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else {}
    result: dict[str, Any] = {k: v for k, v in previous.items() if k in SUITES and k not in suites}
    seconds: dict[str, float] = {k: v for k, v in previous.get("meta", {}).get("seconds", {}).items()
                                 if k in result}
    for suite in suites:
        began = time.perf_counter()
        if suite == "train":
            result["train"] = train_suite(subject.run, len(subject.tokenizer), sizes)
        elif suite == "sample":
            result["sample"] = sample_suite(subject, sizes)
        elif suite == "repetition":
            text_dir = Path(text_model_dir) if text_model_dir else find_text_model(Path(model_dir)) if model_dir else None
            text_model = None if text_dir is None else (
                ModernBertForMaskedLM.from_pretrained(str(text_dir)).eval(), load_tokenizer(text_dir))
            if text_dir is not None:
                subject.notes.append(f"repetition text workload: {text_dir}")
            result["repetition"] = repetition_suite(subject, sizes, text_model)
        elif suite == "compile":
            result["compile"] = compile_suite(subject, sizes)
        else:
            canvas = long_answer_canvas(subject) if subject.world is not None else subject.run.eval.skills_canvas or 24
            result["baseline"] = baseline_suite(subject, sizes, out, fast_method(result.get("sample"), canvas, subject.model))
            if model_dir:
                subject.notes.append(on_the_card(Path(model_dir), result["baseline"], command))
        seconds[suite] = round(time.perf_counter() - began, 1)
    result["meta"] = {
        "model": subject.description,
        "command": "; ".join(c for c in (previous.get("meta", {}).get("command", "") if result else "", command) if c),
        "preset": preset,
        "sizes": dataclasses.asdict(sizes),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "notes": subject.notes,
        "seconds": {**seconds, "this_run": round(time.perf_counter() - start, 1)},
    }
    write_report(out, result, plots=plots)
    return result


def on_the_card(model_dir: Path, baseline: dict[str, Any], command: str) -> str:
    """Leave the baseline comparison beside the model's weights and on its run's report card."""
    from .card import card_section, comparison, refresh_card, run_card_of, write_comparison

    comp = comparison(baseline, command)
    path = write_comparison(model_dir, comp)
    card = run_card_of(model_dir)
    if card is not None:
        refresh_card(card, card_section(comp))
    return f"baseline comparison: {path}" + (f", on the report card {card}" if card else "")


def fast_method(sample: dict[str, Any] | None, canvas: int, model: Any = None) -> SamplerConfig:
    """What the baseline comparison times against the AR model: a block-causal `model`'s own
    defaults (its folder's `sampler_defaults`, what a user gets with no flags); else our best
    fast decoding method as the sample suite chose it, else threshold decoding (tau 0.9, greedy,
    at most one step per token of the `canvas`)."""
    if model is not None and trained_block_size(model):
        return SamplerConfig.of_model(model)
    if sample and "best_fast_config" in sample:
        return SamplerConfig(**sample["best_fast_config"])
    return SamplerConfig(strategy="threshold", threshold=0.9, temperature=0.0, seed=0, steps=canvas,
                         max_new_tokens=canvas)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench", help="benchmark training, sampling and an AR baseline",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    parser.add_argument("--model", default=None, help="saved model folder (default: random weights of --preset)")
    parser.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    parser.add_argument("--preset", choices=sorted(SIZES), default="tiny", help="measurement sizes (default: tiny)")
    parser.add_argument("--set", dest="run_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run config value, e.g. data.world.people=12 (repeatable)")
    parser.add_argument("--text-model", default=None,
                        help="pretrain model folder of the repetition suite's plain-text workload "
                             "(default: models/pretrain beside --model)")
    parser.add_argument("--data", default=None, help="prepared data root (tokenizer/, pretrain/, sft/)")
    parser.add_argument("--skills-jsonl", default=None, help="skills test items (default: <data>/sft/skills_test.jsonl)")
    parser.add_argument("--reps", type=int, default=None, help="alternating repetitions per comparison")
    parser.add_argument("--baseline-budget", type=float, default=None,
                        help="fraction of the run's training steps for the AR baseline (default 1.0)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="generation lengths of the length plot")
    parser.add_argument("--no-plots", action="store_true")
    parser.set_defaults(func=_main)
    return parser


def _main(args: argparse.Namespace) -> int:
    for flag, folder in (("--model", args.model), ("--text-model", args.text_model)):
        if folder and not (Path(folder) / "config.json").is_file():
            raise UsageError(f"{flag} {folder} is not a saved model folder (no config.json)")
    given = {"reps": args.reps, "baseline_budget": args.baseline_budget,
             "lengths": tuple(args.lengths) if args.lengths else None}
    overrides = {k: v for k, v in given.items() if v is not None}
    suites = SUITES if args.suite == "all" else (args.suite,)
    run_bench(args.out, suites=suites, model_dir=args.model, preset=args.preset, data_dir=args.data,
              skills_jsonl=args.skills_jsonl, overrides=overrides, run_overrides=args.run_overrides,
              text_model_dir=args.text_model,
              plots=not args.no_plots,
              command="dgpt " + shlex.join(sys.argv[1:]))
    print(Path(args.out) / "bench.md")
    return 0
