"""The run report card: one Markdown page with what ran, how long, and how well."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from dgpt_core.markdown import markdown_table, significant
from dgpt_core.provenance import git_state, library_versions
from dgpt_core.run_config import RunConfig


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Comparable numbers of one eval: ppl bound, exact match / accuracy per task and strategy,
    loop rate and distinct-2 per strategy."""
    row: dict[str, float] = {}
    if "value" in metrics.get("ppl_bound", {}):
        row["ppl bound"] = metrics["ppl_bound"]["value"]
    for task, values in metrics.get("benchmarks", {}).items():
        for key in ("acc", "acc_norm", "exact_match", "bits_per_byte"):
            if isinstance(values.get(key), int | float):
                row[f"{task} {key}"] = values[key]
        for strategy, inner in values.items():
            if isinstance(inner, dict) and isinstance(inner.get("exact_match"), int | float):
                row[f"{task} exact_match ({strategy})"] = inner["exact_match"]
    for strategy, values in metrics.get("repetition", {}).items():
        for key in ("loop_rate", "distinct_2"):
            if key in values:
                row[f"{key} ({strategy})"] = values[key]
    return row


def _hardware() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - the card must render even without torch
        gpu = "unknown"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"


def _versions() -> str:
    return ", ".join(f"{name} {version}" for name, version in library_versions().items())


def write_report_card(run_dir: Path, run: RunConfig, summary: dict[str, Any]) -> Path:
    """Write run_dir/report_card.md from the summary of a finished (or failed) run."""
    git = git_state()
    lines = [f"# Run report card: {summary['run_name']}", "",
             f"- status: **{summary['status']}**, preset `{run.preset}`",
             f"- git commit `{git['git.commit'][:12]}` (dirty: {git['git.dirty']})",
             f"- hardware: {_hardware()}", f"- libraries: {_versions()}",
             f"- model: hidden {run.model.hidden_size}, {run.model.num_layers} layers, {run.model.num_heads} heads, "
             f"max length {run.model.max_seq_len}, tokenizer {run.tokenizer.kind} (vocab {run.tokenizer.vocab_size})",
             f"- pretrain: {run.pretrain.max_steps} steps x batch {run.pretrain.per_device_batch_size}, "
             f"lr {run.pretrain.learning_rate}, edit stage from {run.pretrain.diffusion.edit_start:.0%}",
             f"- SFT: {run.sft.max_steps} steps x batch {run.sft.per_device_batch_size}, lr {run.sft.learning_rate}, "
             f"answer padding `{run.data.sft.answer_padding}` (canvas {run.data.sft.answer_canvas})", ""]
    if "mlflow" in summary:
        ml = summary["mlflow"]
        lines += [f"- MLflow: `{ml['tracking_uri']}`, experiment {ml['experiment_id']}, run `{ml['parent_run_id']}`", ""]

    lines += ["## Stages", ""]
    train = summary.get("train_metrics", {})
    rows = []
    for stage, seconds in summary.get("wall_time_s", {}).items():
        metrics = train.get(stage, {})
        rows.append([stage, seconds, summary.get("cache_hit", {}).get(stage), metrics.get("parameters"),
                     metrics.get("tokens_seen"), metrics.get("train_loss"), metrics.get("val_elbo")])
    lines += [markdown_table(["stage", "wall time (s)", "cache hit", "parameters", "tokens seen", "final train loss",
                              "validation ELBO (nats/token)"], rows, fmt=significant), ""]

    evals = summary.get("evals", {})
    if evals:
        metrics_by_model = {name: json.loads(Path(paths["metrics_path"]).read_text()) for name, paths in evals.items()}
        heads = {name: headline(m) for name, m in metrics_by_model.items()}
        keys = list(dict.fromkeys(k for h in heads.values() for k in h))
        table = markdown_table(["metric", *heads], [[k, *(heads[m].get(k) for m in heads)] for k in keys], fmt=significant)
        lines += ["## Evaluation", "", table, ""]
        for name, paths in evals.items():
            out = Path(paths["out_dir"])
            plots = " ".join(f"[{p.stem}]({p})" for p in sorted(out.glob("*.png")))
            lines.append(f"- {name}: [report]({paths['report_path']}), [metrics]({paths['metrics_path']}) {plots}")
        lines.append("")
        samples_path = Path(evals.get("sft", next(iter(evals.values())))["out_dir"]) / "samples.json"
        if samples_path.exists():
            lines += ["## Sample chats", ""]
            samples = json.loads(samples_path.read_text())
            for strategy, items in list(samples.get("skills", {}).items())[:2]:
                for item in items[:3]:
                    lines.append(f"- ({strategy}) **{item['prompt']}** -> `{item['output']}` (expected `{item['answer']}`)")
            lines.append("")
    if summary.get("publish"):
        lines += ["## Publish", "", f"- folder: {summary['publish'].get('folder')}", ""]
    path = run_dir / "report_card.md"
    path.write_text("\n".join(lines))
    return path
