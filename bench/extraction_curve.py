"""Knowledge extraction curve: held-out-people question answering against SFT steps, on the
synthetic world (`dgpt_core.data.world`), from a pretrained model or from scratch (the control).

    python -m bench.extraction_curve --out runs/extraction/NAME --pretrained runs/storage/RUN
        [--steps 300] [--eval-every 50] [--lr 1e-3] [--batch 32] [--canvas 16] [--scratch]
        [--phrasings 3] [--edit] [--threads N] [--seed 0] [--set ...]

`--pretrained` is a `bench.storage_curve` output folder: its model/ and tokenizer/ and the world
recorded in its curve.json (the same people, values and split). SFT trains on every question
phrasing of every attribute of the world's `train` people (chat template, assistant-only loss,
EOS answer padding to `--canvas`), with the preset's SFT diffusion settings (edit corruption off
unless --edit). Every `--eval-every` steps: exact match of the bare answer on the first phrasing
of every attribute of the held-out people (knowledge only pretraining can give) and of the
train people, greedy confidence decoding on the canvas. `--scratch` starts from a freshly
initialised model of the same config and tokenizer: the control.

Writes curve.json and curve.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m bench.extraction_curve", description=doc.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--pretrained", required=True, help="a bench.storage_curve output folder")
    parser.add_argument("--scratch", action="store_true", help="control: SFT from an untrained model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--canvas", type=int, default=16)
    parser.add_argument("--phrasings", type=int, default=3, help="question phrasings per attribute in SFT")
    parser.add_argument("--answer-form", choices=("value", "sentence"), default="value",
                        help="value: the bare value; sentence: the biography's probe sentence (name, relation, value)")
    parser.add_argument("--items", choices=("qa", "all"), default="qa",
                        help="qa: attribute questions only; all: the world source's SFT items (questions, reversed "
                             "questions, biography requests)")
    parser.add_argument("--normalization", choices=("sequence", "token"), default=None,
                        help="SFT loss normalization (default: the preset's)")
    parser.add_argument("--long-canvas", type=int, default=64, help="canvas of the held-out biography requests")
    parser.add_argument("--edit", action="store_true", help="keep the preset's SFT edit corruption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def qa_examples(pairs: list, tokenizer: Any, settings: Any) -> list[dict[str, Any]]:
    from dgpt_core.data.sft import tokenize_batch

    batch = {"messages": [[{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}]
                          for p in pairs],
             "skill": [p.attribute for p in pairs], "row": list(range(len(pairs)))}
    cols = tokenize_batch(batch, tokenizer, settings, "world")
    return [{"input_ids": i, "eligible_mask": m} for i, m, s in zip(cols["input_ids"], cols["eligible_mask"],
                                                                     cols["status"]) if s == "ok"]


def exact_match(model: Any, tokenizer: Any, pairs: list, canvas: int, batch: int = 128) -> dict[str, Any]:
    from collections import defaultdict

    from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate

    ids = TokenIds.from_tokenizer(tokenizer)
    cfg = SamplerConfig(strategy="confidence", steps=canvas, max_new_tokens=canvas, temperature=0.0, seed=0)
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    samples = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                               tokenize=False) for p in chunk]
        prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
        result = generate(model, prompts, ids, cfg)
        for p, answer in zip(chunk, result.answers):
            text = tokenizer.decode(answer, skip_special_tokens=True).strip()
            right = int(text == p.answer)
            for key in (p.attribute, "__all__"):
                per[key][0] += right
                per[key][1] += 1
            if len(samples) < 6:
                samples.append({"question": p.question, "gold": p.answer, "predicted": text})
    return {"exact_match": per["__all__"][0] / max(per["__all__"][1], 1), "n": per["__all__"][1],
            "per_attribute": {k: v[0] / v[1] for k, v in per.items() if k != "__all__"}, "samples": samples}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForMaskedLM, TrainerCallback, set_seed

    from dgpt_core.config import WorldConfig, load_run_config
    from dgpt_core.data.sft import SFTSettings
    from dgpt_core.data.world import generate_people, person_split, qa_pairs
    from dgpt_core.diffusion.collator import DiffusionCollator
    from dgpt_core.models.backbone import build_model, unwrap
    from dgpt_core.models.tokenizer import load_tokenizer, special_token_ids
    from dgpt_core.training.trainer import DiffusionTrainer, training_arguments

    if args.threads:
        torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.pretrained)
    if (source / "curve.json").exists():  # a bench.storage_curve folder
        curve = json.loads((source / "curve.json").read_text())
        world_fields = set(WorldConfig.model_fields)
        world = WorldConfig(**{k: v for k, v in curve["world"].items() if k in world_fields})
        model_dir, tokenizer_dir = source / "model", source / "tokenizer"
    else:  # a pipeline model folder
        from dgpt_core.config import read_folder_run_config

        world, model_dir, tokenizer_dir = read_folder_run_config(source).data.world, source, source
    run = load_run_config(args.preset, [f"seed={args.seed}", *args.overrides])
    diffusion = run.sft.diffusion if args.edit else run.sft.diffusion.model_copy(
        update={"edit_start": 1.0, "insert_prob": 0.0})
    if args.normalization:
        diffusion = diffusion.model_copy(update={"loss_normalization": args.normalization})
    stage = run.sft.model_copy(update={
        "max_steps": args.steps, "per_device_batch_size": args.batch, "learning_rate": args.lr,
        "lr_scheduler": args.schedule, "logging_steps": args.eval_every, "deepspeed": None, "save_steps": None,
        "eval_steps": None, "diffusion": diffusion})
    tokenizer = load_tokenizer(tokenizer_dir)
    people = generate_people(world)
    split = {p.name: person_split(p, world) for p in people}
    train_pairs = [q for p in people if split[p.name] == "train" for q in qa_pairs(p, world, args.phrasings)]
    test = {s: [q for p in people if split[p.name] == s for q in qa_pairs(p, world, 1)] for s in ("heldout", "train")}
    if args.items == "all":
        from dgpt_core.data.world import sft_pairs

        train_pairs = sft_pairs(world)
    if args.answer_form == "sentence":
        train_pairs = [as_sentence(q, world) for q in train_pairs]
        test = {k: [as_sentence(q, world) for q in v] for k, v in test.items()}
    settings = SFTSettings.build(run.data.sft.model_copy(update={"answer_canvas": args.canvas}),
                                 run.model.max_seq_len, tokenizer)
    rows = qa_examples(train_pairs, tokenizer, settings)
    train = Dataset.from_list(rows)
    set_seed(args.seed)
    if args.scratch:
        model = build_model(run.model, tokenizer)
    else:
        model = AutoModelForMaskedLM.from_pretrained(model_dir)
    collator = DiffusionCollator.from_tokenizer(diffusion, tokenizer, run.model.max_seq_len)
    history: list[dict[str, Any]] = []

    class Probe(TrainerCallback):
        def _evaluate(self, model_: Any, state: Any) -> None:
            m = unwrap(model_)
            m.eval()
            row = {"step": state.global_step, **{f"{s}": exact_match(m, tokenizer, test[s], args.canvas) for s in test}}
            history.append(row)
            print(f"[extraction] step {row['step']:>4} heldout {row['heldout']['exact_match']:.3f} "
                  f"train {row['train']['exact_match']:.3f} | "
                  + " ".join(f"{a}={v:.2f}" for a, v in row["heldout"]["per_attribute"].items()), flush=True)

        def on_train_begin(self, a, state, control, model=None, **kw):
            self._evaluate(model, state)

        def on_step_end(self, a, state, control, model=None, **kw):
            if state.global_step % args.eval_every == 0 or state.global_step >= state.max_steps:
                self._evaluate(model, state)

    trainer = DiffusionTrainer(
        model=model, args=training_arguments(stage, out / "checkpoints", disable_tqdm=True, eval_strategy="no",
                                             save_strategy="no"),
        train_dataset=train, data_collator=collator, diffusion_config=diffusion,
        mask_token_id=special_token_ids(tokenizer)["mask"], callbacks=[Probe()])
    print(f"[extraction] {len(people)} people ({sum(v == 'heldout' for v in split.values())} held out), "
          f"{len(rows)} SFT examples, test heldout {len(test['heldout'])} train {len(test['train'])}, "
          f"{'scratch' if args.scratch else 'pretrained'}", flush=True)
    trainer.train()
    bios = biography_scores(unwrap(model), tokenizer, world, args.long_canvas)
    print(f"[extraction] held-out biographies (canvas {args.long_canvas}, confidence): {bios}", flush=True)
    summary = {"biographies": bios, "args": vars(args), "world": world.model_dump(), "sft_examples": len(rows), "rows": history,
               "wall_seconds": time.perf_counter() - wall0}
    (out / "curve.json").write_text(json.dumps(summary, indent=2))
    print(f"[extraction] wall {summary['wall_seconds']:.0f} s; samples {history[-1]['heldout']['samples'][:3]}")
    return summary


def biography_scores(model: Any, tokenizer: Any, world: Any, canvas: int) -> dict[str, float]:
    """Mean answer length, stop rate, fact precision and recall of held-out people's biography
    requests, greedy confidence decoding on `canvas`."""
    from dgpt_core.data.world import fact_scores, generate_people, test_pairs
    from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate

    people = {p.name: p for p in generate_people(world)}
    pairs = test_pairs(world)["bio"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                           tokenize=False) for p in pairs]
    cfg = SamplerConfig(strategy="confidence", steps=canvas, max_new_tokens=canvas, temperature=0.0, seed=0)
    result = generate(model, tokenizer(texts, add_special_tokens=False)["input_ids"], TokenIds.from_tokenizer(tokenizer), cfg)
    scores = [fact_scores(tokenizer.decode(a, skip_special_tokens=True), people[p.person])
              for p, a in zip(pairs, result.answers)]
    n = max(len(scores), 1)
    return {"tokens": sum(len(a) for a in result.answers) / n, "stop_rate": sum(result.stopped) / n,
            "fact_precision": sum(s["fact_precision"] for s in scores) / n,
            "fact_recall": sum(s["fact_recall"] for s in scores) / n,
            "sample": tokenizer.decode(result.answers[0], skip_special_tokens=True) if scores else ""}


def as_sentence(pair: Any, world: Any) -> Any:
    """The QA pair answered by the attribute's first template sentence (" X was born in the city of V.")."""
    import dataclasses

    from dgpt_core.data.world import TEMPLATES

    return dataclasses.replace(pair, answer=TEMPLATES[pair.attribute][0].format(n=pair.person, v=pair.answer))


if __name__ == "__main__":
    main()
