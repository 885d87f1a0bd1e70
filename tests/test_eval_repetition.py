"""Repetition metrics on hand-made texts (hand-computed values), the evaluate module by path,
and the strategy comparison on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import eval as eval_pkg
from dgpt_core.generation.sampler import SamplerConfig
from eval.metrics.repetition.repetition import (
    distinct_n,
    loop_detected,
    repeated_share,
    repetition_metrics,
    unigram_entropy,
)
from eval.strategy_comparison import compare_strategies

METRIC_DIR = Path(eval_pkg.__file__).parent / "metrics" / "repetition"


def test_distinct_n_pooled_over_samples():
    samples = ["a b a b".split(), "c c".split()]
    # unigrams a b a b c c: 3 distinct of 6; bigrams ab ba ab cc: 3 of 4; trigrams aba bab: 2 of 2
    assert distinct_n(samples, 1) == pytest.approx(3 / 6)
    assert distinct_n(samples, 2) == pytest.approx(3 / 4)
    assert distinct_n(samples, 3) == pytest.approx(1.0)
    assert distinct_n([["a"]], 2) == 0.0


def test_repeated_four_gram_share():
    # 4-grams abcd bcda cdab dabc abcd: one of five repeats an earlier one
    assert repeated_share("a b c d a b c d".split()) == pytest.approx(1 / 5)
    assert repeated_share("a b c d e".split()) == 0.0
    assert repeated_share("a a a a a a".split()) == pytest.approx(2 / 3)  # aaaa x3, 1 distinct
    assert repeated_share("a b c".split()) is None


def test_unigram_entropy_bits():
    assert unigram_entropy("a b c d".split()) == pytest.approx(2.0)
    assert unigram_entropy("a a".split()) == 0.0
    assert unigram_entropy("a a b b".split()) == pytest.approx(1.0)
    # p = (1/2, 1/4, 1/4): 0.5*1 + 2*0.25*2 = 1.5 bits
    assert unigram_entropy("x x y z".split()) == pytest.approx(1.5)
    assert unigram_entropy([]) is None


@pytest.mark.parametrize(
    ("text", "max_n", "loop"),
    [
        ("a a a", 8, True),
        ("a a b a", 8, False),
        ("x y x y x y", 8, True),
        ("x y x y", 8, False),
        ("the cat sat on the cat sat on the cat sat on", 4, True),
        ("the cat sat on the cat sat on the cat sat on", 3, False),
        ("", 8, False),
    ],
)
def test_loop_detection(text, max_n, loop):
    assert loop_detected(text.split(), max_n=max_n) is loop


def test_all_metrics_on_hand_made_samples():
    samples = ["a b c d a b c d".split(), "x x x".split(), "p q".split()]
    m = repetition_metrics(samples)
    # unigrams: 8 + 3 + 2 = 13 tokens; distinct a b c d x p q = 7
    assert m["distinct_1"] == pytest.approx(7 / 13)
    # bigrams: ab bc cd da ab bc cd + xx xx + pq = 10; distinct ab bc cd da xx pq = 6
    assert m["distinct_2"] == pytest.approx(6 / 10)
    # only the first sample has 4-grams
    assert m["rep_4"] == pytest.approx(1 / 5)
    assert m["unigram_entropy"] == pytest.approx((2.0 + 0.0 + 1.0) / 3)
    assert m["loop_rate"] == pytest.approx(1 / 3)  # only "x x x"
    assert m["mean_length"] == pytest.approx(13 / 3)
    assert m["n_samples"] == 3


def test_evaluate_module_loads_offline_by_path():
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(str(METRIC_DIR))
    texts = ["a b c d a b c d", "x x x", "p q"]
    got = metric.compute(predictions=texts)
    want = repetition_metrics([t.split() for t in texts])
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key])
    chars = metric.compute(predictions=["aaa"], tokenizer=list)  # custom tokenizer: characters
    assert chars["loop_rate"] == 1.0 and chars["distinct_1"] == pytest.approx(1 / 3)


def test_compare_strategies_same_prompts_and_seed(tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer("the red cat")["input_ids"], tiny_tokenizer("1 plus 1 is")["input_ids"]]
    config = SamplerConfig(steps=4, max_new_tokens=8, temperature=0.0, seed=0)
    strategies = ["random", "confidence", "margin", "entropy"]
    opts = {"batch_size": 32, "keep_samples": 1}
    first, samples = compare_strategies(tiny_model, tiny_tokenizer, prompts, strategies, config, **opts)
    again, _ = compare_strategies(tiny_model, tiny_tokenizer, prompts, strategies, config, **opts)
    assert list(first) == strategies and set(samples) == set(strategies)
    timing = {"seconds", "ms_per_sample"}
    for strategy in strategies:
        row = first[strategy]
        for key in ("distinct_1", "distinct_2", "distinct_3", "rep_4", "unigram_entropy", "loop_rate",
                    "mean_length", "stop_rate", "nfe"):
            assert math.isfinite(row[key]), key
        assert 0 <= row["stop_rate"] <= 1 and row["mean_length"] <= 8
        assert {k: v for k, v in row.items() if k not in timing} == {
            k: v for k, v in again[strategy].items() if k not in timing
        }
    assert first["confidence"]["nfe"] == 4  # one forward per step
