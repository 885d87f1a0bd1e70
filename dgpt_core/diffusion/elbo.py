"""The MDLM ELBO bound on -log p(target tokens | the other tokens of a row), repeatable from a seed.

`E_t[w(t) * sum over masked targets of -log p(x0 | x_t)]` on a fixed stratified grid of t values
(midpoints of equal strata of [eps, 1]) with `mask_draws` seeded Bernoulli(1 - alpha(t)) masks per
t (REFERENCE.md section 1). Only target positions are ever masked; everything else in the row is
visible context. Every row draws its masks from its own generator seeded by the caller, so a number
does not depend on how rows are batched or ordered, and a rerun gives the identical value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from ..generation.schedules import NoiseSchedule
from .blocks import masked_logits
from .loss import token_nll


@dataclass(frozen=True)
class Row:
    """One scored sequence: token ids and the positions whose likelihood is estimated."""

    ids: list[int]
    targets: list[int]
    """Indices into `ids` that are noised and scored."""


@dataclass(frozen=True)
class Variant:
    """One noised copy of a row: which positions are masked and the weight of their summed NLL."""

    row: int
    masked: torch.Tensor
    """Absolute positions replaced by the mask token and scored."""
    coeff: float
    hidden: torch.Tensor | None = None
    """Context positions also replaced by the mask token, not scored (d1's random prompt mask)."""


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def t_grid(points: int, eps: float) -> torch.Tensor:
    """Midpoints of `points` equal strata of [eps, 1] (float64)."""
    k = torch.arange(points, dtype=torch.float64)
    return eps + (1.0 - eps) * (k + 0.5) / points


def elbo_variants(
    rows: Sequence[Row], seeds: Sequence[int], schedule: NoiseSchedule, t_points: int, mask_draws: int
) -> list[Variant]:
    """The masked copies of every row the ELBO averages over: `mask_draws` seeded masks per t of
    the grid, each weighted w(t) / (t_points * mask_draws); copies that mask nothing are dropped."""
    t = t_grid(t_points, schedule.eps)
    p = schedule.mask_prob(t).clamp(0.0, 1.0)
    w = schedule.weight(t)
    out: list[Variant] = []
    for r, (row, seed) in enumerate(zip(rows, seeds)):
        targets = torch.as_tensor(row.targets, dtype=torch.long)
        if not len(targets):
            continue
        gen = torch.Generator().manual_seed(int(seed))
        u = torch.rand((t_points, mask_draws, len(targets)), generator=gen, dtype=torch.float64)
        masked = u < p[:, None, None]
        for k in range(t_points):
            coeff = float(w[k]) / (t_points * mask_draws)
            for m in range(mask_draws):
                if bool(masked[k, m].any()):
                    out.append(Variant(r, targets[masked[k, m]], coeff))
    return out


def masked_token_nll(
    model: torch.nn.Module,
    rows: Sequence[Row],
    variants: Sequence[Variant],
    mask_id: int,
    pad_id: int,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p at every masked position of every variant given the rest of its row, in one forward
    (float64, on the model's device, differentiable), and (variant, position) of each, row-major.
    A block-causal model (`block_size`) scores each block of a row's targets given the clean
    earlier ones (`blocks.masked_logits`)."""
    device = next(model.parameters()).device
    width = max(len(rows[v.row].ids) for v in variants)
    ids = torch.full((len(variants), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(variants), width), dtype=torch.long)
    positions = torch.zeros((len(variants), width), dtype=torch.bool)
    eligible = torch.zeros_like(positions)
    hidden = torch.zeros_like(positions)
    for i, v in enumerate(variants):
        row = rows[v.row]
        ids[i, : len(row.ids)] = torch.as_tensor(row.ids, dtype=torch.long)
        attn[i, : len(row.ids)] = 1
        positions[i, v.masked] = True
        eligible[i, row.targets] = True
        if v.hidden is not None:
            hidden[i, v.hidden] = True
    targets = ids[positions]
    clean = ids.clone()
    ids[positions | hidden] = mask_id
    logits = masked_logits(model, ids.to(device), clean.to(device), attn.to(device), eligible.to(device),
                           positions.to(device), block_size, pad_id)
    return token_nll(logits, targets.to(device), mask_id).double(), positions.nonzero().to(device)


def variant_nll(
    model: torch.nn.Module,
    rows: Sequence[Row],
    variants: Sequence[Variant],
    mask_id: int,
    pad_id: int,
    block_size: int | None = None,
) -> torch.Tensor:
    """Per variant, the summed -log p at its masked positions (`masked_token_nll`, summed)."""
    nll, where = masked_token_nll(model, rows, variants, mask_id, pad_id, block_size)
    return torch.zeros(len(variants), dtype=torch.float64, device=nll.device).index_add(0, where[:, 0], nll)


def weighted_row_nll(
    model: torch.nn.Module,
    rows: Sequence[Row],
    variants: Sequence[Variant],
    mask_id: int,
    pad_id: int,
    block_size: int | None = None,
) -> torch.Tensor:
    """Per row (len(rows),), the sum over its variants of coeff * their summed -log p, in one
    forward (differentiable)."""
    nll = variant_nll(model, rows, variants, mask_id, pad_id, block_size)
    coeff = torch.tensor([v.coeff for v in variants], dtype=torch.float64, device=nll.device)
    which = torch.tensor([v.row for v in variants], device=nll.device)
    return torch.zeros(len(rows), dtype=torch.float64, device=nll.device).index_add(0, which, nll * coeff)


@torch.no_grad()
def score_variants(
    model: torch.nn.Module,
    rows: Sequence[Row],
    variants: list[Variant],
    mask_id: int,
    pad_id: int,
    batch_size: int,
    block_size: int | None = None,
) -> list[float]:
    """Per row, the sum over its variants of coeff * (sum of -log p at the masked positions), so
    for a block-causal model the sum bounds -log p(targets | context) block by block. The model
    runs in eval mode, `batch_size` variants per forward; its train/eval mode is restored after."""
    totals = torch.zeros(len(rows), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(variants), batch_size):
            totals += weighted_row_nll(model, rows, variants[start : start + batch_size], mask_id, pad_id,
                                       block_size).cpu()
    finally:
        model.train(was_training)
    return totals.tolist()


def elbo_nll(
    model: torch.nn.Module,
    rows: Sequence[Row],
    seeds: Sequence[int],
    *,
    mask_id: int,
    pad_id: int,
    schedule: NoiseSchedule,
    t_points: int,
    mask_draws: int,
    batch_size: int,
    block_size: int | None = None,
) -> list[float]:
    """Per row, the ELBO bound on -log p(targets | rest) in nats (summed over the targets). The
    estimator settings have no defaults here: the eval's come from EvalConfig (ppl_t_points,
    ppl_mask_draws, batch_size), training's validation from its stage config."""
    variants = elbo_variants(rows, seeds, schedule, t_points, mask_draws)
    return score_variants(model, rows, variants, mask_id, pad_id, batch_size, block_size)


def dataset_rows(dataset: datasets.Dataset, max_sequences: int) -> list[Row]:
    """Rows of the first `max_sequences` examples of a tokenized split: the targets are the
    eligible positions (`eligible_mask`, as SFT examples carry) or else every token."""
    subset = dataset.select(range(min(max_sequences, len(dataset))))
    masks = subset["eligible_mask"] if "eligible_mask" in subset.column_names else None
    rows = []
    for i, ids in enumerate(subset["input_ids"]):
        targets = [p for p, m in enumerate(masks[i]) if m] if masks is not None else list(range(len(ids)))
        rows.append(Row(list(ids), targets))
    return rows


def elbo_per_token(
    model: torch.nn.Module,
    rows: Sequence[Row],
    *,
    mask_id: int,
    pad_id: int,
    schedule: NoiseSchedule,
    t_points: int,
    batch_size: int,
    block_size: int | None = None,
) -> float:
    """The ELBO in nats per target token, pooled over `rows`: one mask per t of the grid, seeded
    by each row's ids, so the same model and rows always give the same number."""
    seeds = [stable_seed("val_elbo", *row.ids) for row in rows]
    nll = elbo_nll(model, rows, seeds, mask_id=mask_id, pad_id=pad_id, schedule=schedule,
                   t_points=t_points, mask_draws=1, batch_size=batch_size, block_size=block_size)
    return sum(nll) / max(sum(len(row.targets) for row in rows), 1)
