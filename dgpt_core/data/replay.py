"""Pretraining text replayed during SFT, so the stored facts survive fine-tuning (issue 29).

SFT on question answering alone overwrites what pretraining stored: the tiny preset's SFT model
completed 0.39 of the cloze probes its pretrained model completed 0.89 of. Mixing a share of the
pretraining rows into the SFT rows keeps the plain-text objective alive (Allen-Zhu & Li's mixed
training; the replay of continual learning).
"""

from __future__ import annotations

from pathlib import Path

import datasets

REPLAY_SOURCE = "pretrain_replay"
"""The `source` of a replayed row in the mixed SFT dataset."""


def replay_count(sft_rows: int, fraction: float) -> int:
    """Pretraining rows to add to `sft_rows` SFT rows so that `fraction` of the mix is replay."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    return round(sft_rows * fraction / (1.0 - fraction))


def pretrain_split_beside(sft_dataset_dir: str | Path) -> Path:
    """The pretraining dataset the data stage wrote beside the SFT one (`<data stage>/pretrain`)."""
    path = Path(sft_dataset_dir).parent / "pretrain"
    if not (path / "dataset_dict.json").exists():
        raise FileNotFoundError(f"SFT replay needs the data stage's pretraining split: {path} is not a saved "
                                "dataset (enable data.pretrain, or set sft.pretrain_replay: 0)")
    return path


def pieces(rows: list[list[int]], tokens: int | None) -> list[list[int]]:
    """Every row cut into consecutive pieces of at most `tokens` tokens (None: the rows as they are)."""
    if tokens is None:
        return [list(r) for r in rows]
    return [list(r[i : i + tokens]) for r in rows for i in range(0, len(r), tokens)]


def replayed_pieces(pretrain: datasets.Dataset, count: int, tokens: int | None) -> list[list[int]]:
    """The first `count` pieces of `pretrain`'s rows in order, cycling through them when more are
    needed; only the rows that supply pieces are read (a production pretraining split is large)."""
    out: list[list[int]] = []
    while len(out) < count:
        before = len(out)
        for row in pretrain:
            out += pieces([row["input_ids"]], tokens)
            if len(out) >= count:
                break
        if len(out) == before:
            raise ValueError("SFT replay: the pretraining split has no tokens")
    return out[:count]


def with_replay(sft: datasets.Dataset, pretrain: datasets.Dataset, fraction: float, seed: int,
                tokens: int | None = None) -> datasets.Dataset:
    """`sft` plus `replay_count(len(sft), fraction)` pieces of pretraining rows (each row cut into
    pieces of at most `tokens` tokens: short pieces batch at the cost of SFT rows, where a
    block-causal SFT doubles every row) in a seeded order, cycled when more are needed than there
    are, each scored on every token (no prompt); the trainer's sampler mixes them in.

    The replayed rows carry the SFT columns: `eligible_mask` all ones, `source` REPLAY_SOURCE and
    empty values for any other column."""
    count = replay_count(len(sft), fraction)
    if count == 0:
        return sft
    rows = replayed_pieces(pretrain.shuffle(seed=seed), count, tokens)
    extra = {name: [""] * count for name in sft.column_names if name not in ("input_ids", "eligible_mask", "source")}
    replay = datasets.Dataset.from_dict({
        "input_ids": rows, "eligible_mask": [[1] * len(r) for r in rows],
        "source": [REPLAY_SOURCE] * count, **extra,
    }).cast(sft.features)
    return datasets.concatenate_datasets([sft, replay])
