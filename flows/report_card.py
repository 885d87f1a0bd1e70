"""The run report card: one Markdown page with what ran, how long, and how well."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from bench.card import card_section, read_comparison
from dgpt_core.config import RunConfig
from dgpt_core.markdown import markdown_table, significant
from dgpt_core.provenance import git_state, library_versions
from eval.answers import CHAT_GROUPS, read_wide_tables
from eval.strategy_comparison import repetition_safe_method

WORLD_KEYS = ("heldout", "train", "reversal", "bio_fact_precision")
"""The dgpt_world figures of each strategy shown in the evaluation table."""
HEADLINE_STRATEGIES = ("random", "confidence")
"""The strategies the world headline compares (ancestral random order vs confidence order)."""


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
            if not isinstance(inner, dict):
                continue
            for key in ("exact_match", *WORLD_KEYS):
                if isinstance(inner.get(key), int | float):
                    row[f"{task} {key} ({strategy})"] = inner[key]
    if "cloze_accuracy" in metrics.get("storage", {}):
        row["storage cloze"] = metrics["storage"]["cloze_accuracy"]
    for strategy, values in metrics.get("repetition", {}).items():
        for key in ("loop_rate", "distinct_2"):
            if key in values:
                row[f"{key} ({strategy})"] = values[key]
    return row


def world_headline(metrics_by_model: dict[str, dict[str, Any]]) -> list[str]:
    """The card's lead when the run used the synthetic world: what pretraining contributed (held-out
    people's facts after SFT from the pretrained vs the untrained model), reversal, biography fact
    precision, random vs confidence repetition on long generations, and the two perplexity bounds."""
    sft, control, pre = (metrics_by_model.get(k, {}) for k in ("sft", "sft_control", "pretrain"))
    world = sft.get("benchmarks", {}).get("dgpt_world")
    if not world:
        return []
    base = control.get("benchmarks", {}).get("dgpt_world", {})
    strategies = [s for s in HEADLINE_STRATEGIES if s in world]
    rows = []
    for label, key in (("held-out people: attribute exact match", "heldout"),
                       ("train people: attribute exact match", "train"),
                       ("reversed questions (name from birth date and city): exact match", "reversal"),
                       ("biographies of held-out people: fact precision", "bio_fact_precision"),
                       ("biographies of held-out people: facts stated (recall)", "bio_fact_recall")):
        for strategy in strategies:
            ours, theirs = world[strategy].get(key), base.get(strategy, {}).get(key)
            gain = ours - theirs if isinstance(ours, int | float) and isinstance(theirs, int | float) else None
            rows.append([f"{label} ({strategy})", ours, theirs, gain])
    storage = pre.get("storage", {}).get("cloze_accuracy")
    lines = ["## Headline: what pretraining contributed", "",
             f"Storage: the pretrained model completes {significant(storage) if storage is not None else '–'} of "
             "the cloze probes (\" <name> was born in the city of\" -> city) over all attributes.", "",
             markdown_table(["metric", "SFT from pretrained", "SFT from untrained (control)", "difference"], rows,
                            fmt=significant), "",
             "Fact precision counts an answer that states no attribute value as 1.0 (nothing false was "
             "said): read it beside the recall row.", ""]
    rep_rows, studies = [], {}
    for model, mode, what in (("pretrain", "plain", "pretrained model continuing held-out biographies"),
                              ("sft", "chat", "SFT model's biographies of held-out people")):
        by_strategy = metrics_by_model.get(model, {}).get("repetition_by_mode", {}).get(mode, {})
        if by_strategy:
            studies[what] = by_strategy
        for strategy, r in by_strategy.items():
            rep_rows.append([what, strategy, r.get("mean_length"), r.get("loop_rate"), r.get("rep_4"),
                             r.get("distinct_2"), r.get("fact_precision")])
    if rep_rows:
        safe = repetition_safe_method(studies)
        lines += ["Long generations by decoding method:", "",
                  markdown_table(["generation", "method", "tokens", "loop rate", "rep-4", "distinct-2",
                                  "fact precision"], rep_rows, fmt=significant), "",
                  f"Repetition-safe confidence-order method (loop rate and rep-4 no higher than random order's, "
                  f"fact precision no lower, at least half its length, on every generation above): "
                  f"{f'`{safe}`, the pretrained model folder default' if safe else 'none; random order stays the default'}.",
                  ""]
    ppl_rows = []
    for model in ("pretrain", "sft", "sft_control"):
        bound = metrics_by_model.get(model, {}).get("ppl_bound", {})
        if bound:
            ppl_rows.append([model, bound.get("value"), bound.get("conditional", {}).get("value")])
    if ppl_rows:
        lines += ["Perplexity upper bounds (ELBO): *text* scores held-out pretraining text (unseen biographies) "
                  "token by token with no prompt; *answer* scores held-out SFT answers given their question. "
                  "An SFT model is trained on the second, so its text bound rises while its answer bound falls.", "",
                  markdown_table(["model", "text bound", "answer bound"], ppl_rows, fmt=significant), ""]
    return lines


RL_ROWS = (("dgpt_world", "heldout", "held-out people: attribute exact match"),
           ("dgpt_world", "train", "train people: attribute exact match"),
           ("dgpt_world", "reversal", "reversed questions: exact match"),
           ("dgpt_world", "bio_fact_recall", "biographies of held-out people: facts stated (recall)"),
           ("dgpt_world", "bio_fact_precision", "biographies of held-out people: fact precision"),
           ("dgpt_skills", "exact_match", "held-out skills: exact match"))
"""(benchmark, figure, label) of the SFT vs SFT + RL table."""


def rl_section(metrics_by_model: dict[str, dict[str, Any]], train: dict[str, Any]) -> list[str]:
    """"SFT vs SFT + RL": every eval figure of `RL_ROWS` of both models by decoding method, and the
    stage's reward at its first and last logged step."""
    sft, rl = (metrics_by_model.get(k, {}).get("benchmarks", {}) for k in ("sft", "rl"))
    if not rl and "rl" not in train:
        return []
    rows = []
    for bench, key, label in RL_ROWS:
        for strategy, inner in rl.get(bench, {}).items():
            after = inner.get(key) if isinstance(inner, dict) else None
            before = sft.get(bench, {}).get(strategy, {}).get(key)
            if isinstance(after, int | float):
                gain = after - before if isinstance(before, int | float) else None
                rows.append([f"{label} ({strategy})", before, after, gain])
    stage = train.get("rl", {})
    lines = ["## SFT vs SFT + RL", ""]
    if "reward_first" in stage:
        lines += [f"RL stage: {stage.get('steps')} updates on {stage.get('prompts')} train prompts; mean group reward "
                  f"{significant(stage['reward_first'])} at the first logged step, {significant(stage['reward_last'])} "
                  "at the last (curves in the stage's MLflow run).", ""]
    if rows:
        lines += [markdown_table(["metric", "SFT", "SFT + RL", "difference"], rows, fmt=significant), ""]
    return lines


def _hardware() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - the card must render even without torch
        gpu = "unknown"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}"


def _versions() -> str:
    return ", ".join(f"{name} {version}" for name, version in library_versions().items())


SAMPLE_CHATS = 2
"""Questions per test set (or skill) in the report card's sample chats."""


def sample_chats(eval_dir: Path) -> list[str]:
    """The first questions of each test set of an eval's chat answers (its wide answer tables,
    `eval.answers`), answered by its first two decoding methods."""
    lines = []
    for group, wide in read_wide_tables(eval_dir).items():
        if group not in CHAT_GROUPS:
            continue
        methods = [c.removeprefix("answer [")[:-1] for c in wide.columns if c.startswith("answer [")][:2]
        for _, part in wide.groupby("test_set", sort=False):
            for _, q in part.head(SAMPLE_CHATS).iterrows():
                said = "; ".join(f"({m}) `{q[f'answer [{m}]'].strip()}` {'✓' if q[f'correct [{m}]'] else '✗'}"
                                 for m in methods)
                lines.append(f"- {q['test_set']}: **{q['prompt']}** -> {said} (expected `{q['reference'].strip()}`)")
    return ["## Sample chats", "", *lines, ""] if lines else []


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
             f"answer padding `{run.data.sft.answer_padding}` (canvas {run.data.sft.answer_canvas})"
             + (f", {run.sft.pretrain_replay:.0%} of the rows replaying pretraining text" if run.sft.pretrain_replay else ""),
             *([f"- RL: {run.rl.max_steps} GRPO updates x {run.rl.per_device_batch_size} prompts x {run.rl.group_size} "
                f"answers, lr {run.rl.learning_rate}, task `{run.rl.task}`, estimator `{run.rl.estimator}`"]
               if run.rl.enabled else []),
             ""]
    evals = summary.get("evals", {})
    metrics_by_model = {name: json.loads(Path(paths["metrics_path"]).read_text()) for name, paths in evals.items()}
    lines += world_headline(metrics_by_model)
    lines += rl_section(metrics_by_model, summary.get("train_metrics", {}))
    if "mlflow" in summary:
        ml = summary["mlflow"]
        lines += [f"- MLflow: `{ml['tracking_uri']}`, experiment {ml['experiment_id']}, run `{ml['parent_run_id']}`", ""]
    if (baseline := read_comparison(summary.get("models", {}).get("sft"))) is not None:
        lines += card_section(baseline)  # where `dgpt bench` puts it: before the stages

    lines += ["## Stages", ""]
    train = summary.get("train_metrics", {})
    # the training loop's peak memory (dgpt_core.training.memory), GPU columns only where a GPU trained
    memory = [("peak_rss_mb", "peak RSS (MiB)"), ("gpu_peak_allocated_mb", "GPU peak allocated (MiB)"),
              ("gpu_peak_reserved_mb", "GPU peak reserved (MiB)")]
    memory = [(key, label) for key, label in memory if any(key in m for m in train.values())]
    rows = []
    for stage, seconds in summary.get("wall_time_s", {}).items():
        metrics = train.get(stage, {})
        rows.append([stage, seconds, summary.get("cache_hit", {}).get(stage), metrics.get("parameters"),
                     metrics.get("trainable_parameters"), metrics.get("tokens_seen"), metrics.get("tokens_per_second"),
                     *(metrics.get(key) for key, _ in memory), metrics.get("train_loss"), metrics.get("val_elbo")])
    lines += [markdown_table(["stage", "wall time (s)", "cache hit", "parameters", "trained parameters", "tokens seen",
                              "tokens/s", *(label for _, label in memory), "final train loss",
                              "validation ELBO (nats/token)"], rows, fmt=significant), ""]

    if evals:
        heads = {name: headline(m) for name, m in metrics_by_model.items()}
        keys = list(dict.fromkeys(k for h in heads.values() for k in h))
        table = markdown_table(["metric", *heads], [[k, *(heads[m].get(k) for m in heads)] for k in keys], fmt=significant)
        lines += ["## Evaluation", "", table, ""]
        for name, paths in evals.items():
            out = Path(paths["out_dir"])
            plots = " ".join(f"[{p.stem}]({p})" for p in sorted(out.glob("*.png")))
            lines.append(f"- {name}: [report]({paths['report_path']}), [metrics]({paths['metrics_path']}) {plots}")
        lines.append("")
        lines += sample_chats(Path(evals.get("sft", next(iter(evals.values())))["out_dir"]))
    if summary.get("publish"):
        lines += ["## Publish", "", f"- folder: {summary['publish'].get('folder')}", ""]
    path = run_dir / "report_card.md"
    path.write_text("\n".join(lines))
    return path
