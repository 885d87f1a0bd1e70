"""The synthetic skills: deterministic, disjoint splits, correct answers, JSONL export."""

from __future__ import annotations

import pytest

from dgpt_core.config import SkillsConfig
from dgpt_core.data.skills import (
    SKILLS,
    check_answer,
    generate_skill,
    generate_skills,
    read_skills_jsonl,
    split_of,
    write_skills_jsonl,
)

CFG = SkillsConfig(train_per_skill=300, validation_per_skill=30, test_per_skill=60)


def test_deterministic():
    a = generate_skills(CFG, "train")
    b = generate_skills(SkillsConfig(**CFG.model_dump()), "train")
    assert a == b and len(a) == 300 * len(CFG.skills)
    assert generate_skills(CFG.model_copy(update={"seed": 1}), "train") != a


@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_splits_disjoint(skill):
    splits = {sp: generate_skill(skill, sp, n, CFG) for sp, n in (("train", 300), ("validation", 30), ("test", 60))}
    keys = {sp: {it.key for it in items} for sp, items in splits.items()}
    prompts = {sp: {it.prompt for it in items} for sp, items in splits.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not keys[a] & keys[b] and not prompts[a] & prompts[b]
    for sp, items in splits.items():
        assert len({it.key for it in items}) == len(items)  # no duplicates within a split
        assert all(split_of(skill, it.key, CFG) == sp for it in items)
    # asking for more training items never moves an item into test
    more = {it.key for it in generate_skill(skill, "train", 600, CFG)}
    assert not more & keys["test"]


def test_answers_are_correct():
    for it in generate_skills(CFG, "test"):
        p = it.prompt
        if it.skill == "add":
            a, b = [int(x) for x in p.removeprefix("What is ").removesuffix("?").split(" plus ")]
            assert it.answer == str(a + b)
        elif it.skill == "larger":
            a, b = [int(x) for x in p.removeprefix("Which is larger, ").removesuffix("?").split(" or ")]
            assert it.answer == str(max(a, b))
        elif it.skill == "repeat":
            assert it.answer == p.split(": ", 1)[1]
        elif it.skill == "reverse":
            assert it.answer.split() == p.split(": ", 1)[1].split()[::-1]
        elif it.skill == "sort":
            assert it.answer.split() == [str(x) for x in sorted(int(x) for x in p.split(": ", 1)[1].split())]
        elif it.skill == "count":
            assert it.answer == str(len(p.split("? ", 1)[1].split()))
        elif it.skill == "fact":
            assert it.answer in p.split(". ")[0] + p.split(". ")[1]
        assert check_answer(it, f"  {it.answer}\n") and not check_answer(it, it.answer + " x")
        assert it.messages[-1] == {"role": "assistant", "content": " " + it.answer}


def test_jsonl_roundtrip(tmp_path):
    items = generate_skills(CFG, "test")
    path = write_skills_jsonl(items, tmp_path / "skills_test.jsonl")
    assert read_skills_jsonl(path) == items
    import json

    rec = json.loads(path.read_text().splitlines()[0])
    assert set(rec) >= {"skill", "prompt", "answer", "messages"}
    assert rec["messages"] == [{"role": "user", "content": rec["prompt"]}]


def test_too_small_input_space_fails_clearly():
    with pytest.raises(ValueError, match="distinct"):
        generate_skill("add", "test", 500, SkillsConfig(max_number=9))
