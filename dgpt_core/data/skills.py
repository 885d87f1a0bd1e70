"""Deterministic synthetic skills: short chat tasks whose answers can be checked by exact match.

Each item has a canonical input (`key`); a seeded hash of (skill, key) decides once and for all
whether that input belongs to train, validation or test, so the splits can never share an item,
whatever the sizes asked for. Items are drawn with `random.Random` seeded by strings, so the same
config gives the same items on every machine and Python version.

The answer text is what exact match compares (`answer`); the assistant message carries it with a
leading space (`completion`), the same form the copied words and numbers have in the prompt, so
a copied word becomes the same token ids in prompt and answer.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import SkillsConfig

SPLITS = ("train", "validation", "test")

WORDS = (
    "cat", "dog", "sun", "tree", "book", "car", "fish", "bird", "hat", "cup", "ball", "door",
    "milk", "rain", "star", "moon", "box", "pen", "bed", "egg", "key", "map", "bus", "cake",
    "shoe", "road", "boat", "lamp", "rock", "leaf", "ship", "bell",
)
NAMES = ("Tom", "Anna", "Sam", "Lily", "Max", "Emma", "Ben", "Mia", "Jack", "Lucy", "Leo", "Kate")
CITIES = ("Paris", "Rome", "London", "Tokyo", "Berlin", "Madrid", "Cairo", "Boston", "Dublin", "Lima")
COLORS = ("red", "blue", "green", "black", "white", "pink", "yellow", "brown")
PETS = ("cat", "dog", "fish", "bird", "horse", "rabbit", "frog", "duck")


@dataclass(frozen=True)
class SkillItem:
    """One task: the user prompt, the exact answer, and the canonical input it was made from."""

    skill: str
    prompt: str
    answer: str
    key: str

    @property
    def completion(self) -> str:
        """The assistant message content: the answer with the prompt's leading-space form."""
        return " " + self.answer

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]

    @property
    def messages(self) -> list[dict[str, str]]:
        return [*self.prompt_messages, {"role": "assistant", "content": self.completion}]

    def to_record(self) -> dict:
        """JSONL record for the eval suite: prompt messages, answer (exact match), skill."""
        return {**asdict(self), "messages": self.prompt_messages, "completion": self.completion}


Draw = Callable[[random.Random, SkillsConfig], tuple[str, str, str]]  # -> (prompt, answer, key)


def _numbers(rng: random.Random, cfg: SkillsConfig, k: int) -> list[int]:
    return [rng.randint(0, cfg.max_number) for _ in range(k)]


def _words(rng: random.Random, cfg: SkillsConfig) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(cfg.min_words, cfg.max_words))]


def _add(rng: random.Random, cfg: SkillsConfig) -> tuple[str, str, str]:
    a, b = _numbers(rng, cfg, 2)
    return f"What is {a} plus {b}?", str(a + b), f"{a}+{b}"


def _larger(rng: random.Random, cfg: SkillsConfig) -> tuple[str, str, str]:
    a, b = _numbers(rng, cfg, 2)
    while a == b:
        b = rng.randint(0, cfg.max_number)
    return f"Which is larger, {a} or {b}?", str(max(a, b)), f"{a},{b}"


def _repeat(rng: random.Random, cfg: SkillsConfig) -> tuple[str, str, str]:
    words = _words(rng, cfg)
    return f"Repeat the words: {' '.join(words)}", " ".join(words), " ".join(words)


def _reverse(rng: random.Random, cfg: SkillsConfig) -> tuple[str, str, str]:
    words = _words(rng, cfg)
    while len(set(words)) == 1 and len(words) > 1:  # a palindrome list would equal repeat
        words = _words(rng, cfg)
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words)), " ".join(words)


def _sort(rng: random.Random, cfg: SkillsConfig) -> tuple[str, str, str]:
    nums = _numbers(rng, cfg, rng.randint(max(2, cfg.min_words), max(2, cfg.max_words)))
    text = " ".join(map(str, nums))
    return f"Sort the numbers: {text}", " ".join(map(str, sorted(nums))), text


def _count(rng: random.Random, cfg: SkillsConfig) -> tuple[str, str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, max(cfg.max_words + 2, 3)))]
    return f"How many words? {' '.join(words)}", str(len(words)), " ".join(words)


_FACTS = (
    ("{n} lives in {v}.", "Where does {n} live?", CITIES),
    ("{n} has a {v} car.", "What color is the car of {n}?", COLORS),
    ("{n} has a pet {v}.", "What pet does {n} have?", PETS),
)


def _fact(rng: random.Random, cfg: SkillsConfig) -> tuple[str, str, str]:
    kind = rng.randrange(len(_FACTS))
    fact, question, values = _FACTS[kind]
    names = rng.sample(NAMES, 2)
    vals = [rng.choice(values) for _ in names]
    asked = rng.randrange(2)
    facts = " ".join(fact.format(n=n, v=v) for n, v in zip(names, vals))
    prompt = f"{facts} {question.format(n=names[asked])}"
    return prompt, vals[asked], f"{kind}|{names[0]}={vals[0]}|{names[1]}={vals[1]}|{asked}"


SKILLS: dict[str, Draw] = {
    "add": _add,
    "larger": _larger,
    "repeat": _repeat,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "fact": _fact,
}


def split_of(skill: str, key: str, cfg: SkillsConfig) -> str:
    """The split an input belongs to, fixed by a seeded hash: test, validation, or train."""
    digest = hashlib.sha256(f"{cfg.seed}|{skill}|{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < cfg.heldout_fraction / 2:
        return "test"
    if u < cfg.heldout_fraction:
        return "validation"
    return "train"


def generate_skill(skill: str, split: str, n: int, cfg: SkillsConfig) -> list[SkillItem]:
    """`n` distinct items of one skill in one split, deterministic in (cfg, skill, split, n)."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; known: {sorted(SKILLS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    draw = SKILLS[skill]
    rng = random.Random(f"skills|{cfg.seed}|{skill}|{split}")
    items: list[SkillItem] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(
                f"skill {skill!r}: only {len(items)} distinct {split} items found for n={n}; "
                "lower the count or widen the input space (max_number, max_words)"
            )
        prompt, answer, key = draw(rng, cfg)
        if key in seen or split_of(skill, key, cfg) != split:
            continue
        seen.add(key)
        items.append(SkillItem(skill=skill, prompt=prompt, answer=answer, key=key))
    return items


def generate_skills(cfg: SkillsConfig, split: str) -> list[SkillItem]:
    """Every configured skill's items for one split, skills interleaved round-robin."""
    n = {"train": cfg.train_per_skill, "validation": cfg.validation_per_skill, "test": cfg.test_per_skill}[split]
    per_skill = [generate_skill(s, split, n, cfg) for s in cfg.skills]
    return [items[i] for i in range(n) for items in per_skill]


def iter_skill_conversations(cfg: SkillsConfig, split: str) -> Iterator[dict]:
    """Chat rows `{"messages", "skill", "row"}` for the SFT stage."""
    for row, item in enumerate(generate_skills(cfg, split)):
        yield {"messages": item.messages, "skill": item.skill, "row": row}


def check_answer(item: SkillItem | dict, generated: str) -> bool:
    """Exact match after stripping surrounding whitespace (what the eval suite scores)."""
    answer = item.answer if isinstance(item, SkillItem) else item["answer"]
    return generated.strip() == answer


def write_skills_jsonl(items: list[SkillItem], path: str | Path) -> Path:
    """One JSON record per line: skill, prompt, answer, key, messages (prompt only), completion."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item.to_record(), ensure_ascii=False) + "\n")
    return path


def read_skills_jsonl(path: str | Path) -> list[SkillItem]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [SkillItem(skill=r["skill"], prompt=r["prompt"], answer=r["answer"], key=r["key"]) for r in rows]
