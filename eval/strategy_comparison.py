"""Generation comparison across unmasking strategies: repetition, length, stopping, NFE, time.

Every strategy samples the same prompts with the same steps, canvas and seed, so the rows of the
comparison differ only in how positions are chosen. Text metrics (eval/metrics/repetition) are
computed on the model's token ids of each answer (up to its stop token).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dgpt_core.config.evaluation import DEFAULTS_METHOD
from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate

from .metrics.repetition.repetition import repetition_metrics


def compare_strategies(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    strategies: Sequence[str],
    config: SamplerConfig,
    *,
    batch_size: int,
    keep_samples: int = 3,
    score: Callable[[int, str], dict[str, float]] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, str]]]]:
    """`defaults` among the strategies decodes with the model folder's sampler defaults (seed and
    token temperature of `config`). Per strategy: metrics {distinct_1/2/3, rep_4, unigram_entropy, loop_rate, mean_length
    (answer tokens), stop_rate, nfe (forward passes per sampler call), nfe_total, seconds,
    ms_per_sample, n_samples}; and the first `keep_samples` (prompt, output) pairs. `batch_size`:
    prompts per sampler call (the caller's EvalConfig.batch_size). `score(prompt index, output
    text)`: per-sample metrics, averaged over the samples into the row (e.g. fact_precision)."""
    ids = TokenIds.from_tokenizer(tokenizer)
    metrics: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict[str, str]]] = {}
    for strategy in strategies:
        cfg = (SamplerConfig.of_model(model).replace(seed=config.seed, temperature=config.temperature)
               if strategy == DEFAULTS_METHOD else config.for_method(strategy))
        answers: list[list[int]] = []
        stopped: list[bool] = []
        nfes: list[int] = []
        t0 = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            result = generate(model, [list(p) for p in prompts[start : start + batch_size]], ids, cfg)
            answers += result.answers
            stopped += result.stopped
            nfes.append(result.nfe)
        seconds = time.perf_counter() - t0
        row = repetition_metrics(answers)
        row.update({
            "stop_rate": sum(stopped) / len(stopped) if stopped else 0.0,
            "nfe": sum(nfes) / len(nfes) if nfes else 0.0,
            "nfe_total": float(sum(nfes)),
            "seconds": seconds,
            "ms_per_sample": 1000 * seconds / max(1, len(answers)),
        })
        if score is not None:
            row.update(_mean_scores([score(i, tokenizer.decode(a, skip_special_tokens=True))
                                     for i, a in enumerate(answers)]))
        metrics[strategy] = row
        samples[strategy] = [
            {"prompt": tokenizer.decode(list(p), skip_special_tokens=False),
             "output": tokenizer.decode(a, skip_special_tokens=True), "stopped": str(s)}
            for p, a, s in list(zip(prompts, answers, stopped))[:keep_samples]
        ]
    return metrics, samples


def _mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over the samples that have it."""
    sums: dict[str, list[float]] = {}
    for entry in scores:
        for key, value in entry.items():
            sums.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in sums.items()}


CONFIDENCE_FAMILY = ("confidence", "confidence+guard", "confidence+remdm_conf", "confidence+remdm_cap",
                     "confidence+guard+remdm_conf", "confidence+guard+remdm_cap")
"""Confidence-order decoding methods, in order of preference (plainest first), that may replace
random order for open-ended generation when they repeat no more than it does."""


MIN_LENGTH_SHARE = 0.5
"""A safe method writes at least this share of the reference's mean answer length."""


def repetition_safe_method(by_workload: dict[str, dict[str, dict[str, float]]], reference: str = "random",
                           candidates: tuple[str, ...] = CONFIDENCE_FAMILY) -> str | None:
    """The first candidate that, on every workload (`{workload: {method: row}}`, rows of
    `compare_strategies` with fact scores where the workload has them), loops and repeats 4-grams no
    more than `reference` and states facts at least as precisely, while writing at least half as
    many tokens (an answer that stops at once repeats nothing and, by convention, states no wrong
    fact); None when none does (or the reference did not run)."""
    def safe(rows: dict[str, dict[str, float]], method: str) -> bool:
        ref, row = rows[reference], rows[method]
        return (row["loop_rate"] <= ref["loop_rate"] and row["rep_4"] <= ref["rep_4"]
                and row.get("fact_precision", 1.0) >= ref.get("fact_precision", 1.0)
                and row["mean_length"] >= MIN_LENGTH_SHARE * ref["mean_length"])

    usable = [rows for rows in by_workload.values() if reference in rows]
    if not usable:
        return None
    for method in candidates:
        if all(method in rows and safe(rows, method) for rows in usable):
            return method
    return None
