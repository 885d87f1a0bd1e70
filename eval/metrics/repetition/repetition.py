"""Repetition and diversity of generated texts, as an `evaluate` metric loadable offline by path:

    import evaluate
    rep = evaluate.load("eval/metrics/repetition")          # a local folder: no Hub needed
    rep.compute(predictions=["the cat sat", "a a a a"])

Texts are split on whitespace unless `tokenizer` (a callable str -> list of tokens) is given;
`repetition_metrics` takes already tokenized sequences (any hashable tokens, e.g. model ids).

- distinct_1/2/3: distinct n-grams / all n-grams, pooled over the samples (0 when there are none);
- rep_4: share of a sample's 4-grams that repeat an earlier 4-gram of the same sample
  (1 - distinct / total), averaged over samples with at least one 4-gram;
- unigram_entropy: entropy in bits of a sample's token distribution, averaged over non-empty samples;
- loop_rate: share of samples caught in a loop: some n-gram (n <= loop_max_n) repeated 3+ times in
  a row (`a a a`, `x y x y x y`);
- mean_length: mean tokens per sample; n_samples.

Only the standard library, `datasets` and `evaluate` are imported, so the file works standalone.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence

import datasets
import evaluate

_DESCRIPTION = __doc__
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    tokenizer: optional callable text -> list of tokens (default: str.split).
    loop_max_n: longest n-gram period checked by loop_rate (default 8).
    loop_repeats: consecutive repetitions that make a loop (default 3).
Returns:
    distinct_1, distinct_2, distinct_3, rep_4, unigram_entropy, loop_rate, mean_length, n_samples.
"""


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[Hashable]], n: int) -> float:
    """Distinct n-grams over all n-grams, pooled over the samples."""
    grams = [g for s in samples for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_share(tokens: Sequence[Hashable], n: int = 4) -> float | None:
    """Share of the sample's n-grams that repeat an earlier one; None without any n-gram."""
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def unigram_entropy(tokens: Sequence[Hashable]) -> float | None:
    """Entropy (bits) of the sample's token frequencies; None for an empty sample."""
    if not tokens:
        return None
    counts = Counter(tokens)
    total = len(tokens)
    return -sum(c / total * math.log2(c / total) for c in counts.values()) + 0.0


def loop_detected(tokens: Sequence[Hashable], max_n: int = 8, repeats: int = 3) -> bool:
    """True when some n-gram (1 <= n <= max_n) occurs `repeats` or more times in a row."""
    seq = list(tokens)
    for n in range(1, max_n + 1):
        need = n * repeats
        for start in range(len(seq) - need + 1):
            block = seq[start : start + n]
            if all(seq[start + k * n : start + (k + 1) * n] == block for k in range(1, repeats)):
                return True
    return False


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else 0.0


def repetition_metrics(
    samples: Sequence[Sequence[Hashable]], loop_max_n: int = 8, loop_repeats: int = 3
) -> dict[str, float]:
    """All metrics of the module docstring for tokenized samples."""
    samples = [list(s) for s in samples]
    return {
        "distinct_1": distinct_n(samples, 1),
        "distinct_2": distinct_n(samples, 2),
        "distinct_3": distinct_n(samples, 3),
        "rep_4": _mean([repeated_share(s, 4) for s in samples]),
        "unigram_entropy": _mean([unigram_entropy(s) for s in samples]),
        "loop_rate": (sum(loop_detected(s, loop_max_n, loop_repeats) for s in samples) / len(samples))
        if samples else 0.0,
        "mean_length": _mean([float(len(s)) for s in samples]),
        "n_samples": float(len(samples)),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Repetition(evaluate.Metric):
    """evaluate.Metric wrapper of `repetition_metrics` (texts in, numbers out)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=[],
        )

    def _compute(
        self,
        predictions: Sequence[str],
        tokenizer: Callable[[str], Sequence[Hashable]] | None = None,
        loop_max_n: int = 8,
        loop_repeats: int = 3,
    ) -> dict[str, float]:
        split = tokenizer or str.split
        return repetition_metrics([split(p) for p in predictions], loop_max_n, loop_repeats)
