"""`dgpt bench` on a run whose data is the synthetic world (the ci preset switched to a 12-person
world, random weights, shrunk sizes): the decoding comparison runs on biography requests of
held-out people scored by facts, the baseline comparison on reversed and attribute questions; the
world's keys exist, lie in [0, 1], agree with each other, and bench.md shows them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch

from bench.cli import add_bench_parser, run_bench
from bench.common import SIZES, load_subject
from bench.world import bio_workload, qa_workload
from dgpt_core.config import load_run_config
from dgpt_core.data.world import CITIES, biographies, generate_people, test_pairs
from eval.report import _fmt

WORLD = ["data.sft.sources=[{name: world}]", "data.pretrain.sources=[{name: world}]", "data.world.people=12",
         "data.sft.answer_canvas=64", "sft.pretrain_replay=0.25"]
"""Run config overrides that switch the ci preset to the world, with pretraining text replayed in SFT."""
SMALL = {"reps": 1, "overhead_vocabs": (), "lengths": (32,), "length_block": 16, "thresholds": (0.9,),
         "batch_size": 64, "baseline_budget": 0.1, "ppl_sequences": 2, "world_people": 2}
"""Bench sizes: two held-out people, one threshold, no overhead measurement."""
SIZES_WORLD = dataclasses.replace(SIZES["ci"], **SMALL)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_world")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits on a busy shared core (50x slower)
    try:
        run_bench(out, suites=("sample", "baseline"), preset="ci", overrides=SMALL, run_overrides=WORLD,
                  plots=False, command="pytest")
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def result(bench):
    return json.loads((bench / "bench.json").read_text())


@pytest.fixture(scope="module")
def world():
    return load_run_config("ci", WORLD).data.world


def item_counts(world) -> dict[str, int]:
    """Reversed and attribute questions about the first `world_people` held-out people."""
    people = {p.person for p in test_pairs(world)["bio"][: SMALL["world_people"]]}
    return {s: sum(p.person in people for p in test_pairs(world)[s]) for s in ("reversal", "heldout")}


def unit(value) -> bool:
    return isinstance(value, int | float) and 0 <= value <= 1


def test_decoding_runs_on_biography_requests_scored_by_facts(result, world):
    sample = result["sample"]
    keys = ["fact_recall", "fact_precision", "exact_match"]
    assert sample["workload"] == "world" and sample["quality_keys"] == keys
    assert sample["canvas"] == 64 and sample["items"] == min(SMALL["world_people"], len(test_pairs(world)["bio"]))
    for point in sample["sweep"].values():
        assert all(unit(point[k]) for k in ("fact_recall", "fact_precision", "exact_match", "loop_rate"))
        assert 1 <= point["nfe_per_prompt"] <= point["nfe"] <= sample["canvas"]
    sweep, ref = sample["sweep"], sample["sweep"][sample["reference"]]
    # equal quality: fact recall, precision and exact match each within the tolerance of the reference's
    fast = [n for n in sweep if not n.startswith("ancestral@")]
    qualified = [n for n in fast if all(sweep[n][k] >= ref[k] - 0.01 for k in keys)
                 and sweep[n]["loop_rate"] <= ref["loop_rate"]]
    assert sample["best_fast_within_quality"] == bool(qualified)
    if qualified:
        assert sample["best_fast"] == max(qualified, key=lambda n: sweep[n]["tokens_per_s"])
    best = sweep[sample["best_fast"]]
    assert sample["nfe_speedup"] == pytest.approx(ref["nfe_per_prompt"] / best["nfe_per_prompt"])
    assert sample["tokens_per_s_speedup"] == pytest.approx(best["tokens_per_s"] / ref["tokens_per_s"], rel=1e-9)
    assert sample["overhead_share"] == {}


def test_baseline_compares_reversal_and_heldout_exact_match(result, world):
    base = result["baseline"]
    assert base["workload"] == "world"
    assert base["quality_keys"] == ["reversal_exact_match", "heldout_exact_match"]
    want = item_counts(world)
    assert base["world_items"] == want and want["reversal"] >= 1 and want["heldout"] >= SMALL["world_people"]
    for model in ("ar", "ours"):
        row = base[model]
        assert unit(row["reversal_exact_match"]) and unit(row["heldout_exact_match"]) and unit(row["loop_rate"])
        assert math.isfinite(row["ppl"]) and row["ppl"] >= 1 and math.isfinite(row["answer_ppl"])
        assert 1 <= row["nfe"] <= 64 and "exact_match" not in row
    assert base["reversal_ours_minus_ar"] == pytest.approx(
        base["ours"]["reversal_exact_match"] - base["ar"]["reversal_exact_match"])
    assert set(base["ar"]["training"]["stages"]) == {"pretrain", "sft"}
    # long answers: the biography requests of the held-out people, scored by facts, at batch 1 and 32
    long, people = base["long_answers"], min(SMALL["world_people"], len(test_pairs(world)["bio"]))
    assert (long["workload"], long["canvas"]) == ("world", result["sample"]["canvas"])
    assert long["items"] == {"batch_1": people, "batch_32": people}
    for model in ("ar", "ours", "ours_cache"):
        row = long[model]
        assert all(unit(row[k]) for k in ("fact_recall", "fact_precision", "exact_match", "loop_rate"))
        assert 1 <= row["nfe"] <= long["canvas"]
        for batch, speed in base[model]["tokens_per_s"].items():
            assert batch in ("batch_1", "batch_32") and math.isfinite(speed) and speed > 0
    for model in ("ours", "ours_cache"):
        assert set(base[f"{model}_vs_ar_tokens_per_s"]) == {"batch_1", "batch_32"}
        for batch, ratio in base[f"{model}_vs_ar_tokens_per_s"].items():  # one repetition: the ratio of the speeds
            assert ratio == pytest.approx(base[model]["tokens_per_s"][batch] / base["ar"]["tokens_per_s"][batch],
                                          rel=1e-9)


def test_the_report_has_a_world_section(bench, result):
    text = (bench / "bench.md").read_text()
    sample, base = result["sample"], result["baseline"]
    assert "## Decoding methods on the world's biography requests of held-out people" in text
    world = text[text.index("## World"):]
    gap = base["reversal_ours_minus_ar"]
    assert f"| world reversal exact match, ours - AR | {_fmt(gap)} | > 0 | {gap > 0} |" in text
    for model in ("ar", "ours"):
        row = base[model]
        assert f"| {model} | {_fmt(row['reversal_exact_match'])} | {_fmt(row['heldout_exact_match'])} |" in world
    ref = sample["sweep"][sample["reference"]]
    assert (f"| {sample['reference']} | reference (fixed-step ancestral) | {_fmt(ref['fact_recall'])} | "
            f"{_fmt(ref['fact_precision'])} |") in world
    assert f"NFE x{sample['nfe_speedup']:.2f} (target >= 3)" in world
    assert f"tokens/s x{sample['tokens_per_s_speedup']:.2f} (target >= 2.5)" in world
    assert "run config overrides: " + " ".join(WORLD) in text


def test_the_scorers_score_gold_answers_one_and_wrong_ones_zero(bench, world):
    subject = load_subject(None, "ci", bench, data_dir=bench / "data", run_overrides=WORLD)
    people = {p.name: p for p in generate_people(world)}
    first = people[test_pairs(world)["bio"][0].person]
    bio = bio_workload(subject, SIZES_WORLD)
    gold = " " + biographies(first, world)[-1]  # any of the person's biographies, with the leading space
    assert bio.scorer(0, gold) == {"fact_recall": 1.0, "fact_precision": 1.0, "exact_match": 1.0}
    city = next(c for c in CITIES if c not in first.attributes.values())
    assert bio.scorer(0, f"{first.name} was born in {city}.") == {"fact_recall": 0.0, "fact_precision": 0.0,
                                                                 "exact_match": 0.0}
    qa = qa_workload(subject, SIZES_WORLD)
    assert len(qa.prompts) == sum(item_counts(world).values())
    assert test_pairs(world)["reversal"][0].person == first.name  # the reversed questions come first
    assert qa.scorer(0, " " + first.name) == {"reversal_exact_match": 1.0}
    assert qa.scorer(0, "Nobody") == {"reversal_exact_match": 0.0}


def test_the_cli_passes_run_config_overrides():
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--preset", "ci", *(a for o in WORLD for a in ("--set", o))])
    assert args.run_overrides == WORLD


def test_a_block_model_times_lower_thresholds_in_the_same_loop_as_its_defaults(bench):
    from transformers import GPT2LMHeadModel

    from bench.baseline import THRESHOLD_CURVE, long_answer_speed, matched_config
    from bench.cli import fast_method
    from bench.report import threshold_curve_lines
    from dgpt_core.generation.options import DEFAULTS_KEY, INFO_KEY
    from dgpt_core.generation.sampler import TokenIds

    subject = load_subject(None, "ci", bench, data_dir=bench / "data", run_overrides=WORLD)
    setattr(subject.model.config, INFO_KEY, {"kind": "sft", "block_size": 8})
    setattr(subject.model.config, DEFAULTS_KEY, {"strategy": "threshold", "threshold": 0.9, "steps": 8,
                                                 "max_new_tokens": 16, "temperature": 0.0})
    ids = TokenIds.from_tokenizer(subject.tokenizer)
    ar = GPT2LMHeadModel(matched_config(subject.run.model, len(subject.tokenizer), 10**5, ids)).eval()
    sizes = dataclasses.replace(SIZES_WORLD, world_people=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        long = long_answer_speed(subject, sizes, ar, fast_method(None, 16, subject.model))["long_answers"]
    finally:
        torch.set_num_threads(threads)
    curve = long["threshold_curve"]
    assert [p["threshold"] for p in curve] == [0.9, *THRESHOLD_CURVE]
    assert curve[0]["cost"] == long["ours_cache"]["cost"]  # the first point is the measured method itself
    assert curve[0]["fact_recall"] == long["ours_cache"]["fact_recall"]
    for point in curve:
        assert all(unit(point[k]) for k in ("fact_recall", "fact_precision", "loop_rate"))
        assert all(point["vs_ar_tokens_per_s"][b] > 0 and point["cost"][b]["forwards_per_token"] > 0
                   for b in ("batch_1", "batch_32"))
    table = "\n".join(threshold_curve_lines(long, ["batch_1", "batch_32"]))
    for point in curve:
        assert f"| {_fmt(point['threshold'])} | {_fmt(point['vs_ar_tokens_per_s']['batch_1'])} |" in table


def test_the_baseline_comparison_lands_beside_the_weights_and_on_the_run_card_once(result, tmp_path):
    from bench.card import BASELINE_FILE, SECTION
    from bench.cli import on_the_card
    from flows.report_card import write_report_card

    model = tmp_path / "run" / "models" / "sft"
    model.mkdir(parents=True)
    card = tmp_path / "run" / "report_card.md"
    card.write_text("# Run report card\n\nheadline\n\n## Stages\n\n| stage |\n")
    base = result["baseline"]
    for _ in range(2):  # a second bench replaces the section
        note = on_the_card(model, base, "dgpt bench --suite baseline")
    assert str(model / BASELINE_FILE) in note and str(card) in note
    text = card.read_text()
    assert text.count(SECTION) == 1 and text.index("headline") < text.index(SECTION) < text.index("## Stages")
    held = base["ours"]["heldout_exact_match"], base["ar"]["heldout_exact_match"]
    row = next(line for line in text.splitlines() if line.startswith("| held-out people"))
    assert [float(c) for c in row.strip("|").split("|")[1:]] == pytest.approx([*held, held[0] - held[1]], abs=1e-3)
    # a card the flow writes later (a cached rerun) shows the same section
    run = load_run_config("ci", WORLD)
    again = write_report_card(tmp_path / "run", run, {"run_name": "x", "status": "completed", "models": {"sft": str(model)}})
    section = text[text.index(SECTION):text.index("## Stages")]
    assert section in again.read_text()


def test_the_baseline_sft_replays_the_pretraining_text_the_diffusion_sft_replays(result, bench):
    import datasets

    sft_rows = len(datasets.load_from_disk(str(bench / "data" / "sft"))["train"])
    stages = result["baseline"]["ar"]["training"]["stages"]
    assert stages["sft"]["rows"] == sft_rows + round(sft_rows * 0.25 / 0.75)
    assert stages["pretrain"]["rows"] == len(datasets.load_from_disk(str(bench / "data" / "pretrain"))["train"])
