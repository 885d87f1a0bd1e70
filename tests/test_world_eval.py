"""The synthetic world in the eval suite: the dgpt_world lm-eval tasks, storage, fact-scored
repetition, report and summary lines, on a tiny untrained model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from dgpt_core.config import FOLDER_CONFIG_NAME, ModelConfig, RunConfig, WorldConfig
from dgpt_core.config.evaluation import EvalConfig
from dgpt_core.data import world
from dgpt_core.models.backbone import build_model
from dgpt_core.models.export import save_model_folder
from dgpt_core.models.info import ModelInfo
from dgpt_core.models.tokenizer import train_bpe_tokenizer
from eval import benchmarks as bm
from eval import world as evworld
from eval.answers import accuracy, read_wide_tables
from eval.cli import summary
from eval.strategy_comparison import compare_strategies
from eval.suite import run_eval

WORLD = WorldConfig(people=12)
WORLD_DATA = {"world": WORLD.model_dump(), "pretrain": {"sources": [{"name": "world"}]},
              "sft": {"sources": [{"name": "world"}]}}
SMALL = {
    "strategies": ["random", "confidence"], "steps": 2, "steps_grid": [1, 2], "limit": 2, "repetition_prompts": 2,
    "plain_canvas": 6, "long_answer_canvas": 8, "batch_size": 64, "samples_in_report": 2,
    "tasks": ["storage", "dgpt_world", "repetition"],
}


@pytest.fixture(scope="module")
def world_tokenizer():
    return train_bpe_tokenizer(world.pretraining_text(WORLD), 400)


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory, world_tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=128)
    folder = save_model_folder(build_model(cfg, world_tokenizer), world_tokenizer,
                               tmp_path_factory.mktemp("run") / "model", info=ModelInfo("pretrain"))
    RunConfig.model_validate({"data": WORLD_DATA}).save_yaml(folder / FOLDER_CONFIG_NAME)
    return folder


def _leaves(task_dict):
    for value in task_dict.values():
        yield from (_leaves(value) if isinstance(value, dict) else [value])


def test_world_tasks_load_and_score(tmp_path, world_tokenizer):
    from lm_eval.tasks import get_task_dict

    rows = evworld.task_rows(WORLD, world_tokenizer, "sft", seed=0)
    pairs = world.test_pairs(WORLD)
    tm = bm.local_task_manager(bm.write_task_data(tmp_path, world=rows))
    assert evworld.tasks_of(rows) == [evworld.TASKS[s] for s in ("heldout", "train", "reversal", "bio")]
    assert evworld.long_answer_tasks(evworld.tasks_of(rows)) == ["dgpt_world_bio"]
    tasks = {t.config.task: t for t in _leaves(get_task_dict(["dgpt_world"], tm))}
    assert set(tasks) == set(evworld.TASKS.values())
    for test_set, name in evworld.TASKS.items():
        task = tasks[name]
        docs = list(task.test_docs())
        assert len(docs) == len(pairs[test_set]) > 0, name
        want = 64 if test_set == "bio" else 24
        assert task.config.generation_kwargs["max_gen_toks"] == want
        doc = docs[0]
        assert doc["context"].endswith("assistant\n") and doc["values"]
        right, wrong = task.process_results(doc, [f" {doc['answer']} "]), task.process_results(doc, ["Nobody"])
        assert right["exact_match"] == 1.0 and wrong["exact_match"] == 0.0
        if test_set == "bio":
            assert right["fact_precision"] == right["fact_recall"] == 1.0
            other = task.process_results(doc, [doc["answers"][-1]])  # another true biography
            assert other["exact_match"] == 1.0 and other["fact_precision"] == 1.0
            assert wrong["fact_recall"] == 0.0


def test_summary_and_prompts(world_tokenizer):
    flat = {"dgpt_world_heldout": {"exact_match": 0.5, "n": 4.0}, "dgpt_world_train": {"exact_match": 1.0, "n": 2.0},
            "dgpt_world_bio": {"exact_match": 0.0, "fact_precision": 0.75, "fact_recall": 0.5, "n": 1.0}}
    row = evworld.summary(flat)
    assert row == {"heldout": 0.5, "n_heldout": 4.0, "train": 1.0, "n_train": 2.0, "n_reversal": 0.0,
                   "bio_fact_precision": 0.75, "bio_fact_recall": 0.5, "bio_exact_match": 0.0, "n_bio": 1.0}
    prompts, people = evworld.plain_prompts(WORLD, world_tokenizer, 3)
    assert len(prompts) == len(people) == 3
    assert all(world.person_split(p, WORLD) == "heldout" for p in people)
    eos = world_tokenizer.convert_tokens_to_ids(world_tokenizer.eos_token)
    text = world_tokenizer.decode(prompts[0][1:])
    assert prompts[0][0] == eos and text.startswith(" ") and text.endswith(".") and people[0].name in text
    assert text.count(".") == 1
    chat, who = evworld.chat_prompts(WORLD, world_tokenizer, 2, 1000)
    assert len(chat) == 2 and who[0].name in world_tokenizer.decode(chat[0])
    score = evworld.fact_scorer(people)
    bio = world.biographies(people[0], WORLD)[0]
    assert score(0, bio) == {"fact_precision": 1.0, "fact_recall": 1.0}


def test_compare_strategies_averages_the_scorer(world_folder, world_tokenizer):
    from transformers import ModernBertForMaskedLM

    from dgpt_core.generation.sampler import SamplerConfig

    model = ModernBertForMaskedLM.from_pretrained(str(world_folder)).eval()
    prompts, _ = evworld.plain_prompts(WORLD, world_tokenizer, 2)
    cfg = SamplerConfig(steps=2, max_new_tokens=4, temperature=0.0)
    calls = []

    def score(i, text):
        calls.append(i)
        return {"fact_precision": float(i), "fact_recall": 1.0}

    rows, _ = compare_strategies(model, world_tokenizer, prompts, ["random"], cfg, batch_size=8, score=score)
    assert calls == [0, 1] and rows["random"]["fact_precision"] == 0.5 and rows["random"]["fact_recall"] == 1.0
    plain, _ = compare_strategies(model, world_tokenizer, prompts, ["random"], cfg, batch_size=8)
    assert "fact_precision" not in plain["random"]


def test_run_eval_with_the_world(tmp_path, world_folder):
    metrics = run_eval(world_folder, tmp_path / "sft", EvalConfig(**SMALL, model_kind="sft"))
    storage = metrics["storage"]
    assert storage["n"] == 12 * len(WORLD.attributes) and 0 <= storage["cloze_accuracy"] <= 1
    assert set(storage["per_attribute"]) == set(WORLD.attributes)
    per_strategy = metrics["benchmarks"]["dgpt_world"]
    assert set(per_strategy) == {"random", "confidence"}
    row = per_strategy["confidence"]
    for key in ("heldout", "train", "reversal", "bio_fact_precision", "bio_fact_recall", "bio_exact_match",
                "steps", "nfe", "seconds", "stop_rate"):
        assert key in row, key
    assert row["n_heldout"] == row["n_train"] == row["n_reversal"] == row["n_bio"] == 2
    sweep = metrics["benchmarks"]["dgpt_world_steps"]["random"]
    assert sweep["steps"] == [1.0, 2.0] and len(sweep["exact_match"]) == 2
    assert set(metrics["repetition_by_mode"]) == {"chat", "plain"}
    for mode in ("chat", "plain"):
        for strategy in ("random", "confidence"):
            got = metrics["repetition_by_mode"][mode][strategy]
            assert 0 <= got["fact_precision"] <= 1 and 0 <= got["fact_recall"] <= 1 and got["n_samples"] == 2
    report = (tmp_path / "sft" / "report.md").read_text()
    assert "## World" in report and "Storage" in report and "dgpt_world" in report and "| fact_precision |" in report
    assert (tmp_path / "sft" / "world_quality_vs_steps.png").exists()
    assert "Other lm-eval tasks" not in report
    lines = summary(metrics)
    assert "storage cloze" in lines and "world held-out exact match [random]" in lines
    assert json.loads((tmp_path / "sft" / "metrics.json").read_text())["storage"]["n"] == storage["n"]
    check_answer_tables(tmp_path / "sft", metrics)

    pre = run_eval(world_folder, tmp_path / "pre", EvalConfig(**{**SMALL, "plots": False}))  # the folder's kind
    assert pre["meta"]["model"]["kind"] == "pretrain"
    assert set(read_wide_tables(tmp_path / "pre")) == {"storage"}
    assert "storage" in pre and pre["benchmarks"] == {} and set(pre["repetition_by_mode"]) == {"plain"}
    assert "fact_precision" in pre["repetition"]["random"]
    assert any("dgpt_world: SFT models only" in n for n in pre["meta"]["notes"])



def check_answer_tables(out_dir, metrics):
    """The per-question frames hold every scored question, agree with the metrics lm-eval and the
    storage probe reported, and the report's answer tables are their first rows."""
    answers = pd.read_parquet(out_dir / "answers.parquet")
    storage = answers[answers["group"] == "storage"]
    assert len(storage) == metrics["storage"]["n"]
    assert storage["correct"].mean() == pytest.approx(metrics["storage"]["cloze_accuracy"])
    world_rows = answers[answers["group"] == "dgpt_world"]
    acc = accuracy(world_rows).set_index(["task", "method", "steps"])["correct"]
    for strategy, row in metrics["benchmarks"]["dgpt_world"].items():
        for test_set in ("heldout", "train", "reversal"):
            assert acc[(evworld.TASKS[test_set], strategy, SMALL["steps"])] == pytest.approx(row[test_set])
        bio = world_rows[(world_rows["task"] == evworld.TASKS["bio"]) & (world_rows["method"] == strategy)]
        assert bio["fact_recall"].mean() == pytest.approx(row["bio_fact_recall"])
    for strategy, curve in metrics["benchmarks"]["dgpt_world_steps"].items():
        for steps, exact in zip(curve["steps"], curve["exact_match"]):
            assert acc[(evworld.TASKS["heldout"], strategy, int(steps))] == pytest.approx(exact)
    wide = read_wide_tables(out_dir)["dgpt_world"]
    assert len(wide) == 4 * SMALL["limit"]
    assert {"answer [random]", "correct [random]", "answer [confidence]", "fact_recall [confidence]"} <= set(wide)
    report = (out_dir / "report.md").read_text()
    assert "## Answers: dgpt_world" in report and wide.iloc[0]["prompt"] in report

def test_no_world_source_skips_with_notes(tmp_path, tiny_model, tiny_tokenizer):
    folder = save_model_folder(tiny_model, tiny_tokenizer, tmp_path / "model", info=ModelInfo("sft"))
    cfg = EvalConfig(**{**SMALL, "chat_canvas": 6, "plots": False})
    metrics = run_eval(folder, tmp_path / "eval", cfg)
    assert "storage" not in metrics and metrics["benchmarks"] == {}
    notes = metrics["meta"]["notes"]
    assert any(n.startswith("storage: the run's data has no world source") for n in notes)
    assert any(n.startswith("dgpt_world: the run's data has no world source") for n in notes)
    assert set(metrics["repetition_by_mode"]) == {"chat", "plain"}
    assert "fact_precision" not in metrics["repetition"]["random"]
    assert "## World" not in (tmp_path / "eval" / "report.md").read_text()
