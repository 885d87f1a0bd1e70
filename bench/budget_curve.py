"""Diffusion against autoregression at equal budget (issue 29): storage and extraction of both
models against the pretraining budget, on the synthetic world.

    python -m bench.budget_curve --out runs/budget_curve [--multiples 1 2 4] [--seeds 0 1]
        [--models ours ar] [--preset tiny] [--set KEY=VALUE ...] [--import-points CURVE_JSON ...]
        [--report-only]

For every seed and every budget (multiples of the preset's `pretrain.max_steps`; SFT keeps the
preset's steps):
- `ours`: the main job itself, `dgpt run --preset P --output-dir OUT/runs --run-name
  ours-x<m>-seed<s> --set seed=<s> --set pretrain.max_steps=<N> --set eval_models=[pretrain, sft]`
  (the seed varies the world too: `data.world.seed` follows it), without the control. Its figures
  come from its eval: storage (cloze) of the pretrained and of the SFT model, exact match of
  held-out people, train people and reversed questions, and the fact recall and precision of
  held-out people's biographies, all with the SFT folder's own defaults.
- `ar`: the parameter-matched GPT-2 of `dgpt bench --suite baseline` (`bench.baseline`), trained
  on the data of the same seed's `ours` run (pretraining for <N> steps, then the same SFT),
  decoded greedily with its KV cache: the same figures on the same items (every cloze probe at
  its gold length, every question of the eval's test sets, the biography requests on the eval's
  long-answer canvas).

A finished point is written to OUT/points/<model>-x<m>-seed<s>.json and skipped by a later call,
so a stopped curve resumes where it stopped. OUT/curve.json, curve.md and curve.png (each metric
against reads per person, both models on one plot, the mean over seeds with min-max bars) are
rewritten from every point there after each point. "Reads per person" is how many biographies
of each person pretraining read (pretraining tokens / (people x mean biography tokens)).
`--import-points` copies the points of another curve.json (a curve measured over several
sessions or machines; `docs/budget_curve.json` holds the measured one) into OUT/points, where
they count as finished; a point already in OUT/points is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = ("ours", "ar")
LABELS = {"ours": "diffusion (ours)", "ar": "GPT-2 (same parameters, data and steps)"}
METRICS = {
    "storage_pretrained": "storage: cloze accuracy of the pretrained model",
    "storage_sft": "storage: cloze accuracy of the SFT model",
    "heldout": "held-out people: attribute exact match",
    "train": "train people: attribute exact match",
    "reversal": "reversed questions (held-out people): exact match",
    "bio_fact_recall": "biographies of held-out people: fact recall",
    "bio_fact_precision": "biographies of held-out people: fact precision",
}
"""The figures of every point, with their labels."""
QA_SETS = ("heldout", "train", "reversal")
BIO = ("bio_fact_recall", "bio_fact_precision")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m bench.budget_curve", description=doc.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (runs/budget_curve)")
    parser.add_argument("--multiples", type=float, nargs="+", default=[1, 2, 4],
                        help="pretraining budgets as multiples of the preset's pretrain.max_steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="run config override of every point (both models train on its data)")
    parser.add_argument("--import-points", nargs="+", default=[], type=Path, metavar="CURVE_JSON",
                        help="take the points of these curve.json files as finished")
    parser.add_argument("--report-only", action="store_true", help="only rewrite curve.json/md/png from the points")
    return parser.parse_args(argv)


def point_name(model: str, multiple: float, seed: int) -> str:
    return f"{model}-x{multiple:g}-seed{seed}"


def ours_command(args: argparse.Namespace, multiple: float, seed: int, steps: int) -> list[str]:
    return ["dgpt", "run", "--preset", args.preset, "--output-dir", str(Path(args.out) / "runs"),
            "--run-name", point_name("ours", multiple, seed), "--set", f"seed={seed}",
            "--set", f"pretrain.max_steps={steps}", "--set", "eval_models=[pretrain, sft]",
            *(x for o in args.overrides for x in ("--set", o))]


def ours_point(args: argparse.Namespace, multiple: float, seed: int, steps: int) -> dict[str, Any]:
    """Run the main job at this budget and read its figures off its eval metrics."""
    command = ours_command(args, multiple, seed, steps)
    log = Path(args.out) / "logs" / f"{point_name('ours', multiple, seed)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"budget curve: {shlex.join(command)} failed (exit {done.returncode}); see {log}")
    summary = json.loads((Path(args.out) / "runs" / point_name("ours", multiple, seed) / "summary.json").read_text())
    evals = {name: json.loads(Path(paths["metrics_path"]).read_text()) for name, paths in summary["evals"].items()}
    world = evals["sft"]["benchmarks"]["dgpt_world"]["defaults"]
    return {"command": shlex.join(command), "data_model": summary["models"]["sft"],
            "pretrain_tokens": summary["train_metrics"]["pretrain"]["tokens_seen"],
            "storage_pretrained": evals["pretrain"]["storage"]["cloze_accuracy"],
            "storage_sft": evals["sft"]["storage"]["cloze_accuracy"], **{k: world[k] for k in (*QA_SETS, *BIO)},
            "items": {k: int(world[f"n_{k}"]) for k in QA_SETS if f"n_{k}" in world}}


def ar_point(args: argparse.Namespace, multiple: float, seed: int) -> dict[str, Any]:
    """Train the matched GPT-2 on the data of the seed's `ours` run and measure it."""
    from .ar_world import ar_biographies, ar_exact_match, ar_storage
    from .baseline import train_baseline
    from .common import load_subject

    source = Path(args.out) / "points" / f"{point_name('ours', args.multiples[0], seed)}.json"
    if not source.exists():
        raise SystemExit(f"budget curve: the ar points of seed {seed} train on the data of {source.stem}: run "
                         "--models ours first")
    data_model = json.loads(source.read_text())["data_model"]
    subject = load_subject(data_model, args.preset, Path(args.out))
    storage: dict[str, float] = {}

    def after(stage: str, model: Any) -> None:
        storage[stage] = ar_storage(model, subject)

    work = Path(args.out) / "ar" / point_name("ar", multiple, seed)
    model, info = train_baseline(subject, work, {"pretrain": multiple, "sft": 1.0}, after_stage=after)
    matches = ar_exact_match(model, subject)
    bio = ar_biographies(model, subject)
    return {"data_model": data_model, "training": info, "pretrain_tokens": info["stages"]["pretrain"]["tokens"],
            "storage_pretrained": storage["pretrain"], "storage_sft": storage["sft"],
            **{k: v["exact_match"] for k, v in matches.items()}, **bio,
            "items": {k: v["n"] for k, v in matches.items()}}


def reads_per_person(tokens: int, data_model: str, preset: str) -> float:
    """Biographies of each person that `tokens` pretraining tokens amount to, in the world of
    `data_model`'s run and with its tokenizer: tokens / (people x mean biography tokens)."""
    from dgpt_core.data.world import biographies, generate_people
    from dgpt_core.models.tokenizer import load_tokenizer

    from .common import run_config

    cfg = run_config(Path(data_model), preset, None).data.world
    tokenizer = load_tokenizer(data_model)
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the end-of-text token
               for person in generate_people(cfg) for text in biographies(person, cfg)]
    return tokens / (cfg.people * sum(lengths) / len(lengths))


def import_points(sources: list[Path], points_dir: Path) -> int:
    """Write every point of the curve.json files `sources` that `points_dir` lacks; how many were new."""
    added = 0
    for source in sources:
        try:
            points = json.loads(source.read_text())["points"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"budget curve: {source} is not a curve.json with points ({error})") from None
        for point in points:
            path = points_dir / f"{point_name(point['model'], point['multiple'], point['seed'])}.json"
            if not path.exists():
                path.write_text(json.dumps(point, indent=2))
                added += 1
    return added


def summarise(out: Path) -> dict[str, Any]:
    """Every point found in out/points, grouped by model and budget: mean, min and max over seeds."""
    points = [json.loads(p.read_text()) for p in sorted((out / "points").glob("*.json"))]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault((point["model"], point["multiple"]), []).append(point)
    rows = []
    for (model, multiple), group in sorted(groups.items()):
        row: dict[str, Any] = {"model": model, "multiple": multiple, "steps": group[0]["steps"],
                               "seeds": sorted(p["seed"] for p in group),
                               "reads_per_person": statistics.mean(p["reads_per_person"] for p in group),
                               "seconds": statistics.mean(p["seconds"] for p in group)}
        for key in METRICS:
            values = [p[key] for p in group]
            row[key] = {"mean": statistics.mean(values), "min": min(values), "max": max(values), "values": values}
        rows.append(row)
    return {"points": points, "rows": rows}


def render(summary: dict[str, Any], command: str) -> str:
    from dgpt_core.markdown import markdown_table

    def cell(stat: dict[str, float]) -> str:
        if len(stat["values"]) == 1:
            return f"{stat['mean']:.3f}"
        return f"{stat['mean']:.3f} ({stat['min']:.3f}-{stat['max']:.3f})"

    rows = [[LABELS[r["model"]], r["steps"], f"{r['reads_per_person']:.0f}", ", ".join(map(str, r["seeds"])),
             *(cell(r[k]) for k in METRICS), f"{r['seconds']:.0f}"] for r in summary["rows"]]
    return "\n".join([
        "# Diffusion against autoregression at equal budget", "",
        f"`{command}`", "",
        "Mean over the seeds (min-max in brackets); each seed is its own world (names, values and split). "
        "Ours decodes with the SFT folder's defaults, GPT-2 greedily with its KV cache; both read the same "
        "pretraining tokens and get the same SFT.", "",
        markdown_table(["model", "pretraining steps", "reads per person", "seeds", *METRICS.values(),
                        "seconds per point"], rows), ""])


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.4 * len(METRICS), 3.6), sharex=True)
    spread = len({round(r["reads_per_person"]) for r in summary["rows"]}) > 1  # a log axis needs two x values
    for ax, (key, label) in zip(axes, METRICS.items()):
        for model, style in (("ours", "o-"), ("ar", "s--")):
            rows = [r for r in summary["rows"] if r["model"] == model]
            if not rows:
                continue
            x = [r["reads_per_person"] for r in rows]
            mean = [r[key]["mean"] for r in rows]
            err = [[m - r[key]["min"] for m, r in zip(mean, rows)], [r[key]["max"] - m for m, r in zip(mean, rows)]]
            ax.errorbar(x, mean, yerr=err, fmt=style, capsize=3, label=LABELS[model])
        ax.set_title(label, fontsize=8)
        if spread:
            ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("reads per person")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out: Path, command: str) -> dict[str, Any]:
    summary = summarise(out)
    (out / "curve.json").write_text(json.dumps({"command": command, **summary}, indent=2))
    (out / "curve.md").write_text(render(summary, command))
    if summary["rows"]:
        plot(summary, out / "curve.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    from dgpt_core.config import load_run_config

    args = parse_args(argv)
    out = Path(args.out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    command = "python -m bench.budget_curve " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.import_points:
        print(f"imported {import_points(args.import_points, out / 'points')} points", flush=True)
    if not args.report_only:
        base_steps = load_run_config(args.preset, args.overrides).pretrain.max_steps
        for seed in args.seeds:
            for model in [m for m in MODELS if m in args.models]:
                for multiple in args.multiples:
                    path = out / "points" / f"{point_name(model, multiple, seed)}.json"
                    if path.exists():
                        continue
                    steps = round(base_steps * multiple)
                    began = time.perf_counter()
                    figures = ours_point(args, multiple, seed, steps) if model == "ours" else ar_point(args, multiple, seed)
                    reads = reads_per_person(figures["pretrain_tokens"], figures["data_model"], args.preset)
                    point = {"model": model, "multiple": multiple, "seed": seed, "steps": steps,
                             "reads_per_person": reads, "seconds": round(time.perf_counter() - began, 1), **figures}
                    path.write_text(json.dumps(point, indent=2, default=float))
                    write_outputs(out, command)
                    print(f"{path.stem}: " + ", ".join(f"{k} {point[k]:.3f}" for k in METRICS), flush=True)
    write_outputs(out, command)
    print(out / "curve.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
