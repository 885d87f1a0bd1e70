"""`dgpt train`: data stages, pretraining, SFT and (with rl in --stages) the RL stage in one
process, then a few sample chats.

    dgpt train --preset tiny [--set sft.max_steps=500 ...] [--output-dir DIR] [--stages pretrain,sft,rl]

The orchestrated flow (`dgpt run`, Prefect) adds caching, tracking, eval and publishing around
the same stage functions; this command is the plain path, e.g. for a notebook-like quick run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..cli_errors import UsageError
from ..config import add_config_arguments


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="prepare data, pretrain and SFT a model", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--output-dir", default=None, help="run folder (default: <output_dir>/<preset>)")
    parser.add_argument("--stages", default="pretrain,sft",
                        help="comma-separated subset of pretrain,sft,rl (rl trains the SFT model, enabled or not)")
    parser.add_argument("--samples", type=int, default=4,
                        help="held-out prompts to answer at the end (world questions about held-out people, or skills)")
    parser.set_defaults(func=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from ..config import load_run_config

    run = load_run_config(args.preset, args.overrides)  # a bad config fails before torch is imported
    from ..data.stages import prepare_all
    from ..rlhf.stage import train_rl_stage
    from ..training.stage import TRAINING_STAGES, train_stage

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    root = Path(args.output_dir or Path(run.output_dir) / run.preset)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    stages = (*TRAINING_STAGES, "rl")
    unknown = sorted(set(wanted) - set(stages))
    if unknown:
        raise UsageError(f"unknown stages {unknown}; choose from {list(stages)}")
    if "rl" in wanted and "sft" not in wanted and not run.sft.init_from:
        raise UsageError("--stages rl trains an SFT model: add sft, or set sft.init_from to an SFT model folder")
    run.save_yaml(root / "run_config.yaml")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    folders = prepare_all(run.data, run.tokenizer, run.model.max_seq_len, root / "data")
    timings["data"] = time.perf_counter() - start

    model_dir = None
    for stage in TRAINING_STAGES:
        if stage not in wanted or not getattr(run, stage).enabled:
            continue
        print(f"\n=== {stage} ===", file=sys.stderr)
        start = time.perf_counter()
        result = train_stage(run, stage, folders[stage], folders["tokenizer"], root / stage, init_model_dir=model_dir)
        timings[stage] = time.perf_counter() - start
        model_dir = result.model_dir
        print(f"{stage}: {json.dumps({k: result.metrics.get(k) for k in ('train_loss', 'val_elbo', 'steps')})}")
    if "rl" in wanted:
        print("\n=== rl ===", file=sys.stderr)
        start = time.perf_counter()
        result = train_rl_stage(run, folders["tokenizer"], root / "rl", model_dir or run.sft.init_from)
        timings["rl"] = time.perf_counter() - start
        model_dir = result.model_dir
        print(f"rl: {json.dumps({k: result.metrics.get(k) for k in ('reward_first', 'reward_last', 'steps')})}")

    if model_dir is not None and args.samples and "sft" in folders:
        show_samples(model_dir, held_out_questions(run, folders["sft"])[: args.samples])
    print(f"\nmodel: {model_dir}\ntimings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    return 0


def held_out_questions(run, sft_folder: Path) -> list[tuple[list[dict[str, str]], str, Callable[[str], bool]]]:
    """(chat messages, expected answer, check) of held-out prompts: the world's questions about
    held-out people when the SFT data is the world, else the held-out skills the data stage wrote."""
    from ..data.stage_cache import uses_world

    if uses_world(run.data.sft.sources):
        from ..data.world import test_pairs

        return [([{"role": "user", "content": q.question}], q.answer, lambda text, want=q.answer: text.strip() == want)
                for q in test_pairs(run.data.world)["heldout"]]
    from ..data.skills import check_answer, read_skills_jsonl

    path = sft_folder / "skills_test.jsonl"
    items = read_skills_jsonl(path) if path.exists() else []
    return [(item.prompt_messages, item.answer, lambda text, item=item: check_answer(item, text)) for item in items]


def show_samples(model_dir: Path, questions: list[tuple[list[dict[str, str]], str, Callable[[str], bool]]]) -> None:
    """Answer held-out prompts with the saved model folder (its text-diffusion pipeline) and print them."""
    from transformers import pipeline

    if not questions:
        return
    generator = pipeline("text-diffusion", model=str(model_dir), trust_remote_code=True)
    for messages, answer, check in questions:
        out = generator(messages)[0]  # the folder's sampler defaults
        mark = "ok " if check(out["generated_text"]) else "bad"
        print(f"[{mark}] {messages[-1]['content']!r} -> {out['generated_text']!r} (expected {answer!r}, nfe {out['nfe']})")
