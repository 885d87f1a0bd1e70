"""The synthetic world of people (`dgpt_core.data.world`) as the bench workload, for runs whose SFT
data is the world (`Subject.world`); the skills test items are the workload otherwise.

- `bio_workload`: the biography requests of held-out people (test set `bio`, long answers), each
  answer scored by `fact_scores` against the person (fact_recall, fact_precision) and by exact
  match with any of the person's biographies: the decoding-methods comparison of the sample suite;
- `qa_workload`: the reversed questions ("Who was born on <date> in <city>?" -> the name, test set
  `reversal`) and the attribute questions (test set `heldout`) of held-out people, exact match of
  the stripped answer: the reversal-curse comparison of the baseline suite.

Held-out people were never in SFT, so every fact must come from pretraining. Prompts are the
questions in the chat template; questions are decoded on the SFT answer canvas the model was
trained on, biographies on the eval's long-answer canvas (as the eval suite does).
"""

from __future__ import annotations

from dgpt_core.config import WorldConfig
from dgpt_core.data.world import Person, QAPair, fact_scores, generate_people, person_biographies, test_pairs
from dgpt_core.generation.options import trained_block_size
from dgpt_core.models.info import model_info_of

from .common import BenchSizes, Subject, Workload, encode_chat

QA_SETS = ("reversal", "heldout")
"""Short-answer test sets of the baseline comparison, each scored as `<set>_exact_match`."""


def long_answer_canvas(subject: Subject) -> int:
    """The eval's long-answer canvas for the model under test (`EvalConfig.long_canvas`)."""
    return subject.run.eval.long_canvas(info.trained_long_canvas if (info := model_info_of(subject.model)) else None)


def short_answer_canvas(subject: Subject) -> int:
    """The trained SFT answer canvas, else the long-answer canvas."""
    return subject.run.data.sft.answer_canvas or long_answer_canvas(subject)


def _world(subject: Subject) -> WorldConfig:
    assert subject.world is not None, "the run's SFT data is not the world"
    return subject.world


def _pairs(cfg: WorldConfig, test_set: str, people: int) -> list[QAPair]:
    """The test set's pairs about the first `people` held-out people (`bio` has one pair per
    held-out person, in generation order)."""
    sets = test_pairs(cfg)
    keep = {p.person for p in sets["bio"][:people]}
    return [p for p in sets[test_set] if p.person in keep]


def _prompts(subject: Subject, pairs: list[QAPair]) -> list[list[int]]:
    return [encode_chat(subject.tokenizer, [{"role": "user", "content": p.question}]) for p in pairs]


def bio_workload(subject: Subject, sizes: BenchSizes) -> Workload:
    """Biography requests of up to `sizes.world_people` held-out people; quality = fact recall,
    fact precision, then exact match with one of the person's biographies."""
    cfg = _world(subject)
    pairs = _pairs(cfg, "bio", sizes.world_people)
    people: dict[str, Person] = {p.name: p for p in generate_people(cfg)}
    gold = {name: set(person_biographies(people[name], cfg)) for name in {p.person for p in pairs}}

    def scorer(index: int, text: str) -> dict[str, float]:
        name = pairs[index].person
        scores = fact_scores(text, people[name])
        return {"fact_recall": scores["fact_recall"], "fact_precision": scores["fact_precision"],
                "exact_match": float(text.strip() in gold[name])}

    windows = subject.run.eval.long_windows(trained_block_size(subject.model))
    return Workload("world", _prompts(subject, pairs), long_answer_canvas(subject), scorer,
                    ("fact_recall", "fact_precision", "exact_match"), windows)


def qa_workload(subject: Subject, sizes: BenchSizes) -> Workload:
    """Reversed and attribute questions about up to `sizes.world_people` held-out people; scores
    `reversal_exact_match` and `heldout_exact_match`, each over its own items."""
    cfg = _world(subject)
    sets = [(name, pair) for name in QA_SETS for pair in _pairs(cfg, name, sizes.world_people)]

    def scorer(index: int, text: str) -> dict[str, float]:
        test_set, pair = sets[index]
        return {f"{test_set}_exact_match": float(text.strip() == pair.answer.strip())}

    return Workload("world", _prompts(subject, [p for _, p in sets]), short_answer_canvas(subject), scorer,
                    tuple(f"{s}_exact_match" for s in QA_SETS))


def qa_counts(subject: Subject, sizes: BenchSizes) -> dict[str, int]:
    """Items per test set of `qa_workload`."""
    return {name: len(_pairs(_world(subject), name, sizes.world_people)) for name in QA_SETS}
