"""Loaders and scorers of the local lm-eval tasks (imported by the YAMLs beside this file).

Each task's data is a JSONL file written at eval time (`eval.benchmarks.write_task_data`). Its
path comes from the TaskManager metadata (`skills_path`, `chitchat_path`, `text_path`,
`world_path`) or, for
the `lm_eval` command line, from `$DGPT_EVAL_DATA_DIR/<task file>`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILES = {"skills_path": "skills.jsonl", "chitchat_path": "chitchat_mc.jsonl", "text_path": "heldout_text.jsonl",
         "world_path": "world.jsonl"}
ENV_DIR = "DGPT_EVAL_DATA_DIR"


def _path(key: str, given: str | None) -> Path:
    if given:
        return Path(given)
    folder = os.environ.get(ENV_DIR)
    if folder:
        return Path(folder) / FILES[key]
    raise FileNotFoundError(
        f"this dgpt task needs its data file: pass TaskManager(metadata={{'{key}': PATH}}) or set "
        f"{ENV_DIR} to a folder holding {FILES[key]} (eval.benchmarks.write_task_data writes it)"
    )


def _dataset(rows: list[dict]):
    import datasets

    if not rows:
        raise ValueError("the task's data file has no rows")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_skills(skills_path: str | None = None, skill: str | None = None, **_: object):
    """The held-out skills records (context, answer, skill), optionally of one skill."""
    rows = _read(_path("skills_path", skills_path))
    return _dataset([r for r in rows if skill is None or r["skill"] == skill])


def load_chitchat_mc(chitchat_path: str | None = None, **_: object):
    """The chitchat multiple-choice records (context, choices, label)."""
    return _dataset(_read(_path("chitchat_path", chitchat_path)))


def load_heldout_text(text_path: str | None = None, **_: object):
    """Held-out pretraining documents (text)."""
    return _dataset(_read(_path("text_path", text_path)))


def process_skills(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match as the library defines it (dgpt_core.data.skills.check_answer)."""
    from dgpt_core.data.skills import check_answer

    return {"exact_match": float(check_answer(doc, results[0]))}


def load_world(world_path: str | None = None, test_set: str | None = None, **_: object):
    """The synthetic world's test records (task, context, answer, answers, person, attribute,
    values), optionally of one test set (`task`: heldout, train, reversal, bio)."""
    rows = _read(_path("world_path", world_path))
    return _dataset([r for r in rows if test_set is None or r["task"] == test_set])


def process_world(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match: the stripped output is the answer."""
    return {"exact_match": float(results[0].strip() == doc["answer"].strip())}


def process_world_bio(doc: dict, results: list[str]) -> dict[str, float]:
    """A biography request: `fact_precision` / `fact_recall` of the output about the person
    (`dgpt_core.data.world.fact_scores`, the person rebuilt from the record's `values`) and
    `exact_match` with any of the person's biographies (`answers`)."""
    from dgpt_core.data.world import Person, fact_scores

    output = results[0].strip()
    scores = fact_scores(output, Person(name=doc["person"], attributes=dict(doc["values"])))
    return {"exact_match": float(output in {a.strip() for a in doc["answers"]}),
            "fact_precision": scores["fact_precision"], "fact_recall": scores["fact_recall"]}
