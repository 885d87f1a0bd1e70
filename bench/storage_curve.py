"""Knowledge storage curve: cloze accuracy of the tiny model against pretraining steps on the
synthetic world of people (`dgpt_core.data.world`, issue 13's go/no-go measurement).

    python -m bench.storage_curve --out runs/storage/NAME [--people 50] [--bios 5] [--steps 1500]
        [--eval-every 250] [--lr 1e-3] [--schedule constant|cosine|wsd] [--batch 32] [--vocab 1024]
        [--seed 0] [--templates N] [--no-permute] [--warmup 0.05] [--edit] [--packing repack|once]
        [--eval-batch 128] [--threads N] [--preset tiny]
        [--set model.hidden_size=256 ...]

What it does, in one process on the CPU:
- builds the world and its pretraining text (every biography of every person; no validation
  split is taken out: storage is measured on the trained facts), trains a byte-level BPE on it
  (single-digit numbers, `--vocab` or fewer ids when BPE runs out of merges);
- tokenizes and packs it as the pretraining stage does (`dgpt_core.data.pretrain`: eos after every
  document, `max_seq_len` sequences); with `--packing repack` (default) the documents are packed
  again in a new seeded order for every pass, so no biography is always cut at the same place,
  with `once` a single packing is repeated (the pipeline's behaviour);
- pretrains the preset `tiny` model (`--set` overrides any RunConfig key, e.g. model.num_layers=6)
  with the project's DiffusionTrainer and DiffusionCollator, edit corruption off unless --edit;
- every `--eval-every` steps (and before the first and after the last) runs
  `eval.storage.cloze_accuracy` on every person's probes.

Writes to --out: curve.json (config, world and tokenizer sizes, one row per evaluation, timing),
curve.md (the table), curve.png (cloze accuracy per attribute against steps), tokenizer/ and
model/ (a pretrain model folder, for a later SFT). "Reads per person" is how many biographies of
each person the model has read so far (tokens seen / (people x mean biography tokens)), the unit
of ../shared/REFERENCE.md section 6; "epochs" is tokens seen / tokens of the whole world.
A constant (warmup then flat) learning rate is the default, so an early row approximates a
shorter run; cosine / wsd rows before the decay are not what a shorter run of that schedule gives.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "wsd": "warmup_stable_decay"}
WSD_DECAY = 0.2
"""Share of the steps the wsd schedule spends decaying (at the end)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m bench.storage_curve", description=doc.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (runs/storage/NAME)")
    parser.add_argument("--people", type=int, default=50)
    parser.add_argument("--bios", type=int, default=5, help="biographies per person")
    parser.add_argument("--templates", type=int, default=None, help="templates per attribute (default all)")
    parser.add_argument("--no-permute", action="store_true", help="keep the attribute order in biographies")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="constant")
    parser.add_argument("--warmup", type=float, default=0.05, help="warmup share of the steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (an upper bound)")
    parser.add_argument("--seed", type=int, default=0, help="world, model init, data order and collator seed")
    parser.add_argument("--edit", action="store_true", help="keep the preset's edit corruption stage")
    parser.add_argument("--packing", choices=("repack", "once"), default="repack")
    parser.add_argument("--eval-batch", type=int, default=128, help="probes per sampler call")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default; 1 is faster while another job loads the cores)")
    parser.add_argument("--mix-qa", type=int, default=0, metavar="K",
                        help="mixed training: K question phrasings per attribute of the train people, as chat "
                             "text, added to the pretraining documents; held-out QA is then probed too")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="RunConfig override, e.g. model.hidden_size=256 (repeatable)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be positive")
    return args


def packed_dataset(doc_ids: list[list[int]], max_seq_len: int, sequences: int, repack: bool, seed: int):
    """(Dataset of `input_ids`, PackStats): the documents' token stream cut into max_seq_len rows;
    `repack`: passes over the documents in fresh seeded orders until `sequences` rows exist."""
    import numpy as np

    from dgpt_core.data.pretrain import pack

    rng = np.random.default_rng(seed)
    total = sum(len(d) for d in doc_ids)
    passes = max(1, math.ceil(sequences * max_seq_len / total)) if repack else 1
    stream = [t for _ in range(passes) for i in rng.permutation(len(doc_ids)) for t in doc_ids[i]]
    return pack(np.asarray(stream, dtype=np.int32), max_seq_len, keep_remainder=not repack)


def evaluation_row(model: Any, tokenizer: Any, probes: list, batch: int) -> tuple[dict[str, Any], float]:
    from eval.storage import cloze_accuracy

    t0 = time.perf_counter()
    result = cloze_accuracy(model, tokenizer, probes, batch_size=batch, samples=3)
    return result, time.perf_counter() - t0


def mixed_qa(people: list, world: Any, phrasings: int) -> tuple[list[list[dict[str, str]]], list]:
    """(chat conversations of the train people's first `phrasings` questions per attribute, the
    held-out people's first-phrasing QA pairs)."""
    from dgpt_core.data.world import person_split, qa_pairs

    chats, test = [], []
    for person in people:
        if person_split(person, world) == "heldout":
            test += qa_pairs(person, world, 1)
        else:
            chats += [[{"role": "user", "content": pair.question}, {"role": "assistant", "content": " " + pair.answer}]
                      for pair in qa_pairs(person, world, phrasings)]
    return chats, test


def make_callback(tokenizer: Any, probes: list, args: argparse.Namespace, sizes: dict[str, float], qa_test: list):
    """A TrainerCallback that runs the cloze probe at step 0, every eval_every steps and at the end,
    and records the training loss logged at those steps."""
    from transformers import TrainerCallback

    from dgpt_core.models.backbone import unwrap

    class StorageCallback(TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []
            self.eval_seconds = 0.0
            self.train_start = 0.0

        def _evaluate(self, model: Any, state: Any) -> None:
            result, seconds = evaluation_row(unwrap(model), tokenizer, probes, args.eval_batch)
            self.eval_seconds += seconds
            tokens = int(state.num_input_tokens_seen or 0)
            reads = tokens * sizes["biography_share"] / (sizes["people"] * sizes["tokens_per_biography"])
            row = {"step": state.global_step, "tokens_seen": tokens, "reads_per_person": reads,
                   "epochs": tokens / sizes["world_tokens"], "loss": None,
                   "train_seconds": time.perf_counter() - self.train_start - self.eval_seconds,
                   "eval_seconds": seconds, **result}
            if qa_test:
                from bench.extraction_curve import exact_match

                row["heldout_qa"] = exact_match(unwrap(model), tokenizer, qa_test, 16)["exact_match"]
            self.rows.append(row)
            per = " ".join(f"{a}={v['cloze_accuracy']:.2f}" for a, v in result["per_attribute"].items())
            print(f"[storage] step {row['step']:>5} reads/person {reads:7.1f} cloze {result['cloze_accuracy']:.3f} "
                  f"token {result['token_accuracy']:.3f} heldout QA {row.get('heldout_qa', '-')} | {per} ({seconds:.1f} s)", flush=True)

        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            self.train_start = time.perf_counter()
            self._evaluate(model, state)

        def on_step_end(self, args_, state, control, model=None, **kwargs):
            if state.global_step % args.eval_every == 0 or state.global_step >= state.max_steps:
                self._evaluate(model, state)
                control.should_log = True  # the loss of the steps since the last evaluation

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.rows and self.rows[-1]["step"] == state.global_step:
                self.rows[-1]["loss"] = float(logs["loss"])

    return StorageCallback()


def render_markdown(summary: dict[str, Any]) -> str:
    from dgpt_core.markdown import markdown_table as table

    rows, attrs = summary["rows"], summary["attributes"]
    head = ["step", "reads/person", "loss", "cloze", "token acc", *attrs]
    body = [[r["step"], f"{r['reads_per_person']:.0f}", None if r["loss"] is None else f"{r['loss']:.3f}",
             f"{r['cloze_accuracy']:.3f}", f"{r['token_accuracy']:.3f}",
             *(f"{r['per_attribute'][a]['cloze_accuracy']:.2f} / {r['per_attribute'][a]['token_accuracy']:.2f}"
               for a in attrs)] for r in rows]
    last = rows[-1]["per_attribute"]
    chance = [[a, f"{last[a]['chance_uniform']:.3f}", f"{last[a]['chance_majority']:.3f}", last[a]["n"]]
              for a in attrs]
    samples = [[s["attribute"], s["prompt"], s["gold"], s["predicted"]] for s in rows[-1].get("samples", [])]
    t, w = summary["timing"], summary["world"]
    lines = [
        f"# Storage curve: {summary['name']}", "",
        f"{w['people']} people x {w['biographies_per_person']} biographies, {w['world_tokens']} tokens "
        f"({w['tokens_per_biography']:.1f} per biography), vocab {summary['vocab_size']}, "
        f"{summary['parameters'] / 1e6:.2f}M parameters; {summary['steps']} steps of batch {summary['batch']} x "
        f"{summary['max_seq_len']}, lr {summary['lr']} {summary['schedule']}; edit corruption "
        f"{'on' if summary['edit'] else 'off'}; packing {summary['packing']}.", "",
        f"Wall {t['wall_seconds']:.0f} s (training {t['train_seconds']:.0f} s, probes {t['eval_seconds']:.0f} s), "
        f"{t['tokens_per_second']:.0f} tokens/s, {summary['reads_per_person_per_100_steps']:.1f} reads per person "
        "per 100 steps.", "",
        "Cloze = exact match of the whole value; per attribute: cloze / per-token accuracy.", "",
        table(head, body), "", "Chance per attribute (uniform over distinct values, majority value share):", "",
        table(["attribute", "uniform", "majority", "probes"], chance), "",
    ]
    if samples:
        lines += ["Samples at the last step:", "", table(["attribute", "prompt", "gold", "predicted"], samples), ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for attr in summary["attributes"]:
        line, = ax.plot(steps, [r["per_attribute"][attr]["cloze_accuracy"] for r in rows], marker="o", ms=3, label=attr)
        ax.axhline(rows[-1]["per_attribute"][attr]["chance_majority"], color=line.get_color(), ls=":", lw=0.8)
    ax.plot(steps, [r["cloze_accuracy"] for r in rows], color="black", lw=2, label="all")
    ax.set_xlabel(f"pretraining step ({summary['reads_per_person_per_100_steps']:.0f} reads per person per 100 steps)")
    ax.set_ylabel("cloze exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{summary['name']}: {summary['world']['people']} people x {summary['world']['biographies_per_person']}"
                 " bios (dotted: majority chance)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch
    from transformers import set_seed

    from dgpt_core.config import WorldConfig, load_run_config
    from dgpt_core.data.world import WORLD_VERSION, cloze_probes, generate_people, pretraining_text
    from dgpt_core.diffusion.collator import DiffusionCollator
    from dgpt_core.models.backbone import build_model, count_parameters
    from dgpt_core.models.export import save_model_folder
    from dgpt_core.models.info import info_for_stage
    from dgpt_core.models.tokenizer import special_token_ids, train_bpe_tokenizer
    from dgpt_core.training.trainer import DiffusionTrainer, training_arguments

    if args.threads:
        torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = load_run_config(args.preset, [f"seed={args.seed}", *args.overrides])
    diffusion = run.pretrain.diffusion if args.edit else run.pretrain.diffusion.model_copy(
        update={"edit_start": 1.0, "insert_prob": 0.0})
    stage = run.pretrain.model_copy(update={
        "max_steps": args.steps, "per_device_batch_size": args.batch, "learning_rate": args.lr,
        "lr_scheduler": SCHEDULES[args.schedule], "warmup_ratio": args.warmup, "logging_steps": args.eval_every,
        "deepspeed": None, "save_steps": None, "eval_steps": None, "diffusion": diffusion})
    run.pretrain = stage
    world = WorldConfig(people=args.people, biographies_per_person=args.bios, seed=args.seed,
                        templates_per_attribute=args.templates, permute_sentences=not args.no_permute)
    people = generate_people(world)
    docs = pretraining_text(world)
    probes = [p for person in people for p in cloze_probes(person, world)]
    qa_docs, qa_test = mixed_qa(people, world, args.mix_qa) if args.mix_qa else ([], [])

    tokenizer = train_bpe_tokenizer(docs, args.vocab, split_digits=True)
    if qa_docs:
        qa_docs = [tokenizer.apply_chat_template(m, tokenize=False) for m in qa_docs]
        docs = docs + qa_docs
    tokenizer.save_pretrained(str(out / "tokenizer"))
    eos = special_token_ids(tokenizer)["eos"]
    doc_ids = [[*ids, eos] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    world_tokens = sum(len(d) for d in doc_ids)
    bios = doc_ids[: len(doc_ids) - len(qa_docs)]
    # reads per person count biographies only: the QA documents' share of the stream is discounted
    sizes = {"people": args.people, "tokens_per_biography": sum(len(d) for d in bios) / len(bios),
             "world_tokens": world_tokens, "biography_share": sum(len(d) for d in bios) / world_tokens}
    max_len = run.model.max_seq_len
    train, pack_stats = packed_dataset(doc_ids, max_len, args.steps * args.batch, args.packing == "repack", args.seed)

    set_seed(stage.seed)
    model = build_model(run.model, tokenizer)
    collator = DiffusionCollator.from_tokenizer(diffusion, tokenizer, max_len)
    kwargs: dict[str, Any] = {"disable_tqdm": True, "eval_strategy": "no", "save_strategy": "no"}
    if args.schedule == "wsd":
        kwargs["lr_scheduler_kwargs"] = {"num_decay_steps": max(1, round(WSD_DECAY * args.steps))}
    callback = make_callback(tokenizer, probes, args, sizes, qa_test)
    trainer = DiffusionTrainer(
        model=model, args=training_arguments(stage, out / "checkpoints", **kwargs), train_dataset=train,
        data_collator=collator, diffusion_config=diffusion, mask_token_id=special_token_ids(tokenizer)["mask"],
        callbacks=[callback],
    )
    print(f"[storage] {args.people} people x {args.bios} bios: {len(docs)} documents, {world_tokens} tokens, "
          f"vocab {len(tokenizer)}, {count_parameters(model) / 1e6:.2f}M parameters, {len(train)} packed rows, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    output = trainer.train()
    train_seconds = time.perf_counter() - callback.train_start - callback.eval_seconds
    save_model_folder(model, tokenizer, out / "model", info=info_for_stage(run, "pretrain"))
    run.save_yaml(out / "model" / "run_config.yaml")
    if (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir()):
        (out / "checkpoints").rmdir()  # nothing is saved there (save_strategy "no")

    tokens = int(trainer.state.num_input_tokens_seen)
    reads_per_step = tokens * sizes["biography_share"] / args.steps / (sizes["people"] * sizes["tokens_per_biography"])
    summary: dict[str, Any] = {
        "name": out.name, "world_version": WORLD_VERSION, "world": {**world.model_dump(), **sizes,
                                                                    "documents": len(docs), "probes": len(probes)},
        "attributes": list(world.attributes), "vocab_size": len(tokenizer), "parameters": count_parameters(model),
        "model": run.model.model_dump(), "steps": args.steps, "batch": args.batch, "max_seq_len": max_len,
        "lr": args.lr, "schedule": args.schedule, "warmup": args.warmup, "edit": args.edit, "packing": args.packing,
        "packed_rows": len(train), "packed_tokens": pack_stats.tokens_out, "seed": args.seed,
        "overrides": args.overrides, "torch_threads": torch.get_num_threads(),
        "train_loss": output.metrics.get("train_loss"),
        "reads_per_person_per_100_steps": 100 * reads_per_step, "rows": callback.rows,
    }
    summary["timing"] = {"wall_seconds": time.perf_counter() - wall0, "train_seconds": train_seconds,
                         "eval_seconds": callback.eval_seconds, "tokens_seen": tokens,
                         "tokens_per_second": tokens / max(train_seconds, 1e-9)}
    (out / "curve.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "curve.md").write_text(render_markdown(summary))
    plot(summary, out / "curve.png")
    t = summary["timing"]
    print(f"[storage] wall {t['wall_seconds']:.1f} s, training {train_seconds:.1f} s, probes {t['eval_seconds']:.1f} s, "
          f"{t['tokens_per_second']:.0f} tokens/s, {summary['reads_per_person_per_100_steps']:.1f} reads per person "
          f"per 100 steps, final cloze {callback.rows[-1]['cloze_accuracy']:.3f}; wrote {out}/curve.{{json,md,png}}",
          flush=True)
    return summary


if __name__ == "__main__":
    main()
