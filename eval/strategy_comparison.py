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

from dgpt_core.sampling import SamplerConfig, TokenIds, generate

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
    """Per strategy: metrics {distinct_1/2/3, rep_4, unigram_entropy, loop_rate, mean_length
    (answer tokens), stop_rate, nfe (forward passes per sampler call), nfe_total, seconds,
    ms_per_sample, n_samples}; and the first `keep_samples` (prompt, output) pairs. `batch_size`:
    prompts per sampler call (the caller's EvalConfig.batch_size). `score(prompt index, output
    text)`: per-sample metrics, averaged over the samples into the row (e.g. fact_precision)."""
    ids = TokenIds.from_tokenizer(tokenizer)
    metrics: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict[str, str]]] = {}
    for strategy in strategies:
        cfg = config.replace(strategy=strategy)
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
