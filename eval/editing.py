"""Editing metric: how well an SFT model repairs Seed Diffusion edit corruption of held-out answers.

Each held-out answer (its content tokens and its <|im_end|>; the end-of-text padding after it stays
clean) gets random-token swaps and spurious insertions (a random token other than the one it
precedes, or a copy of it: a duplicated word), as the training collator makes them. Nothing is
masked: one forward on the corrupted row, and the argmax (mask token excluded) at every answer-canvas position is compared with what the edit loss teaches
there: the original token at a swap, <|delete|> at an insertion, the token itself everywhere else.
Every row draws its corruption from its own seeded generator, so the numbers do not depend on
batching and a rerun gives identical values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dgpt_core.diffusion.elbo import stable_seed
from dgpt_core.models.backbone import logits_at

CONTEXT, CLEAN, SWAP, INSERT = -1, 0, 1, 2
"""Role of a position in a corrupted row: not scored (prompt), clean canvas, swapped, inserted."""


@dataclass(frozen=True)
class EditedRow:
    """A corrupted example: model input, per-position role and the prediction training teaches."""

    ids: list[int]
    roles: list[int]
    """CONTEXT, CLEAN, SWAP or INSERT per position."""
    targets: list[int]
    """Original token (CLEAN, SWAP), <|delete|> (INSERT); the input token at CONTEXT positions."""


def _answer_positions(ids: Sequence[int], eligible: Sequence[int], im_end_id: int | None) -> list[int]:
    """Eligible positions up to and including the first eligible <|im_end|> (all when there is none)."""
    canvas = [i for i, m in enumerate(eligible) if m]
    ends = [k for k, i in enumerate(canvas) if ids[i] == im_end_id]
    return canvas[: ends[0] + 1] if ends else canvas


def _other_token(original: int, draw: int, pool: Sequence[int]) -> int:
    """pool[draw], moved to the next pool entry when it equals `original` (uniform over the others)."""
    token = pool[draw]
    return pool[(draw + 1) % len(pool)] if token == original else token


def corrupt_example(
    ids: Sequence[int],
    eligible: Sequence[int],
    *,
    generator: torch.Generator,
    delete_id: int,
    im_end_id: int | None,
    replacement_ids: Sequence[int],
    swap_prob: float,
    insert_prob: float,
    max_len: int,
) -> EditedRow:
    """Swap and insert on the answer of one SFT example; the row grows by its insertions and is cut
    to max_len from its end (trailing padding first)."""
    answer = _answer_positions(ids, eligible, im_end_id)
    n, pool = len(answer), len(replacement_ids)
    swap = (torch.rand(n, generator=generator) < swap_prob).tolist()
    insert = (torch.rand(n, generator=generator) < insert_prob).tolist()
    copy = (torch.rand(n, generator=generator) < 0.5).tolist()
    swap_draw = torch.randint(0, pool, (n,), generator=generator).tolist()
    insert_draw = torch.randint(0, pool, (n,), generator=generator).tolist()
    slot = {pos: k for k, pos in enumerate(answer)}
    out_ids: list[int] = []
    roles: list[int] = []
    targets: list[int] = []
    for pos, token in enumerate(ids):
        k = slot.get(pos)
        visible, role = token, (CLEAN if eligible[pos] else CONTEXT)
        if k is not None and swap[k]:
            visible, role = _other_token(token, swap_draw[k], replacement_ids), SWAP
        if k is not None and insert[k]:
            out_ids.append(visible if copy[k] else _other_token(visible, insert_draw[k], replacement_ids))
            roles.append(INSERT)
            targets.append(delete_id)
        out_ids.append(visible)
        roles.append(role)
        targets.append(token)
    return EditedRow(out_ids[:max_len], roles[:max_len], targets[:max_len])


@torch.inference_mode()
def _predictions(
    model: torch.nn.Module, rows: Sequence[EditedRow], *, mask_id: int, pad_id: int, batch_size: int
) -> list[torch.Tensor]:
    """Argmax token (mask token excluded) at the canvas positions of each row, in row order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(r.ids) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            canvas = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, r in enumerate(chunk):
                ids[i, : len(r.ids)] = torch.as_tensor(r.ids, dtype=torch.long)
                attn[i, : len(r.ids)] = 1
                canvas[i, : len(r.ids)] = torch.as_tensor(r.roles) != CONTEXT
            logits = logits_at(model, ids.to(device), attn.to(device), canvas.to(device)).float()
            logits[:, mask_id] = float("-inf")
            preds = logits.argmax(dim=-1).cpu()
            out.extend(preds.split(canvas.sum(dim=1).tolist()))
    finally:
        model.train(was_training)
    return out


def _rate(hits: int, total: int) -> float:
    return hits / total if total else float("nan")


def editing_metrics(
    model: torch.nn.Module,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mask_id: int,
    delete_id: int,
    pad_id: int,
    im_end_id: int | None,
    replacement_ids: Sequence[int],
    swap_prob: float,
    insert_prob: float,
    seed: int,
    batch_size: int,
    max_len: int,
) -> dict[str, Any]:
    """Corrupt each example (input_ids, eligible_mask) and score one unmasked forward: swap_fix_rate
    (swaps predicted as their original token), delete_recall (insertions predicted <|delete|>),
    delete_precision (<|delete|> predictions that sit on insertions), false_edit_rate (clean canvas
    positions, padding included, predicted as another token), the counts and the settings."""
    pool = sorted(set(replacement_ids))
    rows = [
        corrupt_example(ids, mask, generator=torch.Generator().manual_seed(stable_seed("editing", seed, *ids)),
                        delete_id=delete_id, im_end_id=im_end_id, replacement_ids=pool, swap_prob=swap_prob,
                        insert_prob=insert_prob, max_len=max_len)
        for ids, mask in examples if any(mask)
    ]
    scored = [(role, target) for r in rows for role, target in zip(r.roles, r.targets) if role != CONTEXT]
    roles = torch.tensor([role for role, _ in scored], dtype=torch.long)
    targets = torch.tensor([target for _, target in scored], dtype=torch.long)
    preds = torch.cat([*_predictions(model, rows, mask_id=mask_id, pad_id=pad_id, batch_size=batch_size),
                       torch.zeros(0, dtype=torch.long)])
    swaps, inserts, clean = roles == SWAP, roles == INSERT, roles == CLEAN
    deletes = preds == delete_id
    return {
        "swap_fix_rate": _rate(int((swaps & (preds == targets)).sum()), int(swaps.sum())),
        "delete_recall": _rate(int((inserts & deletes).sum()), int(inserts.sum())),
        "delete_precision": _rate(int((inserts & deletes).sum()), int(deletes.sum())),
        "false_edit_rate": _rate(int((clean & (preds != targets)).sum()), int(clean.sum())),
        "swaps": int(swaps.sum()),
        "inserts": int(inserts.sum()),
        "clean": int(clean.sum()),
        "swap_prob": swap_prob,
        "insert_prob": insert_prob,
        "seed": seed,
        "examples": len(rows),
    }
