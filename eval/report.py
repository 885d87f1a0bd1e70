"""Outputs of an eval run: metrics.json, samples.json, report.md and PNG plots (matplotlib Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dgpt_core.markdown import markdown_table

BAR_METRICS = ("distinct_1", "distinct_2", "distinct_3", "rep_4", "loop_rate", "stop_rate")
COMPARISON_METRICS = (
    "distinct_1", "distinct_2", "distinct_3", "rep_4", "unigram_entropy", "loop_rate",
    "mean_length", "stop_rate", "nfe", "seconds", "ms_per_sample",
)
FACT_METRICS = ("fact_precision", "fact_recall")
"""Rows of the strategy comparison when the generations are scored for facts (the world)."""
WORLD_COLUMNS = ("heldout", "train", "reversal", "bio_fact_precision", "bio_fact_recall", "bio_exact_match")
WORLD_KEYS = {"dgpt_world", "dgpt_world_steps"}


def _fmt(value: Any) -> str:
    """Floats to 3 decimals (3 significant digits when very large or small; NaN as n/a)."""
    if isinstance(value, float) and not math.isnan(value):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}"
    return "n/a" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table of eval numbers (`dgpt_core.markdown.markdown_table` with `_fmt`)."""
    return markdown_table(header, rows, fmt=_fmt)


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# plots


def plot_quality_vs_steps(sweep: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path | None:
    """Exact match against forward passes (NFE per sampler call), one line per strategy."""
    if not sweep:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, points in sweep.items():
        ax.plot(points["nfe"], points["exact_match"], marker="o", label=strategy)
        for x, y, s in zip(points["nfe"], points["exact_match"], points["steps"]):
            ax.annotate(f"{int(s)}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("forward passes per sampler call (NFE); labels = steps")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_repetition(by_mode: dict[str, dict[str, dict[str, float]]], path: Path) -> Path | None:
    """Grouped bars of the repetition metrics per strategy, one panel per mode."""
    if not by_mode:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_mode), figsize=(6.5 * len(by_mode), 4), squeeze=False)
    for ax, (mode, per_strategy) in zip(axes[0], by_mode.items()):
        strategies = list(per_strategy)
        width = 0.8 / max(1, len(strategies))
        for k, strategy in enumerate(strategies):
            xs = [i + (k - (len(strategies) - 1) / 2) * width for i in range(len(BAR_METRICS))]
            ax.bar(xs, [per_strategy[strategy].get(m, 0.0) for m in BAR_METRICS], width, label=strategy)
        ax.set_xticks(range(len(BAR_METRICS)), BAR_METRICS, rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{mode} generation")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# report.md


def _ppl_section(ppl: dict[str, Any]) -> list[str]:
    if not ppl:
        return []
    rows = []
    for name, entry in [("text", ppl), ("conditional (answers | prompts)", ppl.get("conditional"))]:
        if entry:
            rows.append([name, entry["value"], entry["stderr"], entry["nll_per_token"], entry["n_tokens"],
                         entry["n_sequences"], entry["dataset"]])
    cond = ppl.get("conditional") or {}
    note = ("" if "nll_per_scored_token" not in cond else
            f" The conditional bound noises the whole answer canvas (answer, <|im_end|>, eos padding: "
            f"{cond['n_scored_tokens']} positions, {cond['nll_per_scored_token']:.3f} nats each) and divides by "
            f"the answer tokens, so it bounds the answers' own perplexity.")
    est = ppl.get("estimator", {})
    return [
        "## Perplexity upper bound (ELBO)", "",
        f"Fixed grid of {est.get('t_points')} t values x {est.get('mask_draws')} seeded masks, "
        f"schedule {est.get('schedule')}; perplexity <= exp(nats/token).{note}", "",
        table(["bound", "perplexity <=", "stderr", "nats/token", "tokens", "sequences", "data"], rows), "",
    ]


def _benchmark_section(bench: dict[str, Any], strategies: list[str]) -> list[str]:
    out: list[str] = []
    skills = bench.get("dgpt_skills")
    if skills:
        skill_names = sorted({k.removeprefix("exact_match_") for s in skills.values() for k in s
                              if k.startswith("exact_match_")})
        rows = [[st, skills[st].get("exact_match"), *[skills[st].get(f"exact_match_{k}") for k in skill_names],
                 skills[st].get("nfe"), skills[st].get("seconds")] for st in strategies if st in skills]
        out += ["## Held-out skills (exact match, lm-eval `dgpt_skills`)", "",
                table(["strategy", "overall", *skill_names, "NFE/call", "seconds"], rows), ""]
    sweep = bench.get("dgpt_skills_steps")
    if sweep:
        out += ["### Exact match vs steps (NFE per call)", "", _sweep_table(sweep), "",
                "![quality vs steps](quality_vs_steps.png)", ""]
    others = {k: v for k, v in bench.items() if k not in {"dgpt_skills", "dgpt_skills_steps", *WORLD_KEYS}}
    if others:
        rows = []
        for task, metrics in others.items():
            if metrics and all(isinstance(v, dict) for v in metrics.values()):  # per strategy
                for st, m in metrics.items():
                    rows += [[f"{task} [{st}]", k, v] for k, v in m.items()]
            else:
                rows += [[task, k, v] for k, v in metrics.items()]
        out += ["## Other lm-eval tasks", "", table(["task", "metric", "value"], rows), ""]
    return out


def _comparison_section(metrics: dict[str, Any], strategies: list[str]) -> list[str]:
    out: list[str] = []
    by_mode = metrics.get("repetition_by_mode", {})
    skills = metrics.get("benchmarks", {}).get("dgpt_skills", {})
    for mode, per_strategy in by_mode.items():
        cols = [s for s in strategies if s in per_strategy]
        facts = [m for m in FACT_METRICS if any(m in row for row in per_strategy.values())]
        rows = [[m, *[per_strategy[s].get(m) for s in cols]] for m in (*facts, *COMPARISON_METRICS)]
        if skills and mode == metrics.get("meta", {}).get("repetition_mode"):
            rows.insert(0, ["skills exact match", *[skills.get(s, {}).get("exact_match") for s in cols]])
        out += [f"## Strategy comparison: {mode} generation", "",
                table(["metric", *cols], rows), ""]
    if by_mode:
        out += ["![repetition](repetition.png)", ""]
    return out


def _sweep_table(sweep: dict[str, dict[str, list[float]]]) -> str:
    """Exact match (NFE per call) per strategy and step count."""
    steps = sorted({int(s) for p in sweep.values() for s in p["steps"]})
    rows = []
    for st, p in sweep.items():
        by = {int(s): (em, n) for s, em, n in zip(p["steps"], p["exact_match"], p["nfe"])}
        rows.append([st, *[f"{by[s][0]:.3f} ({by[s][1]:.1f})" if s in by else "" for s in steps]])
    return table(["strategy", *[f"{s} steps" for s in steps]], rows)


def _world_section(metrics: dict[str, Any], strategies: list[str]) -> list[str]:
    """Storage (cloze accuracy overall and per attribute, with chance) and the dgpt_world tasks."""
    storage = metrics.get("storage") or {}
    bench = metrics.get("benchmarks", {})
    world, sweep = bench.get("dgpt_world") or {}, bench.get("dgpt_world_steps") or {}
    if not (storage or world):
        return []
    out = ["## World", ""]
    if storage:
        rows = [["all", storage.get("cloze_accuracy"), storage.get("token_accuracy"), "", "", storage.get("n")]]
        rows += [[attr, m["cloze_accuracy"], m["token_accuracy"], m["chance_uniform"], m["chance_majority"], m["n"]]
                 for attr, m in storage.get("per_attribute", {}).items()]
        out += [f"### Storage (cloze probes of all {storage.get('people', '')} people, greedy, gold length)", "",
                table(["attribute", "cloze accuracy", "token accuracy", "chance (uniform)", "chance (majority)",
                       "probes"], rows), ""]
    if world:
        rows = [[st, *[world[st].get(k) for k in WORLD_COLUMNS],
                 *[world[st].get(f"n_{t}") for t in ("heldout", "train", "reversal", "bio")],
                 world[st].get("nfe"), world[st].get("stop_rate")] for st in strategies if st in world]
        out += ["### Questions about people (exact match, lm-eval `dgpt_world`)", "",
                "heldout: attribute questions on people never in SFT (facts only pretraining gave); train: on "
                "SFT people; reversal: the name from birth date and city; bio: biography requests of held-out "
                "people (facts stated true / attributes stated, exact match with any of their biographies).", "",
                table(["strategy", *WORLD_COLUMNS, "n heldout", "n train", "n reversal", "n bio", "NFE/call",
                       "stop rate"], rows), ""]
    if sweep:
        out += ["### Held-out questions: exact match vs steps (NFE per call)", "", _sweep_table(sweep), "",
                "![world quality vs steps](world_quality_vs_steps.png)", ""]
    return out


def _editing_section(editing: dict[str, Any]) -> list[str]:
    if not editing:
        return []
    rows = [
        ["swaps fixed (predicted the original token)", editing["swap_fix_rate"], editing["swaps"]],
        ["insertions flagged (predicted <|delete|>)", editing["delete_recall"], editing["inserts"]],
        ["<|delete|> predictions on insertions (precision)", editing["delete_precision"], ""],
        ["clean positions changed (false edits)", editing["false_edit_rate"], editing["clean"]],
    ]
    return [
        "## Editing (swapped and inserted answer tokens, one unmasked forward)", "",
        f"{editing['examples']} held-out SFT answers, swap probability {editing['swap_prob']}, insertion "
        f"probability {editing['insert_prob']}, seed {editing['seed']}; argmax at every answer-canvas position.", "",
        table(["metric", "rate", "positions"], rows), "",
    ]


def _samples_section(samples: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for section, per_strategy in samples.items():
        if not per_strategy:
            continue
        out += [f"## Sample generations: {section}", ""]
        for strategy, items in per_strategy.items():
            if not items:
                continue
            out += [f"**{strategy}**", ""]
            keys = list(items[0])
            rows = [[str(it.get(k, "")).replace("\n", "\\n") for k in keys] for it in items]  # line breaks shown
            out += [table(keys, rows), ""]
    return out


def _answers_section(answers: dict[str, Any], per_test_set: int) -> list[str]:
    """The first `per_test_set` questions of each test set of every wide answer table
    (`eval.answers`), each method's answer marked right or wrong."""
    out: list[str] = []
    for group, wide in answers.items():
        methods = [c.removeprefix("answer [")[:-1] for c in wide.columns if c.startswith("answer [")]
        rows = []
        for _, part in wide.groupby("test_set", sort=False):
            for _, q in part.head(per_test_set).iterrows():
                marks = [f"{q[f'answer [{m}]']} {'✓' if q[f'correct [{m}]'] else '✗'}" for m in methods]
                rows.append([q["test_set"], q["prompt"], q["reference"], *marks])
        if rows:
            out += [f"## Answers: {group}", "",
                    f"The first {per_test_set} questions of each set (all of them: `answers/{group}.parquet`, "
                    "one row per question and method: `answers.parquet`).", "",
                    table(["set", "prompt", "reference", *methods],
                          [[str(v).replace("\n", "\\n").replace("|", "\\|") for v in r] for r in rows]), ""]
    return out


def render_markdown(metrics: dict[str, Any], samples: dict[str, Any], answers: dict[str, Any] | None = None) -> str:
    meta = metrics.get("meta", {})
    strategies = meta.get("settings", {}).get("strategies", [])
    lines = [
        f"# Eval report: {meta.get('model', {}).get('path', '')}", "",
        table(["field", "value"], [
            ["model kind", meta.get("model", {}).get("kind")],
            ["parameters", meta.get("model", {}).get("parameters")],
            ["commit", meta.get("commit")],
            ["seed", meta.get("seed")],
            ["steps", meta.get("settings", {}).get("steps")],
            ["wall time (s)", meta.get("wall_time_s")],
            *[[f"  {part} (s)", sec] for part, sec in meta.get("seconds", {}).items()],
        ]), "",
    ]
    lines += _ppl_section(metrics.get("ppl_bound", {}))
    lines += _benchmark_section(metrics.get("benchmarks", {}), strategies)
    lines += _world_section(metrics, strategies)
    lines += _comparison_section(metrics, strategies)
    lines += _editing_section(metrics.get("editing", {}))
    lines += _answers_section(answers or {}, meta.get("settings", {}).get("samples_in_report", 4))
    lines += _samples_section(samples)
    for note in meta.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(out_dir: str | Path, metrics: dict[str, Any], samples: dict[str, Any],
                  answers: dict[str, Any] | None = None, plots: bool = True) -> dict[str, Path]:
    """metrics.json, samples.json, report.md (with the first rows of the wide `answers` tables
    by group, `eval.answers`) and (plots) quality_vs_steps.png, repetition.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": write_json(out / "metrics.json", metrics), "samples": write_json(out / "samples.json", samples)}
    if plots:
        sweep = metrics.get("benchmarks", {}).get("dgpt_skills_steps", {})
        got = plot_quality_vs_steps(sweep, out / "quality_vs_steps.png", "held-out skills: exact match vs NFE")
        if got:
            files["quality_vs_steps"] = got
        world_sweep = metrics.get("benchmarks", {}).get("dgpt_world_steps", {})
        got = plot_quality_vs_steps(world_sweep, out / "world_quality_vs_steps.png",
                                    "world, held-out questions: exact match vs NFE")
        if got:
            files["world_quality_vs_steps"] = got
        got = plot_repetition(metrics.get("repetition_by_mode", {}), out / "repetition.png")
        if got:
            files["repetition_plot"] = got
    report = out / "report.md"
    report.write_text(render_markdown(metrics, samples, answers))
    files["report"] = report
    return files
