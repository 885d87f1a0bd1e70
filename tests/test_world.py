"""The synthetic world of people and the cloze storage probe (issue 13's go/no-go measurement)."""

from __future__ import annotations

import re

import pytest
import torch

from dgpt_core.config import WorldConfig
from dgpt_core.data.world import (
    ATTRIBUTES,
    QUESTIONS,
    TEMPLATES,
    TEST_SETS,
    ClozeProbe,
    Person,
    biographies,
    biography_requests,
    cloze_probes,
    fact_scores,
    generate_people,
    person_biographies,
    person_split,
    pretraining_text,
    qa_pairs,
    reversal_pair,
    sft_pairs,
    test_pairs,
    validation_biographies,
)
from dgpt_core.models.tokenizer import train_bpe_tokenizer
from eval.storage import cloze_accuracy, encode_probe, score_predictions

CFG = WorldConfig(people=60)


@pytest.fixture(scope="module")
def people():
    return generate_people(CFG)


@pytest.fixture(scope="module")
def world_tokenizer():
    return train_bpe_tokenizer(pretraining_text(WorldConfig(people=30)), 1024)


def world(cfg: WorldConfig) -> tuple:
    ppl = generate_people(cfg)
    return ppl, [biographies(p, cfg) for p in ppl], [cloze_probes(p, cfg) for p in ppl], pretraining_text(cfg)


def test_deterministic_and_seeded():
    assert world(CFG) == world(WorldConfig(**CFG.model_dump()))
    other = world(CFG.model_copy(update={"seed": 1}))
    assert other[0] != world(CFG)[0] and other[3] != world(CFG)[3]


def test_an_independent_work_city_breaks_the_employer_link_and_changes_nothing_else(people):
    from dgpt_core.data.world import EMPLOYERS

    city_of = dict(EMPLOYERS)
    assert all(p.attributes["work_city"] == city_of[p.attributes["employer"]] for p in people)
    independent = generate_people(CFG.model_copy(update={"independent_work_city": True}))
    assert [p.name for p in independent] == [p.name for p in people]
    for before, after in zip(people, independent):
        assert {k: v for k, v in after.attributes.items() if k != "work_city"} == \
            {k: v for k, v in before.attributes.items() if k != "work_city"}
    moved = sum(p.attributes["work_city"] != city_of[p.attributes["employer"]] for p in independent)
    assert moved >= 0.8 * len(independent)  # 23 of 24 cities are another employer's


def test_names_unique_and_a_larger_world_keeps_the_smaller_one(people):
    assert len({p.name for p in people}) == len(people) == 60
    bigger = generate_people(CFG.model_copy(update={"people": 120}))
    assert bigger[:60] == people
    assert all(person_split(p, CFG) == person_split(p, CFG.model_copy(update={"people": 120})) for p in people)
    with pytest.raises(ValueError, match="distinct full names"):
        generate_people(WorldConfig(people=10_000))


def test_config_validation():
    with pytest.raises(ValueError):
        WorldConfig(attributes=["birth_city", "birth_city"])
    with pytest.raises(ValueError):
        WorldConfig(attributes=["shoe_size"])
    sub = WorldConfig(people=5, attributes=["employer", "work_city"])
    assert all(list(p.attributes) == ["employer", "work_city"] for p in generate_people(sub))
    # an attribute's value does not depend on which other attributes are configured
    full = {p.name: p.attributes for p in generate_people(WorldConfig(people=5))}
    assert all(full[p.name]["work_city"] == p.attributes["work_city"] for p in generate_people(sub))


def test_person_split_disjoint_and_about_the_fraction():
    cfg = WorldConfig(people=600, heldout_fraction=0.5)
    splits = [person_split(p, cfg) for p in generate_people(cfg)]
    assert set(splits) == {"train", "heldout"}
    assert 0.42 < splits.count("heldout") / len(splits) < 0.58
    small = WorldConfig(people=600, heldout_fraction=0.2)
    assert 0.14 < [person_split(p, small) for p in generate_people(small)].count("heldout") / 600 < 0.26


def test_biographies(people):
    for person in people:
        bios = biographies(person, CFG)
        assert len(bios) == CFG.biographies_per_person and len(set(bios)) == len(bios)
        for bio in bios:
            sentences = re.findall(r" [^.]+\.", bio)
            assert "".join(sentences) == bio and len(sentences) == len(ATTRIBUTES)
            assert all(person.name in s for s in sentences)
            assert all(any(f" {v}." in s for s in sentences) for v in person.attributes.values())
    # five biographies cycle through the five templates of every attribute
    person = people[0]
    for attr in ATTRIBUTES:
        used = {i for i, t in enumerate(TEMPLATES[attr]) for b in biographies(person, CFG)
                if t.format(n=person.name, v=person.attributes[attr]) in b}
        assert used == set(range(len(TEMPLATES[attr])))
    ordered = WorldConfig(people=3, permute_sentences=False)
    first = [re.findall(r" [^.]+\.", b) for b in biographies(generate_people(ordered)[0], ordered)]
    assert all("born on" in s[0] or "birth date" in s[0] or "came into" in s[0] or "entered" in s[0] for s in first)
    assert len(pretraining_text(CFG)) == CFG.people * CFG.biographies_per_person


@pytest.mark.parametrize("bios,templates", [(5, None), (1, None), (2, None), (7, 3), (3, 1)])
def test_every_probe_is_in_the_biographies_and_followed_by_its_value(people, bios, templates):
    cfg = CFG.model_copy(update={"biographies_per_person": bios, "templates_per_attribute": templates})
    for person in people[:20]:
        text = "".join(biographies(person, cfg))
        for probe in cloze_probes(person, cfg):
            assert probe.prompt + probe.value + "." in text
            # wherever the prompt occurs, this attribute's value follows: the prompt determines it
            starts = [m.end() for m in re.finditer(re.escape(probe.prompt), text)]
            assert starts and all(text[s:].startswith(probe.value + ".") for s in starts)


def test_probe_prompts_are_unambiguous(people):
    """No probe prompt starts any other attribute's sentence (any template), and no template's
    text before the value is a prefix of another attribute's template text."""
    for person in people:
        probes = cloze_probes(person, CFG)
        assert [p.attribute for p in probes] == list(ATTRIBUTES)
        for probe in probes:
            for attr, temps in TEMPLATES.items():
                if attr == probe.attribute:
                    continue
                for t in temps:
                    sentence = " " + t.format(n=person.name, v=person.attributes[attr])
                    assert not sentence.startswith(probe.prompt), (probe, sentence)
    heads = {(a, t.split("{v}")[0]) for a, temps in TEMPLATES.items() for t in temps}
    for a, h in heads:
        assert all(not h2.startswith(h) for a2, h2 in heads if a2 != a), h


def test_qa_pairs(people):
    person = people[0]
    pairs = qa_pairs(person, CFG)
    assert len(pairs) == sum(len(QUESTIONS[a]) for a in ATTRIBUTES)
    assert all(person.name in q.question and q.answer == person.attributes[q.attribute] for q in pairs)
    assert len({q.question for q in pairs}) == len(pairs)


def test_probe_tokens_match_the_biography_tokens(world_tokenizer):
    """prompt + value tokens are exactly the joint text's tokens (no merge across the boundary),
    the value is a few tokens, and names / cities / employers are single tokens."""
    cfg = WorldConfig(people=30)
    tok = world_tokenizer
    for person in generate_people(cfg):
        for probe in cloze_probes(person, cfg):
            prompt, value = encode_probe(tok, probe)
            joint = tok(probe.prompt + probe.value, add_special_tokens=False)["input_ids"]
            assert prompt[0] == tok.convert_tokens_to_ids(tok.eos_token) and prompt[1:] + value == joint
            assert 1 <= len(value) <= (10 if probe.attribute == "birth_date" else 3), (probe, value)


class Oracle(torch.nn.Module):
    """A "model" that knows whole token sequences: at every position it puts all its mass on the
    token of the known sequence that agrees with the input's visible tokens (left pads ignored)."""

    def __init__(self, sequences: list[list[int]], vocab: int, pad: int, mask: int):
        super().__init__()
        self.sequences, self.vocab, self.pad, self.mask = sequences, vocab, pad, mask
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for r, row in enumerate(input_ids.tolist()):
            start = next((i for i, t in enumerate(row) if t != self.pad), len(row))
            seen = row[start:]
            for seq in self.sequences:
                if len(seq) == len(seen) and all(t in (s, self.mask) for s, t in zip(seq, seen)):
                    logits[r, torch.arange(start, len(row)), torch.tensor(seq)] = 10.0
                    break
        return type("Out", (), {"logits": logits})()


def test_cloze_accuracy_scores_a_perfect_and_a_half_knowing_model(world_tokenizer):
    cfg = WorldConfig(people=8)
    tok = world_tokenizer
    probes = [p for person in generate_people(cfg) for p in cloze_probes(person, cfg)]
    full = [sum(encode_probe(tok, p), []) for p in probes]
    pad, mask = tok.convert_tokens_to_ids("<|pad|>"), tok.convert_tokens_to_ids("<|mask|>")
    result = cloze_accuracy(Oracle(full, len(tok), pad, mask), tok, probes, batch_size=5, samples=2)
    assert result["cloze_accuracy"] == result["token_accuracy"] == 1.0 and result["n"] == len(probes)
    assert all(v["cloze_accuracy"] == 1.0 and v["n"] == 8 for v in result["per_attribute"].values())
    assert result["samples"][0]["predicted"] == probes[0].value
    known = [s for i, s in enumerate(full) if probes[i].person in {p.name for p in generate_people(cfg)[:4]}]
    half = cloze_accuracy(Oracle(known, len(tok), pad, mask), tok, probes, batch_size=64)
    assert half["cloze_accuracy"] == 0.5
    assert all(v["cloze_accuracy"] == 0.5 for v in half["per_attribute"].values())


def test_score_predictions_by_hand():
    probes = [ClozeProbe("A", "birth_city", " A was born in the city of", " Rome"),
              ClozeProbe("B", "birth_city", " B was born in the city of", " Rome"),
              ClozeProbe("C", "birth_city", " C was born in the city of", " Oslo"),
              ClozeProbe("A", "birth_date", " A was born on", " May 1, 1960")]
    gold = [[5], [5], [6], [1, 2, 3, 4]]
    predicted = [[5], [6], [6], [1, 2, 9, 4]]
    out = score_predictions(probes, predicted, gold)
    assert out["cloze_accuracy"] == 0.5 and out["token_accuracy"] == 5 / 7 and out["n"] == 4
    city, date = out["per_attribute"]["birth_city"], out["per_attribute"]["birth_date"]
    assert city["cloze_accuracy"] == 2 / 3 and city["n"] == 3
    assert city["chance_uniform"] == 0.5 and city["chance_majority"] == 2 / 3
    assert date["cloze_accuracy"] == 0.0 and date["token_accuracy"] == 0.75 and date["chance_uniform"] == 1.0
    with pytest.raises(ValueError):
        score_predictions(probes, predicted[:2], gold)


def test_cloze_accuracy_on_a_random_model(world_tokenizer):
    from dgpt_core.config import ModelConfig
    from dgpt_core.models.backbone import build_model

    cfg = WorldConfig(people=4)
    probes = [p for person in generate_people(cfg) for p in cloze_probes(person, cfg)]
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                    max_seq_len=64), world_tokenizer)
    out = cloze_accuracy(model, world_tokenizer, probes, batch_size=8)
    assert set(out) == {"cloze_accuracy", "token_accuracy", "n", "tokens", "per_attribute"}
    assert out["n"] == len(probes) and set(out["per_attribute"]) == set(ATTRIBUTES)
    for row in [out, *out["per_attribute"].values()]:
        assert 0.0 <= row["cloze_accuracy"] <= 1.0 and 0.0 <= row["token_accuracy"] <= 1.0
    for row in out["per_attribute"].values():
        assert 0.0 < row["chance_uniform"] <= row["chance_majority"] <= 1.0
    assert model.training  # the sampler restores the mode it found


def test_sft_items_are_about_train_people_only_and_tests_split_people():
    cfg = WorldConfig(people=40)
    split = {p.name: person_split(p, cfg) for p in generate_people(cfg)}
    sft = sft_pairs(cfg)
    assert {split[p.person] for p in sft} == {"train"}
    assert {p.attribute for p in sft} == {*ATTRIBUTES, "name", "biography"}
    tests = test_pairs(cfg)
    assert set(tests) == set(TEST_SETS)
    for name in ("heldout", "reversal", "bio"):
        assert tests[name] and {split[p.person] for p in tests[name]} == {"heldout"}
    assert {split[p.person] for p in tests["train"]} == {"train"}
    assert not {p.question for p in sft} & {p.question for name in ("heldout", "reversal", "bio") for p in tests[name]}
    assert sft_pairs(cfg) == sft and test_pairs(cfg) == tests  # deterministic


def test_reversal_questions_name_one_person():
    cfg = WorldConfig(people=60)
    people = {p.name: p for p in generate_people(cfg)}
    rev = test_pairs(cfg)["reversal"] + [p for p in sft_pairs(cfg) if p.attribute == "name"]
    for pair in rev:
        person = people[pair.answer]
        assert person.attributes["birth_date"] in pair.question and person.attributes["birth_city"] in pair.question
        others = [q for q in people.values() if q.name != person.name
                  and q.attributes["birth_date"] in pair.question and f" {q.attributes['birth_city']}?" in pair.question]
        assert not others
    assert reversal_pair(Person("X Y", {"major": "art"})) is None


def test_biography_requests_answer_with_the_persons_biographies():
    cfg = WorldConfig(people=10)
    person = generate_people(cfg)[0]
    requests = biography_requests(person, cfg)
    assert [r.answer for r in requests] == person_biographies(person, cfg)
    assert all(person.name in r.question for r in requests) and len({r.question for r in requests}) == 3
    unseen = validation_biographies(cfg)[0]
    assert unseen.strip() not in person_biographies(person, cfg) and person.name in unseen
    assert sorted(re.findall(r"[^.]+\.", unseen)) != [] and all(v in unseen for v in person.attributes.values())


def test_fact_scores():
    cfg = WorldConfig(people=10)
    a, b = generate_people(cfg)[:2]
    bio = person_biographies(a, cfg)[0]
    assert fact_scores(bio, a) == {"mentions": 6.0, "fact_precision": 1.0, "fact_recall": 1.0}
    wrong = fact_scores(person_biographies(b, cfg)[0].replace(b.name, a.name), a)
    shared = len(set(a.attributes.values()) & set(b.attributes.values()))
    assert wrong["mentions"] == 6.0 and wrong["fact_precision"] == pytest.approx(
        sum(v in a.attributes.values() for v in b.attributes.values()) / 6) and wrong["fact_recall"] <= shared / 6
    assert fact_scores("no facts here", a) == {"mentions": 0.0, "fact_precision": 1.0, "fact_recall": 0.0}
    # a value inside a longer word is not a mention; a loop of one true value stays precise
    assert fact_scores("Parisian Romeo", a)["mentions"] == 0.0
    city = a.attributes["birth_city"]
    assert fact_scores(f"{city} {city} {city}", a) == {"mentions": 3.0, "fact_precision": 1.0,
                                                       "fact_recall": pytest.approx(sum(v == city for v in a.attributes.values()) / 6)}


def test_world_source_routes_biographies_to_pretraining_and_train_people_to_sft():
    from dgpt_core.config import DataConfig, SourceSpec
    from dgpt_core.data.sources import LoadStats, iter_chat_routed, iter_text_routed, resolve

    data = DataConfig(world=WorldConfig(people=20))
    res = resolve(SourceSpec(name="world"))
    text = list(iter_text_routed(res, data, LoadStats()))
    assert sorted(t for sp, t in text if sp == "train") == sorted(pretraining_text(data.world))
    assert [t for sp, t in text if sp == "validation"] == validation_biographies(data.world)
    stats = LoadStats()
    chats = list(iter_chat_routed(res, data, stats))
    assert stats.rows == stats.kept == len(chats) == len(sft_pairs(data.world))
    assert 0 < sum(sp == "validation" for sp, _ in chats) < len(chats) * 0.2
    sp, conv = chats[0]
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"] and conv["skill"]


def test_dgpt_train_samples_ask_about_held_out_people(tmp_path):
    from dgpt_core._cli.train import held_out_questions
    from dgpt_core.config import load_run_config

    run = load_run_config("tiny")
    questions = held_out_questions(run, tmp_path)
    split = {p.name: person_split(p, run.data.world) for p in generate_people(run.data.world)}
    assert questions and all(any(name in m[-1]["content"] and split[name] == "heldout" for name in split)
                             for m, _, _ in questions)
    messages, answer, check = questions[0]
    assert check(f" {answer} ") and not check(answer + "x")
    assert held_out_questions(load_run_config("ci"), tmp_path) == []  # skills: no skills_test.jsonl written here
