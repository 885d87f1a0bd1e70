"""What a sweep found: one record per trial run, the settings' metric over seeds, what the stage
cache saved, and the report (sweep.json, sweep.md and one plot per swept key)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dgpt_core.config.sweep import SweepConfig, better, mean_std
from dgpt_core.markdown import markdown_table, significant

ERROR_CHARS = 300
"""Longest error message a report cell shows (sweep.json keeps it whole)."""


@dataclass
class TrialRecord:
    """One trial run: a setting trained with one seed."""

    number: int
    """The setting's number (grid order, or the Optuna trial number)."""
    seed: int
    setting: dict[str, Any]
    run_name: str
    status: str = "failed"
    """completed, failed or pruned."""
    error: str | None = None
    value: float | None = None
    """The sweep's metric (None unless completed)."""
    wall_s: float | None = None
    cache_hit: dict[str, bool] = field(default_factory=dict)
    stage_wall_s: dict[str, float] = field(default_factory=dict)
    model_dir: str | None = None
    """The run's final model folder (SFT, else pretrain)."""
    model_run_id: str | None = None
    """The MLflow run of the stage that trained it (where the sweep logs it if it is the best)."""
    mlflow_run_id: str | None = None

    def failed(self, error: str) -> TrialRecord:
        self.status, self.error = "failed", error
        return self

    def read_summary(self, path: Path, metric: str) -> TrialRecord:
        """Fill in what the run's summary.json says (a run that never wrote one stays failed)."""
        if not path.exists():
            return self.failed(self.error or f"the run wrote no {path.name}")
        summary = json.loads(path.read_text())
        walls = dict(summary.get("wall_time_s", {}))
        self.wall_s = walls.pop("total", None)
        self.stage_wall_s, self.cache_hit = walls, summary.get("cache_hit", {})
        models, mlflow_runs = summary.get("models", {}), summary.get("mlflow", {})
        self.model_dir = models.get("sft") or models.get("pretrain")
        self.model_run_id = mlflow_runs.get("stage_run_ids", {}).get("sft")
        self.mlflow_run_id = mlflow_runs.get("parent_run_id")
        if summary.get("status") != "completed":
            self.error = summary.get("error") or self.error
            self.status = "pruned" if "TrialPrunedError" in (self.error or "") else "failed"
            return self
        self.value = summary.get("metrics", {}).get(metric)
        if self.value is None or math.isnan(self.value):
            names = sorted(summary.get("metrics", {}))
            return self.failed(f"the run has no metric {metric!r} ({len(names)} others, e.g. {names[:3]})")
        self.status, self.error = "completed", None
        return self


def group_settings(records: list[TrialRecord]) -> dict[int, list[TrialRecord]]:
    groups: dict[int, list[TrialRecord]] = defaultdict(list)
    for record in records:
        groups[record.number].append(record)
    return dict(sorted(groups.items()))


def setting_rows(cfg: SweepConfig, records: list[TrialRecord]) -> list[dict[str, Any]]:
    """One row per setting: its values, the metric's mean and standard deviation over the seeds
    that completed, their count, wall time and cache hits summed over its runs, and its status."""
    rows = []
    for number, runs in group_settings(records).items():
        mean, std = mean_std([r.value for r in runs if r.value is not None])
        statuses = sorted({r.status for r in runs})
        rows.append({"setting": number, "values": runs[0].setting, "mean": mean, "std": std,
                     "seeds_ok": sum(r.status == "completed" for r in runs), "seeds": len(cfg.seeds),
                     "wall_s": sum(r.wall_s or 0.0 for r in runs),
                     "cache_hits": sum(sum(r.cache_hit.values()) for r in runs),
                     "status": "completed" if statuses == ["completed"] else ", ".join(statuses)})
    return rows


def best_trial(cfg: SweepConfig, records: list[TrialRecord]) -> dict[str, Any] | None:
    """The best setting by its mean over seeds, and within it its best run (whose model is the
    sweep's candidate for `champion`)."""
    rows = [row for row in setting_rows(cfg, records) if row["mean"] is not None]
    if not rows:
        return None
    top = rows[0]
    for row in rows[1:]:
        if better(row["mean"], top["mean"], cfg.direction):
            top = row
    runs = [r for r in records if r.number == top["setting"] and r.value is not None]
    run = runs[0]
    for other in runs[1:]:
        if better(other.value, run.value, cfg.direction):
            run = other
    return {"setting": top["setting"], "values": top["values"], "mean": top["mean"], "std": top["std"],
            "run_name": run.run_name, "seed": run.seed, "value": run.value,
            "model_dir": run.model_dir, "model_run_id": run.model_run_id, "metrics": {cfg.metric: top["mean"]}}


def cache_accounting(records: list[TrialRecord], sweep_wall_s: float) -> dict[str, Any]:
    """Per stage: runs that executed it and runs that took it from the cache; the executions the
    cache saved; and the wall time of running the trials one by one without the cache, estimated
    from the measured time of each stage where it executed (stages that never executed in this
    sweep are left out of the estimate and named)."""
    stages: dict[str, dict[str, Any]] = defaultdict(lambda: {"executed": 0, "cache_hits": 0, "executed_s": []})
    for record in records:
        for stage, hit in record.cache_hit.items():
            stages[stage]["cache_hits" if hit else "executed"] += 1
            if not hit and stage in record.stage_wall_s:
                stages[stage]["executed_s"].append(record.stage_wall_s[stage])
    compute_s = {stage: sum(s["executed_s"]) / len(s["executed_s"]) for stage, s in stages.items() if s["executed_s"]}
    ran = [r for r in records if r.wall_s is not None]
    no_cache = sum(r.wall_s - sum(r.stage_wall_s.get(s, 0.0) for s, hit in r.cache_hit.items() if hit)
                   + sum(compute_s.get(s, 0.0) for s, hit in r.cache_hit.items() if hit) for r in ran)
    return {
        "stages": {stage: {"executed": s["executed"], "cache_hits": s["cache_hits"],
                           "seconds_per_execution": round(compute_s[stage], 2) if stage in compute_s else None}
                   for stage, s in sorted(stages.items())},
        "executions_saved": sum(s["cache_hits"] for s in stages.values()),
        "sweep_wall_s": round(sweep_wall_s, 1),
        "trials_wall_s": round(sum(r.wall_s for r in ran), 1),
        "no_cache_estimate_s": round(no_cache, 1),
        "not_estimated": sorted(s for s, v in stages.items() if v["cache_hits"] and s not in compute_s),
    }


def settings_table(cfg: SweepConfig, records: list[TrialRecord]) -> str:
    keys = [d.key for d in cfg.space]
    rows = [[row["setting"], *(row["values"][k] for k in keys), row["mean"], row["std"],
             f"{row['seeds_ok']}/{row['seeds']}", round(row["wall_s"], 1), row["cache_hits"], row["status"]]
            for row in setting_rows(cfg, records)]
    return markdown_table(["setting", *keys, f"{cfg.metric} mean", "std", "seeds ok", "wall s", "cache hits",
                           "status"], rows, fmt=significant)


def trials_table(records: list[TrialRecord]) -> str:
    rows = [[r.run_name, r.number, r.seed, r.status, r.value, None if r.wall_s is None else round(r.wall_s, 1),
             f"{sum(r.cache_hit.values())}/{len(r.cache_hit)}",
             None if r.error is None else r.error[:ERROR_CHARS]] for r in records]
    return markdown_table(["run", "setting", "seed", "status", "metric", "wall s", "cache hits", "error"], rows,
                          fmt=significant)


def plot_metric(cfg: SweepConfig, records: list[TrialRecord], out_dir: Path) -> list[Path]:
    """One plot per swept key: the metric's mean over seeds (error bars: standard deviation)
    against the key's value, one line per combination of the other keys' values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in setting_rows(cfg, records) if row["mean"] is not None]
    paths = []
    for dim in cfg.space:
        others = [d.key for d in cfg.space if d.key != dim.key]
        lines: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            lines[", ".join(f"{k}={row['values'][k]}" for k in others) or "mean ± std over seeds"].append(row)
        numeric = all(isinstance(r["values"][dim.key], int | float) and not isinstance(r["values"][dim.key], bool)
                      for r in rows)
        labels = sorted({str(r["values"][dim.key]) for r in rows})
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in sorted(lines.items()):
            points.sort(key=lambda r: r["values"][dim.key] if numeric else str(r["values"][dim.key]))
            xs = [r["values"][dim.key] if numeric else labels.index(str(r["values"][dim.key])) for r in points]
            ax.errorbar(xs, [r["mean"] for r in points], yerr=[r["std"] for r in points], marker="o", capsize=4,
                        label=label)
        if numeric and (dim.log or _spans_decades([r["values"][dim.key] for r in rows])):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(dim.key)
        ax.set_ylabel(f"{cfg.metric.rsplit('/', 1)[-1]} ({'lower' if cfg.direction == 'minimize' else 'higher'} is better)")
        ax.set_title(f"{cfg.name}: {cfg.metric}\nmean ± std over seeds {cfg.seeds}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"metric_vs_{dim.key.replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _spans_decades(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) >= 10


def write_sweep_report(sweep_dir: Path, cfg: SweepConfig, records: list[TrialRecord],
                       sweep_wall_s: float) -> dict[str, Any]:
    """sweep.json (everything), sweep.md (the tables) and the plots; returns the summary."""
    best = best_trial(cfg, records)
    cache = cache_accounting(records, sweep_wall_s)
    counts = {status: sum(r.status == status for r in records) for status in ("completed", "failed", "pruned")}
    counts["runs"] = len(records)
    plots = plot_metric(cfg, records, sweep_dir) if best else []
    summary = {"name": cfg.name, "config": cfg.model_dump(mode="json"), "space": [d.spec() for d in cfg.space],
               "counts": counts, "best": best, "cache": cache, "settings": setting_rows(cfg, records),
               "trials": [asdict(r) for r in records], "plots": [str(p) for p in plots],
               "report": str(sweep_dir / "sweep.md")}
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    failed = [r for r in records if r.status != "completed"]
    stage_rows = [[stage, s["executed"], s["cache_hits"], s["seconds_per_execution"]]
                  for stage, s in cache["stages"].items()]
    lines = [
        f"# Sweep {cfg.name}", "",
        f"{cfg.search} over {', '.join(f'`{d.spec()}`' for d in cfg.space)}; seeds {cfg.seeds} (`{cfg.seed_key}`); "
        f"preset `{cfg.preset}`{''.join(f', `--set {o}`' for o in cfg.overrides)}. Metric `{cfg.metric}` "
        f"({'lower' if cfg.direction == 'minimize' else 'higher'} is better).", "",
        f"{counts['runs']} runs: {counts['completed']} completed, {counts['failed']} failed, "
        f"{counts['pruned']} pruned.", "",
        "## Settings", "", settings_table(cfg, records), "",
        ("**Best:** no setting completed." if not best else
         f"**Best:** setting {best['setting']} {best['values']}: {best['mean']:.4g} ± {best['std']:.2g}; "
         f"its best run `{best['run_name']}` (seed {best['seed']}): {best['value']:.4g}."), "",
        *(f"![{p.stem}]({p.name})" for p in plots), "",
        "## Runs", "", trials_table(records), "",
        "## Stage cache", "",
        markdown_table(["stage", "executed", "cache hits", "s per execution"], stage_rows, fmt=significant), "",
        f"The cache saved {cache['executions_saved']} stage executions. Wall time: the sweep {cache['sweep_wall_s']} s "
        f"(its runs {cache['trials_wall_s']} s); the same runs one by one without the cache: about "
        f"{cache['no_cache_estimate_s']} s (each cache hit replaced by the stage's measured execution time"
        + (f"; not estimated: {', '.join(cache['not_estimated'])}, never executed in this sweep" if cache["not_estimated"]
           else "") + ").",
    ]
    if failed:
        lines += ["", "## Failed and pruned runs", ""] + [f"- `{r.run_name}` ({r.status}): {r.error}" for r in failed]
    (sweep_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    return summary
