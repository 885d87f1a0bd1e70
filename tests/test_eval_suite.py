"""The whole suite on a saved tiny model folder: outputs, reruns, model kinds, CLI, config."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from dgpt_core.config.evaluation import EvalConfig
from dgpt_core.models.export import save_model_folder
from dgpt_core.models.info import ModelInfo, read_model_info
from eval.cli import add_eval_parser, config_from_args, main
from eval.suite import model_kind, run_eval

VOLATILE = {"seconds", "ms_per_sample", "wall_time_s", "commit"}  # timings; HEAD may move mid-test
SMALL = {
    "strategies": ["random", "confidence"], "steps": 2, "steps_grid": [1, 2], "limit": 2, "ppl_t_points": 2,
    "ppl_mask_draws": 1, "mc_num": 2, "chitchat_items": 3, "repetition_prompts": 2, "chat_canvas": 6,
    "plain_canvas": 6, "batch_size": 16, "samples_in_report": 2,
}


def _stable(tree):
    if isinstance(tree, dict):
        return {k: _stable(v) for k, v in tree.items() if k not in VOLATILE}
    if isinstance(tree, list):
        return [_stable(v) for v in tree]
    return tree


@pytest.fixture
def sft_folder(tmp_path, tiny_model, tiny_tokenizer):
    return save_model_folder(tiny_model, tiny_tokenizer, tmp_path / "run" / "sft" / "model")


def test_run_eval_outputs_and_identical_rerun(tmp_path, sft_folder):
    cfg = EvalConfig(**SMALL)
    first = run_eval(sft_folder, tmp_path / "eval1", cfg)
    out = tmp_path / "eval1"
    for name in ("metrics.json", "samples.json", "report.md", "quality_vs_steps.png", "repetition.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ppl_bound", "benchmarks", "repetition", "meta"} <= set(metrics)
    ppl = metrics["ppl_bound"]
    assert {"value", "stderr", "n_tokens", "dataset"} <= set(ppl) and ppl["value"] > 1
    assert {"value", "stderr", "n_tokens", "dataset"} <= set(ppl["conditional"])  # SFT: answers | prompts
    bench = metrics["benchmarks"]
    assert set(bench["dgpt_skills"]) == {"random", "confidence"}
    assert 0 <= bench["dgpt_skills"]["confidence"]["exact_match"] <= 1
    assert bench["dgpt_skills_steps"]["random"]["steps"] == [1.0, 2.0]
    assert {"acc", "acc_norm"} <= set(bench["dgpt_chitchat_mc"])
    assert "bits_per_byte" in bench["dgpt_heldout_text"]
    assert set(metrics["repetition"]) == {"random", "confidence"}
    assert set(metrics["repetition_by_mode"]) == {"chat", "plain"}
    for key in ("distinct_1", "distinct_2", "distinct_3", "rep_4", "unigram_entropy", "loop_rate",
                "mean_length", "stop_rate", "nfe", "seconds"):
        assert key in metrics["repetition"]["random"], key
    meta = metrics["meta"]
    assert meta["model"]["kind"] == "sft" and meta["seed"] == 0 and meta["commit"]
    assert meta["settings"]["strategies"] == ["random", "confidence"] and meta["wall_time_s"] > 0
    report = (out / "report.md").read_text()
    assert "Strategy comparison: chat generation" in report and "| metric | random | confidence |" in report
    assert "Sample generations" in report

    again = run_eval(sft_folder, tmp_path / "eval2", cfg)
    assert _stable(again) == _stable(first)


@pytest.mark.parametrize("kind", ["untrained", "pretrain"])
def test_kind_comes_from_the_folder_metadata_not_its_path(tmp_path, tiny_model, tiny_tokenizer, kind):
    # the flow saves to stages/<stage>-<hash>/model: no path part says what the model is
    folder = save_model_folder(tiny_model, tiny_tokenizer, tmp_path / f"{kind}-0123abcd" / "model",
                               info=ModelInfo(kind, schedule="cosine"))
    info = read_model_info(folder)
    assert model_kind(info, EvalConfig()) == kind
    assert model_kind(info, EvalConfig(model_kind="sft")) == "sft"
    assert model_kind(None, EvalConfig()) == "sft"
    cfg = EvalConfig(**{**SMALL, "tasks": ["ppl", "repetition"], "plots": False})
    metrics = run_eval(folder, tmp_path / "eval", cfg)
    assert metrics["meta"]["model"]["kind"] == kind and metrics["meta"]["schedule"] == "cosine"
    assert "conditional" not in metrics["ppl_bound"]
    assert set(metrics["repetition_by_mode"]) == {"plain"} and metrics["benchmarks"] == {}
    assert metrics["repetition"] == metrics["repetition_by_mode"]["plain"]


def test_standard_task_fails_fast_offline(tmp_path, sft_folder, capsys):
    from flows.cli import SUBCOMMANDS
    from flows.cli import main as dgpt_main

    args = [str(sft_folder), "--out", str(tmp_path / "e"), "--tasks", "hellaswag", "dgpt_skills"]
    for entry in ([main] + ([lambda a: dgpt_main(["eval", *a])] if "eval" in SUBCOMMANDS else [])):
        start = time.perf_counter()
        assert entry(args) == 2 and time.perf_counter() - start < 5
        err = capsys.readouterr().err
        assert "hellaswag" in err and "Hub" in err
    with pytest.raises(RuntimeError, match="arc_easy"):
        run_eval(sft_folder, tmp_path / "e2", EvalConfig(tasks=["arc_easy"]))


def test_cli_flags_build_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    yaml_path = EvalConfig(steps=7, mc_num=3).save_yaml(tmp_path / "eval.yaml")
    args = parser.parse_args(["eval", "m", "--config", str(yaml_path), "--tasks", "ppl", "--strategies", "random",
                              "--limit", "5", "--steps-grid", "--no-plots"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.mc_num, cfg.tasks, cfg.strategies, cfg.limit) == (7, 3, ["ppl"], ["random"], 5)
    assert cfg.steps_grid == [] and cfg.plots is False


def test_config_fields_documented_and_validated():
    for name, field in EvalConfig.model_fields.items():
        assert field.description, f"EvalConfig.{name} has no docstring"
    with pytest.raises(ValueError):
        EvalConfig(strategies=["greedy"])
    with pytest.raises(ValueError):
        EvalConfig(unknown_key=1)
    assert EvalConfig(tasks=["ppl", "gsm8k"]).standard_tasks() == ["gsm8k"]
