"""Per-question results of the eval as pandas DataFrames.

Every generative task the suite scores (the world's questions and biography requests, the skills,
the storage probes) leaves one row per question and decoding setting in one long frame: `group`
(the benchmark: dgpt_world, dgpt_skills, storage), `task`, `item`, `test_set` (the world's test
set, the skill, or the probed attribute), `prompt`, `reference`, `method`, `steps`, `answer`,
`correct`, and a task's own scores (a biography's fact precision and recall). The lm-eval rows come
from its logged samples, so `correct` is exactly what the benchmark's metric counted.

`write_answers` saves the long frame as `answers.parquet` beside metrics.json, and per group a wide
table at the eval's own steps, `answers/<group>.parquet`: one row per question, an answer and a
correct column per decoding method. The flow logs the wide tables to the eval's MLflow run with
`log_table`, where the UI sets the answers of two runs side by side; the report's sample tables are
the first rows of the same frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

LONG_FILE = "answers.parquet"
WIDE_DIR = "answers"
ID_COLUMNS = ("task", "item", "test_set", "prompt", "reference")
"""What identifies a question across decoding methods (and across runs of the same data)."""
SCORE_COLUMNS = ("fact_precision", "fact_recall")
"""Numeric per-question scores carried from lm-eval's samples when a task has them."""
COLUMNS = ("group", *ID_COLUMNS, "method", "steps", "answer", "correct", *SCORE_COLUMNS)
CHAT_GROUPS = ("dgpt_world", "dgpt_skills")
"""The groups whose prompts are chat questions (the storage probes are plain text)."""


def _test_set(doc: Mapping[str, Any]) -> str:
    return str(doc.get("task") or doc.get("skill") or doc.get("attribute") or "")


def sample_rows(group: str, samples: Mapping[str, Sequence[Mapping[str, Any]]], method: str,
                steps: int) -> list[dict[str, Any]]:
    """The rows of lm-eval's logged samples (`simple_evaluate(log_samples=True)["samples"]`) of one
    decoding setting: per task, per document, its prompt, reference, answer and exact match."""
    rows = []
    for task, docs in samples.items():
        for sample in docs:
            doc = sample["doc"]
            answer = sample["filtered_resps"][0]
            rows.append({
                "group": group, "task": task, "item": int(sample["doc_id"]), "test_set": _test_set(doc),
                "prompt": str(doc.get("prompt", doc.get("context", ""))), "reference": str(doc.get("answer", "")),
                "method": method, "steps": int(steps), "answer": answer if isinstance(answer, str) else str(answer),
                "correct": bool(sample["exact_match"]),
                **{key: float(sample[key]) for key in SCORE_COLUMNS if key in sample},
            })
    return rows


def probe_rows(group: str, probes: Sequence[Any], predicted: Sequence[str], gold: Sequence[str], method: str,
               steps: int) -> list[dict[str, Any]]:
    """The rows of the storage probes (`eval.storage`): per cloze probe its prompt, the value that
    should follow, the model's completion and whether it matched whole."""
    return [{"group": group, "task": group, "item": i, "test_set": probe.attribute, "prompt": probe.prompt,
             "reference": want, "method": method, "steps": int(steps), "answer": got, "correct": got == want}
            for i, (probe, got, want) in enumerate(zip(probes, predicted, gold))]


def answers_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The long frame of `rows`, with every column of COLUMNS (scores NaN where a task has none)."""
    frame = pd.DataFrame(list(rows), columns=list(COLUMNS))
    return frame.astype({"item": "int64", "steps": "int64", "correct": "bool"})


def wide_frame(frame: pd.DataFrame, steps: int) -> pd.DataFrame:
    """One row per question of `frame` at `steps`, with `answer [<method>]` and `correct [<method>]`
    (and any task score) columns, the methods in the order they were run."""
    at = frame[frame["steps"] == steps]
    methods = list(dict.fromkeys(at["method"]))
    values = ["answer", "correct", *[c for c in SCORE_COLUMNS if at[c].notna().any()]]
    wide = at.pivot_table(index=list(ID_COLUMNS), columns="method", values=values, aggfunc="first", sort=False)
    wide = wide.reindex(columns=[(value, m) for m in methods for value in values])
    wide.columns = [f"{value} [{method}]" for value, method in wide.columns]
    return wide.reset_index()


def accuracy(frame: pd.DataFrame) -> pd.DataFrame:
    """Share of correct answers per task, method and steps (what lm-eval's exact_match reports)."""
    return frame.groupby(["group", "task", "method", "steps"], sort=False)["correct"].mean().reset_index()


def write_answers(out_dir: str | Path, frame: pd.DataFrame, steps: int) -> dict[str, Path]:
    """`answers.parquet` (the long frame) and `answers/<group>.parquet` (the wide table of each
    group at `steps`) in out_dir; returns {name: path}."""
    out = Path(out_dir)
    (out / WIDE_DIR).mkdir(parents=True, exist_ok=True)
    files = {"answers": out / LONG_FILE}
    frame.to_parquet(files["answers"], index=False)
    for group, part in frame.groupby("group", sort=False):
        files[f"answers/{group}"] = out / WIDE_DIR / f"{group}.parquet"
        wide_frame(part, steps if (part["steps"] == steps).any() else int(part["steps"].iloc[0])).to_parquet(
            files[f"answers/{group}"], index=False)
    return files


def read_wide_tables(out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """The wide tables `write_answers` wrote, by group."""
    return {path.stem: pd.read_parquet(path) for path in sorted((Path(out_dir) / WIDE_DIR).glob("*.parquet"))}
