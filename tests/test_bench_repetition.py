"""The bench's repetition suite on a tiny world run with random weights (the ci preset switched to a
12-person world, short canvases): every method has a row with its numbers in range at each step
count, the findings follow from the rows, the text workload is skipped without a pretrain model,
the report shows every method, and `find_text_model` finds a pipeline run's pretrain model."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from bench.common import SIZES, load_subject
from bench.repetition import (
    GAP_KEYS,
    METHODS,
    REFERENCE,
    ROW_KEYS,
    SAFE_ORDER,
    find_text_model,
    findings,
    render_repetition,
    repetition_suite,
)
from dgpt_core.config import FOLDER_CONFIG_NAME, load_run_config
from dgpt_core.generation.options import method_options

WORLD = ["data.sft.sources=[{name: world}]", "data.pretrain.sources=[{name: world}]", "data.world.people=12",
         "eval.plain_canvas=16", "eval.long_answer_canvas=20"]
"""The ci preset on the world, with short canvases (text 16 tokens, answers 20)."""
CANVAS = {"text": 16, "answers": 20}
SIZES_SMALL = dataclasses.replace(SIZES["ci"], world_people=2, batch_size=8)
RATES = ("loop_rate", "rep_4", "distinct_2", "stop_rate", "fact_precision", "fact_recall")


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return load_subject(None, "ci", tmp_path_factory.mktemp("bench_repetition"), run_overrides=WORLD)


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits on a busy shared core
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result(subject, single_thread):
    return repetition_suite(subject, SIZES_SMALL, (subject.model, subject.tokenizer))


def test_the_methods_are_decoding_methods():
    for name in METHODS:
        method_options(name)  # ValueError on a misspelt strategy or modifier
    assert REFERENCE in METHODS and set(SAFE_ORDER) <= set(METHODS) and SAFE_ORDER[0] == "confidence"


def test_every_method_has_a_row_per_workload_in_range(result):
    for workload, canvas in CANVAS.items():
        info = result["workloads"][workload]
        assert info["canvas"] == canvas and info["prompts"] == SIZES_SMALL.world_people
        assert info["steps"] == [canvas, canvas // 2, canvas // 4]
        assert list(result[workload]) == list(METHODS)
        for method, row in result[workload].items():
            assert set(row["by_steps"]) == {str(s) for s in info["steps"]}
            assert {k: row[k] for k in ROW_KEYS} == row["by_steps"][str(canvas)]  # top level = full steps
            for steps, numbers in row["by_steps"].items():
                assert set(numbers) == set(ROW_KEYS), method
                assert all(0 <= numbers[k] <= 1 for k in RATES), (workload, method, steps, numbers)
                assert numbers["unigram_entropy"] >= 0 and 0 <= numbers["mean_length"] <= canvas
                assert 1 <= numbers["nfe"] <= int(steps), (workload, method, steps, numbers["nfe"])
            if method == "confidence":  # count-based: exactly the steps asked for
                assert [row["by_steps"][str(s)]["nfe"] for s in info["steps"]] == info["steps"]
    assert result["workloads"]["answers"]["model"] == "random weights, preset ci"


def expected_findings(rows: dict) -> tuple[dict, str | None, str, dict]:
    """The findings recomputed from the rows: (confidence loops more per workload, safe method,
    compared method, its gaps to the reference)."""
    def gap(method: str) -> dict:
        return {w: {k: r[method][k] - r[REFERENCE][k] for k in GAP_KEYS} for w, r in rows.items()}

    def ok(method: str) -> bool:
        return all(r[method]["loop_rate"] <= r[REFERENCE]["loop_rate"]
                   and r[method]["rep_4"] <= r[REFERENCE]["rep_4"]
                   and r[method]["fact_precision"] >= r[REFERENCE]["fact_precision"]
                   and r[method]["mean_length"] >= 0.5 * r[REFERENCE]["mean_length"] for r in rows.values())

    def worst(method: str) -> float:
        return max(max(g["loop_rate"], g["rep_4"], -g["fact_precision"]) for g in gap(method).values())

    loops = {w: r["confidence"]["loop_rate"] > r[REFERENCE]["loop_rate"]
             and r["confidence"]["rep_4"] > r[REFERENCE]["rep_4"] for w, r in rows.items()}
    safe = next((m for m in SAFE_ORDER if ok(m)), None)
    compared = safe or min(SAFE_ORDER, key=worst)
    return loops, safe, compared, gap(compared)


def test_the_findings_follow_from_the_rows(result):
    found = result["findings"]
    loops, safe, compared, gaps = expected_findings({w: result[w] for w in CANVAS})
    assert found["confidence_loops_more"] == loops and set(loops) == set(CANVAS)
    assert found["safe_method"] == safe and found["target_met"] == (safe is not None)
    assert found["compared"] == compared and found["gaps"] == gaps
    assert found["candidates"] == list(SAFE_ORDER) and found["reference"] == REFERENCE


def rows_of(**numbers: tuple[float, float, float]) -> dict:
    """Rows of one workload: (loop rate, rep-4, fact precision) per method, the others as random's;
    every answer 10 tokens long."""
    return {m: {**dict(zip(GAP_KEYS, numbers.get(m.replace("+", "_"), numbers[REFERENCE]))), "mean_length": 10.0}
            for m in METHODS}


def test_the_safe_method_must_be_safe_on_every_workload():
    text = rows_of(random=(0.2, 0.3, 0.5), confidence=(0.6, 0.5, 0.5), confidence_guard=(0.1, 0.1, 0.6),
                   confidence_remdm_conf=(0.2, 0.3, 0.5), confidence_remdm_cap=(0.3, 0.3, 0.5),
                   confidence_guard_remdm_conf=(0.0, 0.0, 0.9), confidence_guard_remdm_cap=(0.9, 0.9, 0.1))
    answers = rows_of(random=(0.1, 0.2, 0.8), confidence=(0.1, 0.4, 0.9), confidence_guard=(0.0, 0.0, 0.7),
                      confidence_remdm_conf=(0.1, 0.2, 0.8), confidence_remdm_cap=(0.1, 0.1, 0.8),
                      confidence_guard_remdm_conf=(0.0, 0.0, 0.8), confidence_guard_remdm_cap=(0.9, 0.9, 0.1))
    found = findings({"text": text, "answers": answers})
    # confidence loops more on text only (on answers its loop rate ties random's); the guard is
    # below random on both but loses fact precision on answers; remdm_conf ties random everywhere
    assert found["confidence_loops_more"] == {"text": True, "answers": False}
    assert found["safe_method"] == "confidence+remdm_conf" and found["target_met"]
    assert found["gaps"] == {"text": {"loop_rate": 0.0, "rep_4": 0.0, "fact_precision": 0.0},
                             "answers": {"loop_rate": 0.0, "rep_4": 0.0, "fact_precision": 0.0}}
    text["confidence+remdm_conf"]["rep_4"] = 0.31  # no longer safe: the next safe one is chosen
    assert findings({"text": text, "answers": answers})["safe_method"] == "confidence+guard+remdm_conf"
    answers["confidence+guard+remdm_conf"]["fact_precision"] = 0.75  # none safe: the closest is compared
    found = findings({"text": text, "answers": answers})
    assert found["safe_method"] is None and not found["target_met"]
    # worst excesses: remdm_conf 0.01 (rep-4 on text), guard+remdm_conf 0.05 (precision), guard 0.1
    assert found["compared"] == "confidence+remdm_conf"
    assert found["gaps"]["text"]["rep_4"] == pytest.approx(0.01)
    assert findings({})["safe_method"] is None and findings({})["gaps"] == {}
    text["confidence+remdm_conf"]["rep_4"] = 0.3
    assert findings({"text": text, "answers": answers})["safe_method"] == "confidence+remdm_conf"
    answers["confidence+remdm_conf"]["mean_length"] = 4.0  # says too little to count as safe
    assert findings({"text": text, "answers": answers})["safe_method"] is None


def test_the_report_shows_every_method_and_the_findings(result):
    text = "\n".join(render_repetition(result))
    assert text.startswith("## Repetition")
    for workload in CANVAS:
        info = result["workloads"][workload]
        section = text[text.index(f"{info['prompts']} prompts, canvas {CANVAS[workload]}"):]
        for method in METHODS:
            assert f"| {method} |" in section
    assert text.count("| method | loop rate | rep-4 | distinct-2 | fact precision | fact recall |") == 2
    assert text.count("| method | 16 steps | 8 steps | 4 steps |") == 1
    assert text.count("| method | 20 steps | 10 steps | 5 steps |") == 1
    found = result["findings"]
    assert "Safe method (" in text
    assert f": {found['safe_method'] or 'none'} (target met: {found['target_met']})" in text


def test_without_a_pretrain_model_only_the_answers_run(subject, single_thread):
    one = dataclasses.replace(SIZES_SMALL, world_people=1)
    result = repetition_suite(subject, one, None)
    assert "text" not in result and "skipped" in result["workloads"]["text"]
    assert list(result["answers"]) == list(METHODS) and result["workloads"]["answers"]["prompts"] == 1
    loops, safe, compared, gaps = expected_findings({"answers": result["answers"]})
    assert result["findings"]["confidence_loops_more"] == loops and set(loops) == {"answers"}
    assert result["findings"]["safe_method"] == safe and result["findings"]["gaps"] == gaps
    text = "\n".join(render_repetition(result))
    assert "Skipped: no pretrain model" in text and "| confidence+guard+remdm_conf |" in text


def test_a_run_without_the_world_is_skipped(subject):
    skills = dataclasses.replace(subject, run=load_run_config("ci"))
    result = repetition_suite(skills, SIZES_SMALL, (subject.model, subject.tokenizer))
    assert set(result) == {"skipped"}
    assert render_repetition(result) == ["## Repetition", "", f"Skipped: {result['skipped']}.", ""]


def model_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_find_text_model_follows_the_runs_links_and_init_from(tmp_path):
    stages = tmp_path / "stages"
    pretrain, sft = model_folder(stages / "pretrain-a" / "model"), model_folder(stages / "sft-b" / "model")
    models = tmp_path / "runs" / "r" / "models"
    models.mkdir(parents=True)
    for kind, target in (("pretrain", pretrain), ("sft", sft)):
        (models / kind).symlink_to(os.path.relpath(target, models))
    assert find_text_model(models / "sft") == models / "pretrain"
    assert find_text_model(sft) is None  # a resolved stage folder names no pretrain model
    other = model_folder(tmp_path / "elsewhere")
    load_run_config("ci", [f"sft.init_from={other}"]).save_yaml(sft / FOLDER_CONFIG_NAME)
    assert find_text_model(sft) == other and find_text_model(models / "sft") == other
    load_run_config("ci", [f"sft.init_from={tmp_path / 'missing'}"]).save_yaml(sft / FOLDER_CONFIG_NAME)
    assert find_text_model(models / "sft") == models / "pretrain" and find_text_model(sft) is None
