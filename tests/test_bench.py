"""`dgpt bench` on the ci preset (random weights, shrunk sizes): every documented key is written.
No timing assertions: the numbers depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import run_bench
from flows.cli import build_parser

SMALL = {"reps": 1, "train_vocabs": (1024,), "overhead_vocabs": (1024,), "lengths": (64,), "length_block": 32,
         "skills_per_skill": 1, "baseline_budget": 0.25, "ppl_sequences": 2}
METHOD_KEYS = {"setting", "method", "nfe", "tokens_per_s", "exact_match", "loop_rate"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run_bench(out, preset="ci", overrides=SMALL, command="pytest")
    return out


def test_every_key_is_written(bench):
    result = json.loads((bench / "bench.json").read_text())
    train = result["train"]
    assert {"diffusion_vs_mlm_throughput", "collator_share", "by_vocab"} <= set(train)
    assert set(train["by_vocab"]) == {"512", "1024"}  # the ci tokenizer's vocabulary, and the extra one
    sample = result["sample"]
    assert {"1024"} == set(sample["overhead_share"])
    assert {"ancestral", "confidence", "threshold", "threshold_block", "threshold_block_cache"} == set(sample["methods"])
    assert all(METHOD_KEYS <= set(m) for m in sample["methods"].values())
    for key in ("nfe_speedup", "nfe_speedup_cap", "tokens_per_s_speedup", "best_fast", "reference"):
        assert key in sample
    length = sample["length"]
    assert len(length["full_s"]) == len(length["block_s"]) == len(length["block_cache_s"]) == 1
    for model in ("ar", "ours"):
        assert {"ppl", "answer_ppl", "exact_match", "tokens_per_s", "nfe", "parameters"} <= set(result["baseline"][model])
    ar = result["baseline"]["ar"]
    assert abs(ar["parameters"] - result["baseline"]["ours"]["parameters"]) / ar["parameters"] < 0.02
    assert set(ar["training"]["stages"]) == {"pretrain", "sft"}


def test_report_and_plots_are_written(bench):
    text = (bench / "bench.md").read_text()
    for heading in ("## Targets", "## Training step", "## Decoding methods", "## Autoregressive baseline"):
        assert heading in text
    assert (bench / "methods.png").stat().st_size > 0 and (bench / "lengths.png").stat().st_size > 0


def test_bench_subcommand_is_registered():
    args = build_parser(["bench"]).parse_args(["bench", "--suite", "sample", "--preset", "ci", "--out", "x"])
    assert args.suite == "sample" and args.preset == "ci" and callable(args.func)


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
    """The prepared GPU script's every code path (ZeRO-2 step, MFU, sampler settings) at tiny sizes on the CPU."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "bench.gpu", str(tmp_path), "--smoke"], check=True,
                   cwd=root, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert {"deepspeed_zero2", "mfu", "tokens_per_s", "peak_memory_gib", "collator_share", "profile"} <= set(result["train"])
    assert "aten::mm" in (tmp_path / result["train"]["profile"]["table"]).read_text()
    for name in ("confidence", "threshold", "threshold_block64", "threshold_block64_cache"):
        assert result["sample"][name]["nfe"] >= 1 and result["sample"][name]["tokens_per_s"] > 0
