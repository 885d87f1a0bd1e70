"""The synthetic world of people (`dgpt_core.data.world`) in the eval suite.

Used when the run's data has a `world` source (pretraining or SFT):
- `storage`: cloze accuracy on every person's probes (`eval.storage.cloze_accuracy`), every kind;
- `task_rows` / `summary`: the dgpt_world lm-eval tasks (SFT models): exact match on attribute
  questions about held-out and train people and on reversed questions, fact precision / recall
  and exact match of biography requests;
- `plain_prompts` / `chat_prompts` / `fact_scorer`: long generations about held-out people (their
  facts can only come from pretraining) for the repetition study, each output scored for facts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from dgpt_core.config import DataConfig, WorldConfig
from dgpt_core.data.stage_cache import uses_world
from dgpt_core.data.world import (
    TEST_SETS,
    Person,
    cloze_probes,
    fact_scores,
    generate_people,
    person_biographies,
    person_split,
    test_pairs,
    validation_biographies,
)

from .answers import probe_rows
from .data import render_prompt
from .storage import STORAGE_METHOD, predict_values, score_predictions

TASKS = {s: f"dgpt_world_{s}" for s in TEST_SETS}
"""lm-eval task of each test set (the group `dgpt_world` runs all four, e.g. from lm-eval's own CLI)."""
_SENTENCE_END = re.compile(r"\.(?=\s|$)")


def world_config(data_cfg: DataConfig) -> WorldConfig | None:
    """The run's world settings when a pretraining or SFT source is the world, else None."""
    used = uses_world(data_cfg.pretrain.sources) or uses_world(data_cfg.sft.sources)
    return data_cfg.world if used else None


def storage(model: Any, tokenizer: Any, cfg: WorldConfig, *, batch_size: int,
            seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The storage probe (`eval.storage`) on the cloze probes of every person (train and held-out):
    its scores, and one answer row per probe (`eval.answers.probe_rows`, group `storage`)."""
    probes = [p for person in generate_people(cfg) for p in cloze_probes(person, cfg)]
    predicted, gold = predict_values(model, tokenizer, probes, batch_size=batch_size, seed=seed)
    out = {**score_predictions(probes, predicted, gold), "people": cfg.people}
    texts = [[tokenizer.decode(ids, skip_special_tokens=False) for ids in side] for side in (predicted, gold)]
    return out, probe_rows("storage", probes, *texts, method=STORAGE_METHOD, steps=0)


def task_rows(cfg: WorldConfig, tokenizer: Any, kind: str, seed: int) -> list[dict]:
    """Records of the dgpt_world tasks: {task (test set), context (the question rendered as the
    skills prompts are), prompt (the question), answer, answers (every biography of the person for
    `bio`, else [answer]), person, attribute, values (the person's attributes)}. Each test set is
    in a seeded order, so a `limit` takes a mix of people and attributes."""
    people = {p.name: p for p in generate_people(cfg)}
    rows = []
    for test_set, pairs in test_pairs(cfg).items():
        pairs = list(pairs)
        random.Random(f"dgpt_world|{seed}|{test_set}").shuffle(pairs)
        for q in pairs:
            person = people[q.person]
            answers = person_biographies(person, cfg) if test_set == "bio" else [q.answer]
            context = render_prompt(tokenizer, [{"role": "user", "content": q.question}], kind)
            rows.append({"task": test_set, "context": context, "prompt": q.question, "answer": q.answer,
                         "answers": answers, "person": q.person, "attribute": q.attribute,
                         "values": dict(person.attributes)})
    return rows


def tasks_of(rows: list[dict]) -> list[str]:
    """The tasks of the test sets that have rows."""
    present = {r["task"] for r in rows}
    return [TASKS[s] for s in TEST_SETS if s in present]


def short_answer_tasks(tasks: list[str]) -> list[str]:
    """The question tasks among `tasks` (answers of a few tokens)."""
    return [t for t in tasks if t != TASKS["bio"]]


def long_answer_tasks(tasks: list[str]) -> list[str]:
    """The biography task among `tasks` (answers of 30-60 tokens)."""
    return [t for t in tasks if t == TASKS["bio"]]


def summary(flat: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flattened lm-eval results -> {heldout, train, reversal (exact match), bio_fact_precision,
    bio_fact_recall, bio_exact_match, n_<test set>}; a test set without items has n 0 and no score."""
    row: dict[str, float] = {}
    for test_set in TEST_SETS:
        metrics = flat.get(TASKS[test_set], {})
        row[f"n_{test_set}"] = metrics.get("n", 0.0)
        if test_set == "bio":
            keys = ("fact_precision", "fact_recall", "exact_match")
            row.update({f"bio_{k}": metrics[k] for k in keys if k in metrics})
        elif "exact_match" in metrics:
            row[test_set] = metrics["exact_match"]
    return row


def opening(text: str) -> str:
    """The text up to and including the end of its first sentence (all of it without one)."""
    m = _SENTENCE_END.search(text)
    return text[: m.end()] if m else text


def plain_prompts(cfg: WorldConfig, tokenizer: Any, n: int) -> tuple[list[list[int]], list[Person]]:
    """Up to n held-out people's validation-biography openings, tokenized as pretraining text
    (end-of-text token first, as `eval.storage.encode_probe`), and the people."""
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    prompts, people = [], []
    for person, bio in zip(generate_people(cfg), validation_biographies(cfg)):
        if person_split(person, cfg) != "heldout":
            continue
        prompts.append([eos, *tokenizer(opening(bio), add_special_tokens=False)["input_ids"]])
        people.append(person)
        if len(prompts) >= n:
            break
    return prompts, people


def chat_prompts(
    cfg: WorldConfig, tokenizer: Any, n: int, max_prompt_tokens: int
) -> tuple[list[list[int]], list[Person]]:
    """Up to n biography requests of held-out people (test set `bio`) in the chat template, and
    the people; prompts longer than max_prompt_tokens are left out."""
    people = {p.name: p for p in generate_people(cfg)}
    prompts, who = [], []
    for q in test_pairs(cfg)["bio"]:
        text = render_prompt(tokenizer, [{"role": "user", "content": q.question}], "sft")
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) <= max_prompt_tokens:
            prompts.append(ids)
            who.append(people[q.person])
        if len(prompts) >= n:
            break
    return prompts, who


def fact_scorer(people: list[Person]) -> Callable[[int, str], dict[str, float]]:
    """Per-prompt scorer for `compare_strategies`: fact_precision and fact_recall of the output
    about the prompt's person."""

    def score(index: int, text: str) -> dict[str, float]:
        scores = fact_scores(text, people[index])
        return {"fact_precision": scores["fact_precision"], "fact_recall": scores["fact_recall"]}

    return score
