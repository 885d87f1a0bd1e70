"""The repetition suite: decoding that neither loops nor wastes passes, measured on long answers.

Two workloads about held-out people of the synthetic world (runs whose SFT data is the world; their
facts can only come from pretraining), each output scored for repetition
(`eval.metrics.repetition`) and for facts about its person (`fact_scores`):
- `text`: the PRETRAIN model continues the opening sentence of a held-out person's unseen
  biography as plain text (`eval.world.plain_prompts`, canvas `eval.plain_canvas`);
- `answers`: the SFT model answers biography requests of held-out people (`bench.world.bio_workload`,
  the long-answer canvas).

Every method of `METHODS` decodes both at `canvas`, `canvas // 2` and `canvas // 4` steps (seed 0,
the eval's repetition temperature): the full count, one token per step, is where confidence
decoding is known to loop. The findings say whether that reproduces (confidence loops more than
ancestral `random`, by loop rate and rep-4, at full steps) and name the target's safe method: the
first of `SAFE_ORDER` (the confidence family, with the repetition guard and/or ReMDM remasking)
whose loop rate and rep-4 are at most random's, whose fact precision is at least random's and
whose answers are at least half as long on every workload that ran (the eval's rule,
`eval.strategy_comparison.repetition_safe_method`). NFE per sampler call shows what each method
spends.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dgpt_core.config import read_folder_run_config
from dgpt_core.generation.sampler import SamplerConfig
from eval.report import table
from eval.strategy_comparison import CONFIDENCE_FAMILY, compare_strategies, repetition_safe_method
from eval.world import fact_scorer, plain_prompts

from .common import BenchSizes, Subject, Workload
from .world import bio_workload

METHODS = ("random", "confidence", "margin", "entropy", "threshold", "eb", "confidence+guard",
           "confidence+remdm_conf", "confidence+remdm_cap", "confidence+guard+remdm_conf", "confidence+guard+remdm_cap")
"""Decoding methods compared (strategy names with `+modifier`s, see `generation.options.MODIFIERS`)."""
REFERENCE = "random"
"""Ancestral MDLM decoding: the loop rate, rep-4 and fact precision a safe method must match."""
SAFE_ORDER = CONFIDENCE_FAMILY
"""Candidates for the safe method, in order of preference (the simplest first)."""
ROW_KEYS = ("loop_rate", "rep_4", "distinct_2", "unigram_entropy", "mean_length", "stop_rate",
            "fact_precision", "fact_recall", "nfe")
"""Numbers of a row (and of each of its step counts)."""
GAP_KEYS = {"loop_rate": "loop rate", "rep_4": "rep-4", "fact_precision": "fact precision"}
"""What a safe method is compared on (lower or equal loop rate and rep-4, higher or equal fact
precision), with their report labels."""
TABLE_KEYS = ("loop_rate", "rep_4", "distinct_2", "fact_precision", "fact_recall", "mean_length", "nfe")
"""Columns of a workload's table in the report (after the method)."""
TITLES = {"text": "plain-text continuations of held-out people's unseen biographies (pretrain model)",
          "answers": "biography requests of held-out people (SFT model)"}
"""What each workload is, for the report."""


def step_counts(canvas: int) -> list[int]:
    """The step counts each method decodes at: canvas, canvas // 2, canvas // 4 (at least 1)."""
    return sorted({canvas, max(1, canvas // 2), max(1, canvas // 4)}, reverse=True)


def compare_methods(model: torch.nn.Module, tokenizer: Any, workload: Workload, base: SamplerConfig,
                    batch_size: int) -> dict[str, dict[str, Any]]:
    """Row per method of `METHODS`: the `ROW_KEYS` at full steps (steps = canvas) and `by_steps`,
    the same numbers per step count (keys are the counts as strings)."""
    by_steps: dict[int, dict[str, dict[str, float]]] = {}
    for steps in step_counts(workload.canvas):
        cfg = workload.sampler(base.replace(steps=steps))
        by_steps[steps], _ = compare_strategies(model, tokenizer, workload.prompts, METHODS, cfg,
                                                batch_size=batch_size, keep_samples=0, score=workload.scorer)
    rows = {}
    for method in METHODS:
        per_steps = {str(s): {k: metrics[method][k] for k in ROW_KEYS} for s, metrics in by_steps.items()}
        rows[method] = {**per_steps[str(workload.canvas)], "by_steps": per_steps}
    return rows


def text_workload(subject: Subject, tokenizer: Any, sizes: BenchSizes) -> Workload:
    """Openings of up to `sizes.world_people` held-out people's unseen biographies as pretraining
    text, on the eval's plain-text canvas; quality = fact precision, then fact recall."""
    assert subject.world is not None, "the run's SFT data is not the world"
    prompts, people = plain_prompts(subject.world, tokenizer, sizes.world_people)
    return Workload("text", prompts, subject.run.eval.plain_canvas, fact_scorer(people),
                    ("fact_precision", "fact_recall"))


def gaps(rows: dict[str, dict[str, dict[str, Any]]], method: str) -> dict[str, dict[str, float]]:
    """Per workload of `rows`, the method's `GAP_KEYS` minus the reference's (full steps)."""
    return {w: {k: by_method[method][k] - by_method[REFERENCE][k] for k in GAP_KEYS}
            for w, by_method in rows.items()}


def worst_excess(method_gaps: dict[str, dict[str, float]]) -> float:
    """How far the method is from safe at worst: the largest of its loop-rate and rep-4 excess and
    its fact-precision shortfall over the workloads (<= 0: safe; inf without any workload)."""
    return max((max(g["loop_rate"], g["rep_4"], -g["fact_precision"]) for g in method_gaps.values()),
               default=math.inf)


def findings(rows: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Whether confidence loops more than random per workload, the safe method (None when no
    candidate is safe) and the gaps of that method (else of the closest candidate) to random."""
    loops_more = {w: r["confidence"]["loop_rate"] > r[REFERENCE]["loop_rate"] and
                  r["confidence"]["rep_4"] > r[REFERENCE]["rep_4"] for w, r in rows.items()}
    safe = repetition_safe_method(rows, REFERENCE, SAFE_ORDER)
    compared = safe or min(SAFE_ORDER, key=lambda m: worst_excess(gaps(rows, m)))
    return {"reference": REFERENCE, "confidence_loops_more": loops_more, "candidates": list(SAFE_ORDER),
            "safe_method": safe, "target_met": safe is not None, "compared": compared,
            "gaps": gaps(rows, compared)}


def repetition_suite(subject: Subject, sizes: BenchSizes,
                     text_model: tuple[torch.nn.Module, Any] | None) -> dict[str, Any]:
    """bench.json's `repetition`: {text: {method: row}, answers: {method: row}, workloads:
    {name: {canvas, prompts, steps, model} or {skipped}}, findings}; `text_model` is the pretrain
    model and its tokenizer (None: the text workload is skipped). Only for world runs."""
    if subject.world is None:
        return {"skipped": "the run's SFT data is not the synthetic world (no held-out people)"}
    cfg = subject.run.eval
    base = SamplerConfig(temperature=cfg.repetition_token_temperature, seed=0, threshold=cfg.threshold)
    runs: dict[str, tuple[torch.nn.Module, Any, Workload, str]] = {}
    info: dict[str, dict[str, Any]] = {}
    if text_model is None:
        info["text"] = {"skipped": "no pretrain model of this run was found or given"}
    else:
        model, tokenizer = text_model
        runs["text"] = (model, tokenizer, text_workload(subject, tokenizer, sizes),
                        getattr(model, "name_or_path", "") or "pretrain model (in memory)")
    runs["answers"] = (subject.model, subject.tokenizer, bio_workload(subject, sizes), subject.description)
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for name, (model, tokenizer, workload, description) in runs.items():
        if not workload.prompts:
            info[name] = {"skipped": "no held-out people"}
            continue
        info[name] = {"canvas": workload.canvas, "prompts": len(workload.prompts),
                      "steps": step_counts(workload.canvas), "model": description}
        rows[name] = compare_methods(model, tokenizer, workload, base, sizes.batch_size)
    return {**rows, "workloads": info, "findings": findings(rows)}


def render_repetition(result: dict[str, Any]) -> list[str]:
    """Markdown lines of bench.md's Repetition section: per workload a table of the methods at
    full steps and one of loop rate by steps, then the findings."""
    lines = ["## Repetition", ""]
    if "skipped" in result:
        return [*lines, f"Skipped: {result['skipped']}.", ""]
    for name, info in result["workloads"].items():
        lines += [f"### {TITLES[name]}", ""]
        if "skipped" in info:
            lines += [f"Skipped: {info['skipped']}.", ""]
            continue
        rows = result[name]
        lines += [f"{info['prompts']} prompts, canvas {info['canvas']}, model {info['model']}; at full steps "
                  f"({info['canvas']}, one token per step):", "",
                  table(["method", "loop rate", "rep-4", "distinct-2", "fact precision", "fact recall",
                         "mean length", "NFE"],
                        [[m, *(r[k] for k in TABLE_KEYS)] for m, r in rows.items()]), "",
                  "Loop rate by steps:", "",
                  table(["method", *(f"{s} steps" for s in info["steps"])],
                        [[m, *(r["by_steps"][str(s)]["loop_rate"] for s in info["steps"])]
                         for m, r in rows.items()]), ""]
    found = result["findings"]
    reproduced = ", ".join(f"{w} {'yes' if v else 'no'}" for w, v in found["confidence_loops_more"].items())
    gap_text = "; ".join(f"{w}: " + ", ".join(f"{GAP_KEYS[k]} {v:+.3f}" for k, v in g.items())
                         for w, g in found["gaps"].items())
    lines += [f"Findings: confidence loops more than {REFERENCE} (loop rate and rep-4, full steps): "
              f"{reproduced or 'no workload ran'}. Safe method (loop rate and rep-4 <= {REFERENCE}'s, fact "
              f"precision >= {REFERENCE}'s, at least half its length, on every workload): {found['safe_method'] or 'none'} (target met: "
              f"{found['target_met']}); {found['compared']} - {REFERENCE}: {gap_text or 'n/a'}.", ""]
    return lines


def find_text_model(model_dir: Path) -> Path | None:
    """The pretrain model folder behind the SFT model folder `model_dir`, else None: the folder the
    SFT stage started from when its run_config.yaml names one (`sft.init_from`), else the
    `pretrain` link beside `model_dir` when that is a pipeline run's `runs/<run>/models/sft` link
    (the flow links `models/{untrained,pretrain,sft}` to the stages' model folders). A resolved
    stage folder (`stages/sft-<key>/model`) names no pretrain model: pass that link instead."""
    run = read_folder_run_config(model_dir)
    candidates = [Path(run.sft.init_from)] if run is not None and run.sft.init_from else []
    candidates.append(model_dir.parent / "pretrain")
    return next((c for c in candidates if (c / "config.json").is_file()), None)
