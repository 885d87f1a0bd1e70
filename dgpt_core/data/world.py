"""A deterministic synthetic world of people (Allen-Zhu & Li, "Physics of Language Models 3.1").

Every person has a unique full name and six attributes (birth date, birth city, university,
major, employer and the employer's city). Pretraining stores the facts from biographies; SFT
later extracts them by question answering, trained on one part of the people (`person_split`)
and tested on the other. The knowledge-augmentation choices of the paper are built in: several
biographies per person with different sentence templates, shuffled sentence order, the full name
in every sentence, no filler.

Text conventions:
- every sentence, the first of a biography too, starts with a space, so a name (and any word)
  has the same tokens wherever its sentence lands;
- an attribute sentence is "<text before the value> <value>." with the value last;
- the cloze probe of an attribute is the text of its first template up to the value, e.g.
  " Anna Smith was born in the city of" -> " Cairo"; no other attribute's template starts with
  that text (the first templates are chosen to be unambiguous: "was born on" for the date,
  "was born in the city of" for the city), and every biography set contains it.

Everything is drawn with `random.Random` / SHA-256 seeded by strings (names, attributes, the
world seed and WORLD_VERSION), so the same config gives the same world on every machine; adding
people keeps the earlier ones (same names, values, biographies and split).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Literal

from ..config import WorldConfig

WORLD_VERSION = 1
"""Bumped whenever a value list, template or drawing rule changes (the world changes with it)."""

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "work_city")

FIRST_NAMES = (
    "Anna", "Ben", "Carl", "Dana", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
    "Maria", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Alan", "Beth", "Chris",
    "David", "Ella", "Fred", "Gina", "Hugo", "Ivan", "Jane", "Karl", "Lucy", "Mark", "Nora", "Owen",
)
LAST_NAMES = (
    "Smith", "Brown", "Jones", "Miller", "Davis", "Wilson", "Moore", "Taylor", "Clark", "Hall", "Lee",
    "Young", "King", "Wright", "Hill", "Scott", "Green", "Adams", "Baker", "Nelson", "Carter", "Mitchell",
    "Turner", "Parker", "Evans", "Collins", "Stewart", "Morris", "Reed", "Cook", "Bell", "Murphy",
    "Bailey", "Cooper", "Ward", "Gray",
)
CITIES = (
    "Paris", "Rome", "London", "Tokyo", "Berlin", "Madrid", "Cairo", "Boston", "Dublin", "Lima", "Oslo",
    "Vienna", "Prague", "Athens", "Seoul", "Delhi", "Dallas", "Denver", "Chicago", "Miami", "Austin",
    "Sydney", "Toronto", "Moscow", "Lisbon", "Warsaw", "Manila", "Nairobi", "Houston", "Phoenix",
    "Seattle", "Atlanta",
)
UNIVERSITIES = (
    "Harvard", "Yale", "Oxford", "Cambridge", "Stanford", "Princeton", "Cornell", "Duke", "Columbia",
    "Berkeley", "Caltech", "Purdue", "Rice", "Emory", "Tufts", "Baylor", "Clemson", "Vanderbilt",
    "Georgetown", "Dartmouth", "Tulane", "Rutgers", "MIT", "Auburn",
)
MAJORS = (
    "art", "law", "math", "music", "physics", "history", "biology", "chemistry", "medicine", "economics",
    "English", "French", "philosophy", "nursing", "dance", "design", "finance", "geology", "drama",
    "psychology", "sociology", "architecture", "astronomy", "computer science",
)
EMPLOYERS = (
    ("Google", "Austin"), ("Apple", "Boston"), ("Amazon", "Seattle"), ("Microsoft", "Denver"),
    ("Intel", "Phoenix"), ("Nike", "Dallas"), ("Ford", "Chicago"), ("Boeing", "Atlanta"),
    ("Pfizer", "London"), ("Tesla", "Houston"), ("Netflix", "Miami"), ("Adobe", "Toronto"),
    ("Oracle", "Sydney"), ("Visa", "Dublin"), ("Sony", "Tokyo"), ("Honda", "Seoul"),
    ("Toyota", "Delhi"), ("Shell", "Oslo"), ("Siemens", "Berlin"), ("Nestle", "Vienna"),
    ("IBM", "Paris"), ("Dell", "Madrid"), ("Uber", "Lisbon"), ("Disney", "Rome"),
)
"""Employers and the city each one's employees work in (work_city follows the employer, unless
the world draws it on its own: `WorldConfig.independent_work_city`)."""
WORK_CITIES = tuple(city for _, city in EMPLOYERS)
"""The work cities an independent draw picks from (the employers' cities, uniformly)."""
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)
YEARS = range(1950, 2000)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{n} was born on {v}.", "{n} came into this world on {v}.", "{n} has a birth date of {v}.",
        "The birth date of {n} is {v}.", "{n} entered life on {v}.",
    ),
    "birth_city": (
        "{n} was born in the city of {v}.", "{n} was born in {v}.", "{n} grew up in {v}.",
        "The birthplace of {n} is {v}.", "{n} comes from {v}.",
    ),
    "university": (
        "{n} graduated from {v}.", "{n} attended {v}.", "{n} received an education at {v}.",
        "The university of {n} was {v}.", "{n} was a student at {v}.",
    ),
    "major": (
        "{n} majored in {v}.", "{n} specialized in {v}.", "{n} earned a degree in {v}.",
        "The major of {n} was {v}.", "{n} chose to study {v}.",
    ),
    "employer": (
        "{n} works for {v}.", "{n} is employed by {v}.", "{n} has a job at {v}.",
        "The employer of {n} is {v}.", "{n} earns a living at {v}.",
    ),
    "work_city": (
        "{n} works in the city of {v}.", "{n} has an office in {v}.", "{n} goes to work in {v}.",
        "The workplace of {n} is in {v}.", "{n} commutes to work in {v}.",
    ),
}
"""Sentence templates per attribute, the value last; the first one is the cloze probe's form."""

QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_date": ("What is the birth date of {n}?", "When was {n} born?", "On what date was {n} born?"),
    "birth_city": ("Where was {n} born?", "What is the birth city of {n}?", "In which city was {n} born?"),
    "university": ("Which university did {n} attend?", "Where did {n} study?",
                   "What university did {n} graduate from?"),
    "major": ("What did {n} study?", "What was the major of {n}?", "Which field did {n} major in?"),
    "employer": ("Which company does {n} work for?", "Who employs {n}?", "What is the employer of {n}?"),
    "work_city": ("Where does {n} work?", "In which city does {n} work?", "What is the work city of {n}?"),
}
"""Question phrasings per attribute for SFT (the answer is the bare value)."""

BIOGRAPHY_REQUESTS = ("Tell me about {n}.", "Who is {n}?", "Write a short biography of {n}.")
"""Long-answer requests; the answer is one of the person's biographies (30-60 tokens)."""

REVERSAL_QUESTION = "Who was born on {d} in {c}?"
"""The reversed question (the name from the birth date and city): the reversal-curse test."""

Split = Literal["train", "heldout"]
TEST_SETS = ("heldout", "train", "reversal", "bio")
"""The world's test sets: attribute questions on held-out people (knowledge only pretraining
can give) and on train people, reversed questions and biography requests on held-out people."""


@dataclass(frozen=True)
class Person:
    """One person: a unique full name and the configured attributes' values (bare text)."""

    name: str
    attributes: dict[str, str] = field(hash=False)


@dataclass(frozen=True)
class ClozeProbe:
    """A storage probe: `prompt` is followed by `value` in the person's biographies."""

    person: str
    attribute: str
    prompt: str
    """The probe template's text up to the value, with the biography's leading space."""
    value: str
    """The continuation: the value with its leading space (" Cairo")."""

    @property
    def answer(self) -> str:
        """The bare value."""
        return self.value.strip()


@dataclass(frozen=True)
class QAPair:
    """A question about a person and its exact answer: an attribute's bare value, the name
    (attribute `name`, reversed questions) or a biography (attribute `biography`)."""

    person: str
    attribute: str
    question: str
    answer: str


def _rng(cfg: WorldConfig, *parts: object) -> random.Random:
    return random.Random("|".join(["world", str(WORLD_VERSION), str(cfg.seed), *map(str, parts)]))


def _draw_attributes(name: str, cfg: WorldConfig) -> dict[str, str]:
    """All six attributes of one person, drawn from the name (so every attribute subset agrees)."""
    rng = _rng(cfg, "person", name)
    date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.choice(YEARS)}"
    employer, work_city = rng.choice(EMPLOYERS)
    full = {"birth_date": date, "birth_city": rng.choice(CITIES), "university": rng.choice(UNIVERSITIES),
            "major": rng.choice(MAJORS), "employer": employer, "work_city": work_city}
    if cfg.independent_work_city:  # drawn last, so every other value is the default world's
        full["work_city"] = rng.choice(WORK_CITIES)
    return {attr: full[attr] for attr in cfg.attributes}


def generate_people(cfg: WorldConfig) -> list[Person]:
    """`cfg.people` people with unique full names; the first n of a larger world are the same."""
    pool = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if cfg.people > len(pool):
        raise ValueError(f"people={cfg.people} exceeds the {len(pool)} distinct full names")
    _rng(cfg, "names").shuffle(pool)
    return [Person(name=name, attributes=_draw_attributes(name, cfg)) for name in pool[: cfg.people]]


def templates(attribute: str, cfg: WorldConfig) -> tuple[str, ...]:
    """The templates of `attribute` in use (the first templates_per_attribute of them)."""
    return TEMPLATES[attribute][: cfg.templates_per_attribute or None]


def _template_order(person: Person, attribute: str, cfg: WorldConfig) -> list[int]:
    """Template index per biography: a seeded cycle through the templates, the probe template
    (index 0) placed within the first min(biographies, templates) so some biography has it."""
    n = len(templates(attribute, cfg))
    rng = _rng(cfg, "templates", person.name, attribute)
    order = list(range(1, n))
    rng.shuffle(order)
    order.insert(rng.randrange(min(cfg.biographies_per_person, n)), 0)
    return [order[k % n] for k in range(cfg.biographies_per_person)]


def sentence(person: Person, attribute: str, template: int) -> str:
    """One attribute sentence with its leading space."""
    return " " + TEMPLATES[attribute][template].format(n=person.name, v=person.attributes[attribute])


def biographies(person: Person, cfg: WorldConfig) -> list[str]:
    """`cfg.biographies_per_person` biographies: one sentence per attribute, seeded template choice
    and (with permute_sentences) seeded sentence order."""
    orders = {attr: _template_order(person, attr, cfg) for attr in person.attributes}
    out = []
    for k in range(cfg.biographies_per_person):
        sentences = [sentence(person, attr, orders[attr][k]) for attr in person.attributes]
        if cfg.permute_sentences:
            _rng(cfg, "order", person.name, k).shuffle(sentences)
        out.append("".join(sentences))
    return out


def person_split(person: Person | str, cfg: WorldConfig) -> Split:
    """`heldout` (never in SFT) for a seeded-hash share heldout_fraction of the names, else `train`."""
    name = person if isinstance(person, str) else person.name
    digest = hashlib.sha256(f"world|{cfg.seed}|split|{name}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") / 2**64 < cfg.heldout_fraction else "train"


def cloze_probes(person: Person, cfg: WorldConfig) -> list[ClozeProbe]:
    """One probe per attribute: the probe template's text up to the value, and the value."""
    probes = []
    for attr, value in person.attributes.items():
        before = TEMPLATES[attr][0].split("{v}")[0].rstrip()
        probes.append(ClozeProbe(person.name, attr, " " + before.format(n=person.name), " " + value))
    return probes


def qa_pairs(person: Person, cfg: WorldConfig, phrasings: int | None = None) -> list[QAPair]:
    """Every question phrasing (or the first `phrasings`) of every configured attribute, answered
    by the bare value."""
    return [QAPair(person.name, attr, q.format(n=person.name), value)
            for attr, value in person.attributes.items() for q in QUESTIONS[attr][:phrasings]]


def pretraining_text(cfg: WorldConfig) -> list[str]:
    """Every biography of every person, in a seeded shuffled order (people mixed in packing)."""
    docs = [bio for person in generate_people(cfg) for bio in biographies(person, cfg)]
    _rng(cfg, "documents").shuffle(docs)
    return docs


def reversal_pair(person: Person) -> QAPair | None:
    """The reversed question of a person with a birth date and birth city, else None."""
    if not {"birth_date", "birth_city"} <= person.attributes.keys():
        return None
    question = REVERSAL_QUESTION.format(d=person.attributes["birth_date"], c=person.attributes["birth_city"])
    return QAPair(person.name, "name", question, person.name)


def biography_requests(person: Person, cfg: WorldConfig) -> list[QAPair]:
    """One long-answer request per biography of the person, the request phrasings in turn."""
    return [QAPair(person.name, "biography", BIOGRAPHY_REQUESTS[k % len(BIOGRAPHY_REQUESTS)].format(n=person.name),
                   bio.strip())
            for k, bio in enumerate(biographies(person, cfg))]


def _unique_reversals(people: list[Person]) -> list[QAPair]:
    """Reversed questions whose birth date and city identify one person (a shared pair has no
    single answer: it is left out)."""
    pairs = [p for p in (reversal_pair(person) for person in people) if p is not None]
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.question] = counts.get(p.question, 0) + 1
    return [p for p in pairs if counts[p.question] == 1]


def sft_pairs(cfg: WorldConfig) -> list[QAPair]:
    """The SFT items, all about `train` people: every question phrasing of every attribute, the
    reversed question and `sft_biographies` biography requests."""
    people = [p for p in generate_people(cfg) if person_split(p, cfg) == "train"]
    reversals = {p.person: p for p in _unique_reversals(people)}
    out: list[QAPair] = []
    for person in people:
        out += qa_pairs(person, cfg)
        if person.name in reversals:
            out.append(reversals[person.name])
        out += biography_requests(person, cfg)[: cfg.sft_biographies]
    return out


def one_question_per_attribute(people: list[Person], cfg: WorldConfig) -> list[QAPair]:
    """One question per attribute of every person, the phrasings taken in turn (person k's
    attribute j gets phrasing (k + j) mod 3), so every phrasing is asked about as often."""
    out = []
    for k, person in enumerate(people):
        for j, (attr, value) in enumerate(person.attributes.items()):
            phrasings = QUESTIONS[attr]
            out.append(QAPair(person.name, attr, phrasings[(k + j) % len(phrasings)].format(n=person.name), value))
    return out


def test_pairs(cfg: WorldConfig) -> dict[str, list[QAPair]]:
    """The test sets (TEST_SETS): `heldout` and `train`: one question per attribute of every
    held-out / train person (`one_question_per_attribute`); `reversal` and `bio`: the reversed
    question and the first biography request of each held-out person (the gold biography is the
    first; any of the person's biographies is an exact match, see `person_biographies`)."""
    people = generate_people(cfg)
    heldout = [p for p in people if person_split(p, cfg) == "heldout"]
    train = [p for p in people if person_split(p, cfg) == "train"]
    return {
        "heldout": one_question_per_attribute(heldout, cfg),
        "train": one_question_per_attribute(train, cfg),
        "reversal": _unique_reversals(heldout),
        "bio": [biography_requests(p, cfg)[0] for p in heldout],
    }


test_pairs.__test__ = False  # a library function, not a pytest test, wherever it is imported


def validation_biographies(cfg: WorldConfig) -> list[str]:
    """One biography per person that pretraining never reads: the next template and sentence
    order of each person's cycle (the facts are known, the wording is new)."""
    more = cfg.model_copy(update={"biographies_per_person": cfg.biographies_per_person + 1})
    return [biographies(person, more)[-1] for person in generate_people(cfg)]


def _value_pattern() -> re.Pattern[str]:
    values = {*CITIES, *UNIVERSITIES, *MAJORS, *(e for e, _ in EMPLOYERS)}
    words = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    date = rf"(?:{'|'.join(MONTHS)}) \d{{1,2}}, \d{{4}}"
    return re.compile(rf"(?<![\w]){date}|(?<![\w])(?:{words})(?![\w])")


VALUE_PATTERN = _value_pattern()
"""Any attribute value of the world's value lists (cities, universities, majors, employers, dates)."""


def fact_scores(text: str, person: Person) -> dict[str, float]:
    """How true a generated text is of `person`: `mentions` (attribute values found in the text,
    from the world's value lists), `fact_precision` (share of them that are one of the person's
    values; 1.0 with no mention), `fact_recall` (share of the person's attributes whose value is
    stated)."""
    found = VALUE_PATTERN.findall(text)
    true = set(person.attributes.values())
    stated = sum(1 for v in person.attributes.values() if re.search(rf"(?<![\w]){re.escape(v)}(?![\w])", text))
    return {"mentions": float(len(found)),
            "fact_precision": sum(v in true for v in found) / len(found) if found else 1.0,
            "fact_recall": stated / len(person.attributes)}


def person_biographies(person: Person, cfg: WorldConfig) -> list[str]:
    """Every biography of the person as an answer (no leading space): what a biography request's
    exact match accepts."""
    return [b.strip() for b in biographies(person, cfg)]
