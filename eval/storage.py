"""Knowledge storage probe: does the pretrained model complete a person's facts?

Each cloze probe (`dgpt_core.data.world.ClozeProbe`) is a plain-text prefix of a biography
sentence (" Anna Smith was born in the city of") and the value that follows (" Cairo"). The
prompt is tokenized as the pretraining text is (`dgpt_core.data.pretrain`: no special tokens
added by the tokenizer, `<|endoftext|>` after every document), so it starts with the end-of-text
token that precedes a biography in the packed pretraining stream. As many masks as the value has
tokens follow (the gold length: a storage probe, not a generation test), and the project's
sampler fills them greedily, one token per step, most confident position first. Scored: exact
match of the whole value and per-token accuracy, overall and per attribute, beside two chance
levels per attribute (one over the distinct values, and the majority value's share) so storage
can be told from guessing.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from dgpt_core.data.world import ClozeProbe
from dgpt_core.generation.sampler import SamplerConfig, TokenIds, generate


def encode_probe(tokenizer: Any, probe: ClozeProbe) -> tuple[list[int], list[int]]:
    """(prompt ids with the preceding end-of-text token, value ids), as in the pretraining text."""
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    prompt = tokenizer(probe.prompt, add_special_tokens=False)["input_ids"]
    value = tokenizer(probe.value, add_special_tokens=False)["input_ids"]
    return [eos, *prompt], list(value)


STORAGE_METHOD = "confidence (gold length)"
"""How the probe decodes, as its answer rows name it (`probe_sampler`)."""


def probe_sampler(length: int, seed: int = 0) -> SamplerConfig:
    """Greedy confidence decoding of a `length`-token canvas, one token per step, no stop tokens."""
    return SamplerConfig(strategy="confidence", steps=length, max_new_tokens=length, temperature=0.0,
                         stop_token_ids=(), seed=seed)


def predict_values(
    model: torch.nn.Module, tokenizer: Any, probes: Sequence[ClozeProbe], *, batch_size: int = 64, seed: int = 0,
) -> tuple[list[list[int]], list[list[int]]]:
    """(predicted ids, gold ids) per probe, in the probes' order; batches hold one value length."""
    ids = TokenIds.from_tokenizer(tokenizer)
    encoded = [encode_probe(tokenizer, p) for p in probes]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, (_, value) in enumerate(encoded):
        by_length[len(value)].append(i)
    predicted: list[list[int]] = [[] for _ in probes]
    for length, rows in sorted(by_length.items()):
        if length == 0:
            continue
        cfg = probe_sampler(length, seed)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            result = generate(model, [encoded[i][0] for i in chunk], ids, cfg)
            out = result.canvas[:, result.prompt_width :].tolist()
            for i, row in zip(chunk, out):
                predicted[i] = row
    return predicted, [value for _, value in encoded]


def chance_levels(probes: Sequence[ClozeProbe]) -> dict[str, dict[str, float]]:
    """Per attribute: `uniform` (1 / distinct values among the probes) and `majority` (the share of
    the most common value: what always answering it would score)."""
    values: dict[str, list[str]] = defaultdict(list)
    for p in probes:
        values[p.attribute].append(p.answer)
    return {attr: {"uniform": 1.0 / len(set(vals)), "majority": Counter(vals).most_common(1)[0][1] / len(vals)}
            for attr, vals in values.items()}


def score_predictions(
    probes: Sequence[ClozeProbe], predicted: Sequence[Sequence[int]], gold: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """Exact match of whole values and per-token accuracy, overall and per attribute, with chance.

    Returns {"cloze_accuracy", "token_accuracy", "n", "tokens", "per_attribute": {attr:
    {"cloze_accuracy", "token_accuracy", "n", "tokens", "chance_uniform", "chance_majority"}}}.
    `token_accuracy` is over tokens (long values weigh more); empty input scores 0 with n = 0.
    """
    if not len(probes) == len(predicted) == len(gold):
        raise ValueError(f"{len(probes)} probes, {len(predicted)} predictions, {len(gold)} gold values")
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # exact, n, right tokens, tokens
    for probe, pred, want in zip(probes, predicted, gold):
        right = sum(int(a == b) for a, b in zip(pred, want))
        for key in (probe.attribute, "__all__"):
            s = sums[key]
            s[0] += int(list(pred) == list(want))
            s[1] += 1
            s[2] += right
            s[3] += len(want)

    def rates(s: list[int]) -> dict[str, Any]:
        return {"cloze_accuracy": s[0] / s[1] if s[1] else 0.0, "token_accuracy": s[2] / s[3] if s[3] else 0.0,
                "n": s[1], "tokens": s[3]}

    chance = chance_levels(probes)
    per_attribute = {}
    for attr in dict.fromkeys(p.attribute for p in probes):
        per_attribute[attr] = {**rates(sums[attr]), "chance_uniform": chance[attr]["uniform"],
                               "chance_majority": chance[attr]["majority"]}
    return {**rates(sums["__all__"]), "per_attribute": per_attribute}


def cloze_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    probes: Sequence[ClozeProbe],
    *,
    batch_size: int = 64,
    seed: int = 0,
    samples: int = 0,
) -> dict[str, Any]:
    """Storage probe of `model` on `probes` (see the module docstring and `score_predictions` for
    the keys); with `samples` > 0 also "samples": the first that many probes as {person,
    attribute, prompt, gold, predicted} texts."""
    predicted, gold = predict_values(model, tokenizer, probes, batch_size=batch_size, seed=seed)
    out = score_predictions(probes, predicted, gold)
    if samples:
        out["samples"] = [
            {"person": p.person, "attribute": p.attribute, "prompt": p.prompt, "gold": p.value,
             "predicted": tokenizer.decode(pred, skip_special_tokens=False)}
            for p, pred in list(zip(probes, predicted))[:samples]
        ]
    return out
