"""`dgpt bench` on the ci preset (random weights, shrunk sizes): the numbers it writes are finite,
positive, and consistent with each other and with what they are computed from; bench.md shows
bench.json's numbers. No assertion compares timings against a target: they depend on the machine.

With one repetition (reps=1) every median is the one measurement, so each ratio the suites report
must equal the ratio of the throughputs they report beside it."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import fast_method, run_bench
from bench.common import SIZES
from bench.report import TARGETS
from bench.sample import EB_GAMMAS, STEP_METHODS, method_settings
from dgpt_core.config import load_run_config
from dgpt_core.generation.sampler import SamplerConfig
from eval.report import _fmt

SMALL = {"reps": 1, "train_vocabs": (1024,), "overhead_vocabs": (1024,), "lengths": (32,), "length_block": 16,
         "skills_per_skill": 1, "baseline_budget": 0.1, "ppl_sequences": 2}
METHODS = ("ancestral", "confidence", "margin", "entropy", "confidence+guard", "threshold", "eb", "threshold_block",
           "threshold_block_cache")
SUITES = ("train", "sample", "repetition", "baseline")
"""Every suite but `compile` (tests/test_bench_compile.py: a real compile takes half a minute)."""


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run_bench(out, suites=SUITES, preset="ci", overrides=SMALL, command="pytest")
    return out


@pytest.fixture(scope="module")
def result(bench):
    return json.loads((bench / "bench.json").read_text())


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_meta_records_the_sizes_and_the_suites_it_ran(result):
    meta = result["meta"]
    assert meta["preset"] == "ci" and meta["command"] == "pytest" and meta["threads"] >= 1
    want = dataclasses.asdict(dataclasses.replace(SIZES["ci"], **SMALL))
    assert meta["sizes"] == json.loads(json.dumps(want))  # tuples are JSON lists
    assert set(meta["seconds"]) == {*SUITES, "this_run"}
    assert all(positive(s) for k, s in meta["seconds"].items() if "skipped" not in result.get(k, {}))
    assert result["repetition"] == {"skipped": "the run's SFT data is not the synthetic world (no held-out people)"}
    assert meta["seconds"]["this_run"] >= sum(meta["seconds"][k] for k in SUITES) - 0.3


def test_training_step_numbers_are_positive_and_consistent(result):
    train, run = result["train"], load_run_config("ci")
    assert set(train["by_vocab"]) == {str(run.tokenizer.vocab_size), "1024"}  # the model's own, and the extra one
    for vocab, row in train["by_vocab"].items():
        assert row["vocab_size"] == int(vocab)
        assert (row["batch"], row["seq_len"]) == (run.pretrain.per_device_batch_size, run.model.max_seq_len)
        assert positive(row["mlm_tokens_per_s"])
        kinds = ("masking", "edit")  # the ci preset's pretraining has an edit stage (edit_start < 1)
        for kind in kinds:
            stage = row[kind]
            assert positive(stage["diffusion_tokens_per_s"]) and positive(stage["diffusion_vs_mlm_throughput"])
            assert stage["diffusion_vs_mlm_throughput"] == pytest.approx(
                stage["diffusion_tokens_per_s"] / row["mlm_tokens_per_s"], rel=1e-9)
            assert 0 < stage["collator_share"] < 1
        # the headline figures are the worse stage's
        worst = min(kinds, key=lambda k: row[k]["diffusion_vs_mlm_throughput"])
        assert row["worst_stage"] == worst
        assert row["diffusion_vs_mlm_throughput"] == row[worst]["diffusion_vs_mlm_throughput"]
        assert row["collator_share"] == max(row[k]["collator_share"] for k in kinds)
    own = train["by_vocab"][str(run.tokenizer.vocab_size)]
    assert (train["diffusion_vs_mlm_throughput"], train["collator_share"]) == (own["diffusion_vs_mlm_throughput"],
                                                                              own["collator_share"])


def test_decoding_methods_numbers_and_nfe_relations(result):
    sample = result["sample"]
    canvas, sweep = sample["canvas"], sample["sweep"]
    run = load_run_config("ci")
    assert sample["workload"] == "skills" and sample["quality_keys"] == ["exact_match"]  # not the world
    assert canvas == (run.eval.skills_canvas or 24)
    assert sample["items"] == SMALL["skills_per_skill"] * len(run.data.skills.skills)
    steps = sorted({canvas // 4, canvas // 2, canvas})
    assert set(sweep) == {f"{m}@{s}" for m in STEP_METHODS for s in steps} | {
        "threshold@0.5", "threshold@0.9", "threshold_block@0.9", "threshold_block_cache@0.9"} | {
        f"eb@{g}" for g in EB_GAMMAS}
    for name, point in sweep.items():
        assert name.split("@")[0] == point["method"]
        assert 0 <= point["exact_match"] <= 1 and 0 <= point["loop_rate"] <= 1 and 0 <= point["rep_4"] <= 1
        assert positive(point["tokens_per_s"])
        # a row takes part in at most every forward of its call, and in at least one
        assert 1 <= point["nfe_per_prompt"] <= point["nfe"] <= canvas
    for s in steps:  # fixed-step strategies: exactly `steps` forwards, every row in each
        for method in ("ancestral", "confidence", "margin", "entropy", "confidence+guard"):
            assert sweep[f"{method}@{s}"]["nfe"] == sweep[f"{method}@{s}"]["nfe_per_prompt"] == s
    # each method row is its chosen sweep point
    assert set(sample["methods"]) == set(METHODS)
    for method, row in sample["methods"].items():
        assert row == {"setting": row["setting"], **sweep[row["setting"]]} and row["method"] == method
    # the reference is the best ancestral point (exact match, then fewest forwards)
    ancestral = [n for n in sweep if n.startswith("ancestral@")]
    ref = sweep[sample["reference"]]
    assert sample["reference"] == max(ancestral, key=lambda n: (sweep[n]["exact_match"], -sweep[n]["nfe"]))
    # the best fast point: the fastest that keeps the reference's quality, when one does
    fast = [n for n in sweep if not n.startswith("ancestral@")]
    qualified = [n for n in fast if sweep[n]["exact_match"] >= ref["exact_match"] - 0.01
                 and sweep[n]["loop_rate"] <= ref["loop_rate"]]
    assert sample["best_fast_within_quality"] == bool(qualified)
    if qualified:
        assert sample["best_fast"] == max(qualified, key=lambda n: sweep[n]["tokens_per_s"])
    best = sweep[sample["best_fast"]]
    # the speedups are the ratios of the numbers beside them
    assert sample["nfe_speedup"] == pytest.approx(ref["nfe_per_prompt"] / best["nfe_per_prompt"])
    assert sample["nfe_per_call_speedup"] == pytest.approx(ref["nfe"] / best["nfe"])
    assert sample["nfe_speedup_cap"] == ref["nfe_per_prompt"] >= sample["nfe_speedup"]
    assert sample["tokens_per_s_speedup"] == pytest.approx(best["tokens_per_s"] / ref["tokens_per_s"], rel=1e-9)


def test_sampler_overhead_and_length_numbers(result):
    sample = result["sample"]
    assert set(sample["overhead_share"]) == set(sample["overhead_by_strategy"]) == {"1024"}
    for vocab, shares in sample["overhead_by_strategy"].items():
        assert set(shares) == {"random", "confidence", "threshold", "confidence_greedy"}
        assert all(math.isfinite(s) and s > -1 for s in shares.values())  # sampler time > 0
        assert sample["overhead_share"][vocab] == max(shares.values())
    length = sample["length"]
    assert length["lengths"] == list(SMALL["lengths"]) and length["block_size"] == SMALL["length_block"]
    for key in ("full_s", "block_s", "block_cache_s", "block_vs_full_time", "block_cache_vs_full_time"):
        assert len(length[key]) == len(SMALL["lengths"]) and all(positive(v) for v in length[key])


def test_baseline_numbers(result):
    base, run = result["baseline"], load_run_config("ci")
    canvas = result["sample"]["canvas"]
    ar, ours = base["ar"], base["ours"]
    assert base["workload"] == "skills" and "world_items" not in base and "reversal_ours_minus_ar" not in base
    for model in (ar, ours):  # short answers: quality and perplexities
        assert math.isfinite(model["ppl"]) and model["ppl"] >= 1  # exp of a mean negative log-likelihood
        assert math.isfinite(model["answer_ppl"]) and model["answer_ppl"] >= 1
        assert 0 <= model["exact_match"] <= 1 and 0 <= model["loop_rate"] <= 1
        assert 1 <= model["nfe"] <= canvas
    assert "prefix cache" not in ours["method"] and "prefix cache" in base["ours_cache"]["method"]
    # long answers (without the world: the skills items again) at batch 1 (at most 8 items) and 32
    long = base["long_answers"]
    items = SMALL["skills_per_skill"] * len(run.data.skills.skills)
    assert (long["workload"], long["canvas"], long["method"]) == ("skills", canvas, ours["method"])
    assert long["items"] == {"batch_1": min(8, items), "batch_32": items}
    for model in ("ar", "ours", "ours_cache"):
        row = long[model]
        assert 0 <= row["exact_match"] <= 1 and 0 <= row["loop_rate"] <= 1 and 1 <= row["nfe"] <= canvas
        assert all(positive(row["cost"][b]["token_forwards_per_answer"]) and positive(row["cost"][b]["forwards_per_token"])
                   for b in ("batch_1", "batch_32"))
    # a KV-cached causal LM alone: one forward per generated token; a batch keeps decoding finished rows
    assert long["ar"]["cost"]["batch_1"]["forwards_per_token"] == 1
    assert long["ar"]["cost"]["batch_32"]["forwards_per_token"] >= 1
    assert long["block_size"] is None and long["threshold_curve"] == []  # the curve is the exact cache's
    # tokens/s per batch; with one repetition each ratio is the ratio of the throughputs beside it
    for batch in ("batch_1", "batch_32"):
        speeds = {m: base[m]["tokens_per_s"][batch] for m in ("ar", "ours", "ours_cache")}
        assert all(positive(v) for v in speeds.values())
        assert base["ours_vs_ar_tokens_per_s"][batch] == pytest.approx(speeds["ours"] / speeds["ar"], rel=1e-9)
        assert base["ours_cache_vs_ar_tokens_per_s"][batch] == pytest.approx(speeds["ours_cache"] / speeds["ar"],
                                                                             rel=1e-9)
    # the AR model has our parameter count (within 2 %), and trained the budgeted steps of each stage
    assert ar["training"]["diffusion_parameters"] == ours["parameters"]
    assert abs(ar["parameters"] - ours["parameters"]) / ours["parameters"] < 0.02
    for stage, info in ar["training"]["stages"].items():
        cfg = getattr(run, stage)
        assert info["steps"] == max(1, round(cfg.max_steps * SMALL["baseline_budget"]))
        assert info["batch"] == cfg.per_device_batch_size
        assert positive(info["tokens"]) and positive(info["seconds"]) and positive(info["loss"])
    assert set(ar["training"]["stages"]) == {"pretrain", "sft"}


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for every markdown table row (later tables win on a clash)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_the_report_shows_the_json_numbers(bench, result):
    text = (bench / "bench.md").read_text()
    rows = _table_rows(text)
    sample, train, base = result["sample"], result["train"], result["baseline"]
    # targets: measured value and met flag
    met = sample["best_fast_within_quality"] and sample["nfe_speedup"] >= TARGETS["decoding_nfe_speedup"]
    assert rows["decoding NFE speedup (quality kept)"] == [_fmt(sample["nfe_speedup"]), ">= 3", str(met)]
    for vocab, share in sample["overhead_share"].items():
        assert rows[f"sampler overhead share, vocab {vocab}"] == [_fmt(share), "< 0.15", str(share < 0.15)]
    for vocab, row in train["by_vocab"].items():
        ratio = row["diffusion_vs_mlm_throughput"]
        assert rows[f"diffusion / MLM step throughput, vocab {vocab}"] == [_fmt(ratio), ">= 0.97", str(ratio >= 0.97)]
    # decoding methods and the sweep
    for method, row in sample["methods"].items():
        assert rows[method] == [row["setting"], *(_fmt(row[k]) for k in ("nfe", "nfe_per_prompt", "tokens_per_s",
                                                                          "exact_match", "loop_rate", "rep_4"))]
    for name, point in sample["sweep"].items():
        assert rows[name] == [_fmt(point[k]) for k in ("nfe", "nfe_per_prompt", "tokens_per_s", "exact_match",
                                                       "loop_rate", "rep_4")]
    assert f"reference `{sample['reference']}`, best fast setting `{sample['best_fast']}`" in text
    assert f"NFE x{sample['nfe_speedup']:.2f}, tokens/s x{sample['tokens_per_s_speedup']:.2f}" in text
    # the baseline: long-answer speeds per batch, ratios over AR, and the long answers' quality
    batches = ("batch_1", "batch_32")
    long = base["long_answers"]
    for model in ("ar", "ours", "ours_cache"):
        assert rows[model][1:] == [*(_fmt(base[model]["tokens_per_s"][b]) for b in batches),
                                   *(_fmt(long[model][k]) for k in ("exact_match", "loop_rate", "nfe"))]
    for model in ("ours", "ours_cache"):
        assert rows[f"{model} / ar tokens/s"] == [_fmt(base[f"{model}_vs_ar_tokens_per_s"][b]) for b in batches]
    for batch, target in (("batch_1", "1"), ("batch_32", "0.5")):
        best = max(base["ours_vs_ar_tokens_per_s"][batch], base["ours_cache_vs_ar_tokens_per_s"][batch])
        assert rows[f"long answers, ours (best of with and without prefix cache) / AR tokens/s, "
                    f"{batch.replace('_', ' ')}"] == [_fmt(best), f">= {target}", str(best >= float(target))]
    for model in ("ar", "ours", "ours_cache"):
        assert rows[f"{model} forwards"] == [_fmt(long[model]["cost"][b][c]) for b in batches
                                             for c in ("token_forwards_per_answer", "forwards_per_token")]
    assert "## Decoding methods on the skills test items" in text and "## World" not in text
    assert "## Repetition" in text and "Skipped: the run's SFT data is not the synthetic world" in text


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_plots_are_pngs_of_their_figure_size(bench):
    assert _png_size(bench / "methods.png") == (1000, 400)  # 10 x 4 inches at 100 dpi
    assert _png_size(bench / "lengths.png") == (500, 400)


def test_a_single_suite_rerun_keeps_the_other_suites(bench, result, tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.json").write_text(json.dumps(result))
    again = run_bench(out, suites=("train",), preset="ci", data_dir=bench / "data",
                      overrides={**SMALL, "train_vocabs": ()}, plots=False, command="second")
    assert again["sample"] == result["sample"] and again["baseline"] == result["baseline"]
    own = str(load_run_config("ci").tokenizer.vocab_size)
    assert set(again["train"]["by_vocab"]) == {own}  # measured again, with the new sizes
    assert again["meta"]["command"] == "pytest; second"
    assert again["meta"]["seconds"]["sample"] == result["meta"]["seconds"]["sample"]
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(again))
    assert not (out / "methods.png").exists()


def test_causal_nll_is_the_models_own_loss_at_the_trained_positions():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.baseline import causal_nll

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    rows = [[3, 7, 9, 11, 4], [5, 6, 8]]
    total, count = causal_nll(model, rows, [list(range(len(r))) for r in rows])
    with torch.no_grad():
        want = sum(float(model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss) * (len(r) - 1)
                   for r in rows)
    assert count == 4 + 2  # position 0 has no context and is not scored
    assert abs(total - want) < 1e-4
    answer_total, answer_count = causal_nll(model, rows[:1], [[3, 4]])
    with torch.no_grad():
        logp = model(input_ids=torch.tensor(rows[:1])).logits[0, :-1].log_softmax(-1)
    assert answer_count == 2
    assert abs(answer_total - float(-(logp[2, 11] + logp[3, 4]))) < 1e-5


def test_gpu_benchmark_script_smoke(tmp_path):
    """The prepared GPU script's every code path (ZeRO-2 step, MFU, sampler settings) at tiny sizes on
    the CPU; its derived numbers follow from its measured ones."""
    from bench.gpu import SMOKE

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "bench.gpu", str(tmp_path), "--smoke"], check=True,
                   cwd=root, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    train = result["train"]
    assert result["smoke"] is True and result["size"] == SMOKE and result["peak_tflops"] is None
    assert train["deepspeed_zero2"] is True and (train["batch"], train["seq_len"]) == (SMOKE["batch"], SMOKE["seq"])
    assert positive(train["step_s_median"]) and positive(train["parameters"]) and 0 < train["collator_share"] < 1
    assert train["tokens_per_s"] == pytest.approx(SMOKE["batch"] * SMOKE["seq"] / train["step_s_median"])
    assert train["achieved_tflops"] == pytest.approx(train["model_tflops_per_step"] / train["step_s_median"])
    assert train["mfu"] is None and train["peak_memory_gib"] is None  # no GPU peak on the CPU
    assert train["profile"]["steps"] == 3 and positive(train["profile"]["wall_s"])
    assert "aten::mm" in (tmp_path / train["profile"]["table"]).read_text()
    sample = result["sample"]
    caps = {"confidence": SMOKE["canvas"] // 4, "threshold": SMOKE["canvas"] // 4,
            "threshold_block64": 16, "threshold_block64_cache": 16}
    for name, cap in caps.items():
        row = sample[name]
        assert 1 <= row["nfe"] <= cap and positive(row["seconds"])
        assert row["tokens_per_s"] == pytest.approx(SMOKE["sample_batch"] * SMOKE["canvas"] / row["seconds"])
        assert row["ms_per_step"] == pytest.approx(1000 * row["seconds"] / row["nfe"])
    assert sample["confidence"]["nfe"] == SMOKE["canvas"] // 4  # fixed steps: exactly that many forwards


def test_a_block_model_is_benchmarked_with_its_own_block_size_and_defaults(tiny_model):
    from dgpt_core.generation.options import DEFAULTS_KEY, INFO_KEY

    blocks = {name: cfg.block_size for name, (_, cfg) in method_settings(64, (0.9,), block=8).items() if cfg.block_size}
    assert blocks == {"threshold_block@0.9": 8, "threshold_block_cache@0.9": 8}
    assert method_settings(64, (0.9,))["threshold_block@0.9"][1].block_size == 32
    defaults = {"strategy": "threshold", "steps": 8, "max_new_tokens": 64, "temperature": 0.0}
    setattr(tiny_model.config, DEFAULTS_KEY, defaults)
    assert fast_method(None, 64, tiny_model).strategy == "threshold" and fast_method(None, 64, tiny_model).steps == 64
    setattr(tiny_model.config, INFO_KEY, {"kind": "sft", "block_size": 8})
    assert dataclasses.asdict(fast_method(None, 64, tiny_model)) == dataclasses.asdict(SamplerConfig(**defaults))
