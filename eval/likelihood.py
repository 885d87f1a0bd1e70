"""Likelihood estimates of a masked diffusion LM, repeatable from a seed.

Two estimators of -log p(target tokens | the other tokens of the row), both upper bounds in
expectation (REFERENCE.md section 1):

- `elbo_nll`: the MDLM ELBO, `E_t[w(t) * sum over masked targets of -log p(x0 | x_t)]`, on a fixed
  stratified grid of t values (midpoints of equal strata of [eps, 1]) with `mask_draws` seeded
  Bernoulli(1 - alpha(t)) masks per t;
- `mc_nll`: LLaDA's estimator, `E_l[(L / l) * sum over l masked targets of -log p]` with
  l ~ U{1..L} (stratified over the draws) and l positions drawn uniformly; one draw when L = 1.

Only target positions are ever masked; everything else in the row is visible context. Every row
draws its masks from its own generator seeded by the caller, so a number does not depend on how
rows are batched or ordered, and a rerun gives the identical value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dgpt_core.loss import token_nll
from dgpt_core.model import logits_at
from dgpt_core.schedules import NoiseSchedule


@dataclass(frozen=True)
class Row:
    """One scored sequence: token ids and the positions whose likelihood is estimated."""

    ids: list[int]
    targets: list[int]
    """Indices into `ids` that are noised and scored."""


@dataclass(frozen=True)
class _Variant:
    row: int
    masked: torch.Tensor
    """Absolute positions replaced by the mask token."""
    coeff: float


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def t_grid(points: int, eps: float) -> torch.Tensor:
    """Midpoints of `points` equal strata of [eps, 1] (float64)."""
    k = torch.arange(points, dtype=torch.float64)
    return eps + (1.0 - eps) * (k + 0.5) / points


def _elbo_variants(
    rows: Sequence[Row], seeds: Sequence[int], schedule: NoiseSchedule, t_points: int, mask_draws: int
) -> list[_Variant]:
    t = t_grid(t_points, schedule.eps)
    p = schedule.mask_prob(t).clamp(0.0, 1.0)
    w = schedule.weight(t)
    out: list[_Variant] = []
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
                    out.append(_Variant(r, targets[masked[k, m]], coeff))
    return out


def _mc_variants(rows: Sequence[Row], seeds: Sequence[int], mc_num: int) -> list[_Variant]:
    out: list[_Variant] = []
    for r, (row, seed) in enumerate(zip(rows, seeds)):
        targets = torch.as_tensor(row.targets, dtype=torch.long)
        n = len(targets)
        if n == 0:
            continue
        if n == 1:  # every draw masks the one token: one forward is exact
            out.append(_Variant(r, targets, 1.0))
            continue
        gen = torch.Generator().manual_seed(int(seed))
        u0 = float(torch.rand((), generator=gen, dtype=torch.float64))
        for d in range(mc_num):
            count = 1 + int(n * ((u0 + d / mc_num) % 1.0))
            chosen = torch.randperm(n, generator=gen)[:count]
            out.append(_Variant(r, targets[chosen.sort().values], (n / count) / mc_num))
    return out


@torch.inference_mode()
def _evaluate(
    model: torch.nn.Module,
    rows: Sequence[Row],
    variants: list[_Variant],
    mask_id: int,
    pad_id: int,
    batch_size: int,
) -> list[float]:
    """Sum over variants of coeff * (sum of -log p at the masked positions), per row."""
    totals = torch.zeros(len(rows), dtype=torch.float64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(variants), batch_size):
            chunk = variants[start : start + batch_size]
            width = max(len(rows[v.row].ids) for v in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            positions = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, v in enumerate(chunk):
                row = rows[v.row].ids
                ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
                attn[i, : len(row)] = 1
                positions[i, v.masked] = True
            targets = ids[positions]
            ids[positions] = mask_id
            logits = logits_at(model, ids.to(device), attn.to(device), positions.to(device))
            nll = token_nll(logits, targets.to(device), mask_id).double().cpu()
            which = positions.nonzero(as_tuple=True)[0]
            per_variant = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, which, nll)
            coeff = torch.tensor([v.coeff for v in chunk], dtype=torch.float64)
            rows_idx = torch.tensor([v.row for v in chunk], dtype=torch.long)
            totals.index_add_(0, rows_idx, per_variant * coeff)
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
    t_points: int = 16,
    mask_draws: int = 2,
    batch_size: int = 32,
) -> list[float]:
    """Per row, the ELBO bound on -log p(targets | rest) in nats (summed over the targets)."""
    variants = _elbo_variants(rows, seeds, schedule, t_points, mask_draws)
    return _evaluate(model, rows, variants, mask_id, pad_id, batch_size)


def mc_nll(
    model: torch.nn.Module,
    rows: Sequence[Row],
    seeds: Sequence[int],
    *,
    mask_id: int,
    pad_id: int,
    mc_num: int = 16,
    batch_size: int = 32,
) -> list[float]:
    """Per row, LLaDA's Monte-Carlo estimate of -log p(targets | rest) in nats."""
    return _evaluate(model, rows, _mc_variants(rows, seeds, mc_num), mask_id, pad_id, batch_size)


def split_windows(ctx: Sequence[int], cont: Sequence[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, piece) pairs that score every continuation token exactly once within max_len:
    one piece with the context cut from the left when it fits; otherwise pieces of max_len // 2
    tokens, each with as much preceding text as fits."""
    ctx, cont = list(ctx), list(cont)
    if len(cont) <= max_len:
        room = max_len - len(cont)
        return [(ctx[max(0, len(ctx) - room) :] if room else [], cont)]
    piece = max(1, max_len // 2)
    full, start, out = ctx + cont, len(ctx), []
    for s in range(0, len(cont), piece):
        a = start + s
        b = min(a + piece, len(full))
        room = max_len - (b - a)
        out.append((full[max(0, a - room) : a], full[a:b]))
    return out


def windows_to_rows(windows: list[tuple[list[int], list[int]]]) -> list[Row]:
    return [Row(c + p, list(range(len(c), len(c) + len(p)))) for c, p in windows]


@torch.inference_mode()
def greedy_matches(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mask_id: int,
    pad_id: int,
    never_ids: Sequence[int],
    max_len: int,
    batch_size: int = 32,
) -> list[bool]:
    """Whether greedy decoding of len(cont) masks after each context yields the continuation.

    Greedy = the sampler's `confidence` strategy at temperature 0 with one token per step: each
    step reveals the masked position whose argmax token is most probable. A row stops at its
    first step whose revealed token differs from the continuation (it cannot come back), so a
    wrong continuation costs one forward. `never_ids` (mask, pad, <|im_start|>, <|delete|>) are
    never predicted, as in the sampler.
    """
    flags = [False] * len(pairs)
    todo = [p for p, (_, cont) in enumerate(pairs) if 0 < len(cont) < max_len]
    device = next(model.parameters()).device
    never = torch.as_tensor(list(never_ids), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            seqs = []
            for p in batch:
                ctx, cont = list(pairs[p][0]), list(pairs[p][1])
                ctx = ctx[max(0, len(ctx) - (max_len - len(cont))) :]
                seqs.append((ctx, cont))
            width = max(len(c) + len(k) for c, k in seqs)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            target = torch.full_like(ids, -1)
            for i, (c, k) in enumerate(seqs):
                ids[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
                ids[i, len(c) : len(c) + len(k)] = mask_id
                target[i, len(c) : len(c) + len(k)] = torch.as_tensor(k, dtype=torch.long)
                attn[i, : len(c) + len(k)] = 1
            ids, attn, target = ids.to(device), attn.to(device), target.to(device)
            alive = torch.ones(len(batch), dtype=torch.bool, device=device)
            while True:
                masked = (ids == mask_id) & alive[:, None]
                if not bool(masked.any()):
                    break
                logits = logits_at(model, ids, attn, masked).float()
                logits.index_fill_(1, never, float("-inf"))
                conf, tok = logits.softmax(-1).max(-1)
                score = torch.full(ids.shape, -1.0, device=device)
                score[masked] = conf
                best = score.argmax(1)
                rows = masked.any(1).nonzero().squeeze(1)
                chosen = torch.zeros(ids.shape, dtype=torch.long, device=device)
                chosen[masked] = tok
                pick = chosen[rows, best[rows]]
                ok = pick == target[rows, best[rows]]
                ids[rows[ok], best[rows[ok]]] = pick[ok]
                alive[rows[~ok]] = False
            for i, p in enumerate(batch):
                flags[p] = bool(alive[i])
    finally:
        model.train(was_training)
    return flags
