"""The GPT-2 baseline measured on the synthetic world as the eval suite measures ours: storage on
every cloze probe (greedy, the value's gold length: `eval.storage`'s probe) and exact match on
every question of the eval's test sets (`dgpt_core.data.world.test_pairs`), greedy with the KV
cache on the trained answer canvas; the biography requests of held-out people on the eval's
long-answer canvas, scored by the facts they state (`fact_scores`)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformers import GPT2LMHeadModel

from dgpt_core.data.world import cloze_probes, fact_scores, generate_people, test_pairs
from dgpt_core.generation.sampler import TokenIds
from eval.storage import encode_probe, score_predictions

from .baseline import ar_decoder
from .common import Subject, Workload, encode_chat
from .sample import decode_items
from .world import long_answer_canvas, short_answer_canvas

BATCH = 64


@torch.inference_mode()
def ar_storage(model: GPT2LMHeadModel, subject: Subject) -> float:
    """Cloze accuracy of `model` on every person's probes. Batches hold one prompt length and one
    value length, so no row is padded (GPT-2's positions are absolute)."""
    cfg = subject.world
    assert cfg is not None, "the run's data is not the world"
    probes = [p for person in generate_people(cfg) for p in cloze_probes(person, cfg)]
    encoded = [encode_probe(subject.tokenizer, p) for p in probes]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (prompt, value) in enumerate(encoded):
        groups[len(prompt), len(value)].append(i)
    predicted: list[list[int]] = [[] for _ in probes]
    for (width, length), rows in groups.items():
        for start in range(0, len(rows), BATCH):
            chunk = rows[start : start + BATCH]
            ids = torch.tensor([encoded[i][0] for i in chunk])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                 min_new_tokens=length, do_sample=False, pad_token_id=subject.tokenizer.pad_token_id)
            for i, row in zip(chunk, out[:, width:].tolist()):
                predicted[i] = row
    return score_predictions(probes, predicted, [value for _, value in encoded])["cloze_accuracy"]


def ar_exact_match(model: GPT2LMHeadModel, subject: Subject) -> dict[str, dict[str, Any]]:
    """Per test set (held-out, train, reversed questions): exact match of the stripped answer and
    the item count."""
    cfg = subject.world
    assert cfg is not None, "the run's data is not the world"
    canvas = short_answer_canvas(subject)
    decoder = ar_decoder(model, TokenIds.from_tokenizer(subject.tokenizer), canvas)
    out = {}
    sets = test_pairs(cfg)
    for name in ("heldout", "train", "reversal"):
        pairs = sets[name]
        prompts = [encode_chat(subject.tokenizer, [{"role": "user", "content": p.question}]) for p in pairs]

        def scorer(index: int, text: str, pairs: list = pairs) -> dict[str, float]:
            return {"exact_match": float(text.strip() == pairs[index].answer.strip())}

        outcome = decode_items(Workload("world", prompts, canvas, scorer, ("exact_match",)), BATCH, decoder,
                               subject.tokenizer)
        out[name] = {"exact_match": outcome.scores["exact_match"], "n": len(pairs)}
    return out


def ar_biographies(model: GPT2LMHeadModel, subject: Subject) -> dict[str, float]:
    """Mean fact recall and precision of `model`'s biographies of the held-out people."""
    cfg = subject.world
    assert cfg is not None, "the run's data is not the world"
    people = {p.name: p for p in generate_people(cfg)}
    pairs = test_pairs(cfg)["bio"]
    prompts = [encode_chat(subject.tokenizer, [{"role": "user", "content": p.question}]) for p in pairs]

    def scorer(index: int, text: str) -> dict[str, float]:
        scores = fact_scores(text, people[pairs[index].person])
        return {"bio_fact_recall": scores["fact_recall"], "bio_fact_precision": scores["fact_precision"]}

    canvas = long_answer_canvas(subject)
    decoder = ar_decoder(model, TokenIds.from_tokenizer(subject.tokenizer), canvas)
    outcome = decode_items(Workload("world", prompts, canvas, scorer, ("bio_fact_recall",)), BATCH, decoder,
                           subject.tokenizer)
    return {key: outcome.scores[key] for key in ("bio_fact_recall", "bio_fact_precision")}
