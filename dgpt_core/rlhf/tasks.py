"""Verifiable tasks of the RL stage: chat prompts of the training split and the reward of an answer.

`world`: the train people's questions of the synthetic world (attribute questions, reversed
questions, biography requests), rewarded 1.0 for the stored value exactly (a biography: the F1 of
its fact precision and recall). `skills`: the train split of the synthetic skills, exact match.
Held-out people and held-out skills are never prompts here: the eval suite scores them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import DataConfig
from ..config.rl import RLConfig
from ..data.skills import generate_skills
from ..data.world import Person, fact_scores, generate_people, sft_pairs


@dataclass(frozen=True)
class RLItem:
    """One prompt of the task and what its answer is checked against."""

    prompt_ids: list[int]
    """The chat prompt up to the assistant's turn, tokenized."""
    answer: str
    """The exact answer (bare text)."""
    kind: str
    """attribute, reversal, biography or skill (the reward rule, and the per-kind reward curves)."""
    person: Person | None = None
    """world: the person asked about (a biography's facts are checked against theirs)."""


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """The SFT chat template of one user question with the assistant's turn opened, as token ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _kind_of(attribute: str) -> str:
    return {"name": "reversal", "biography": "biography"}.get(attribute, "attribute")


def task_items(cfg: RLConfig, data: DataConfig, tokenizer) -> list[RLItem]:
    """The stage's prompts: every training item of `cfg.task` of the kinds asked for, a seeded
    sample of `cfg.max_prompts` of them when set. A task with no items is a ValueError naming it."""
    if cfg.task == "world":
        people = {p.name: p for p in generate_people(data.world)}
        items = [RLItem(chat_prompt_ids(tokenizer, q.question), q.answer, _kind_of(q.attribute), people[q.person])
                 for q in sft_pairs(data.world) if _kind_of(q.attribute) in cfg.world_questions]
    else:
        items = [RLItem(chat_prompt_ids(tokenizer, s.prompt), s.answer, "skill") for s in
                 generate_skills(data.skills, "train")]
    if not items:
        raise ValueError(f"rl.task={cfg.task} (questions {cfg.world_questions}) has no training prompts")
    if cfg.max_prompts and cfg.max_prompts < len(items):
        items = random.Random(cfg.seed).sample(items, cfg.max_prompts)
    return items


def reward(item: RLItem, text: str) -> float:
    """1.0 for the exact answer (whitespace-stripped), else 0.0; a biography scores the harmonic
    mean of its fact precision and recall about the person."""
    if item.kind != "biography":
        return float(text.strip() == item.answer)
    scores = fact_scores(text, item.person)
    p, r = scores["fact_precision"], scores["fact_recall"]
    return 2 * p * r / (p + r) if p + r else 0.0


def kinds_of(items: Sequence[RLItem]) -> list[str]:
    """The question kinds present, in a fixed order."""
    return sorted({item.kind for item in items})
