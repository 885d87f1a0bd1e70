"""Likelihood estimates of a masked diffusion LM, repeatable from a seed.

Two estimators of -log p(target tokens | the other tokens of the row), both upper bounds in
expectation (REFERENCE.md section 1):

- `dgpt_core.diffusion.elbo.elbo_nll`: the MDLM ELBO on a fixed stratified t grid with seeded masks (in the
  library: training uses it for its validation curve);
- `mc_nll`: LLaDA's estimator, `E_l[(L / l) * sum over l masked targets of -log p]` with
  l ~ U{1..L} (stratified over the draws) and l positions drawn uniformly; one draw when L = 1.

Only target positions are ever masked; everything else in the row is visible context. Every row
draws its masks from its own generator seeded by the caller, so a number does not depend on how
rows are batched or ordered, and a rerun gives the identical value. The estimators' settings
(mc_num, batch_size) have no defaults here: callers pass their EvalConfig's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dgpt_core.diffusion.blocks import block_ids, masked_logits
from dgpt_core.diffusion.elbo import Row, Variant, score_variants
from dgpt_core.generation.options import trained_block_size


def _mc_variants(rows: Sequence[Row], seeds: Sequence[int], mc_num: int) -> list[Variant]:
    out: list[Variant] = []
    for r, (row, seed) in enumerate(zip(rows, seeds)):
        targets = torch.as_tensor(row.targets, dtype=torch.long)
        n = len(targets)
        if n == 0:
            continue
        if n == 1:  # every draw masks the one token: one forward is exact
            out.append(Variant(r, targets, 1.0))
            continue
        gen = torch.Generator().manual_seed(int(seed))
        u0 = float(torch.rand((), generator=gen, dtype=torch.float64))
        for d in range(mc_num):
            count = 1 + int(n * ((u0 + d / mc_num) % 1.0))
            chosen = torch.randperm(n, generator=gen)[:count]
            out.append(Variant(r, targets[chosen.sort().values], (n / count) / mc_num))
    return out


def mc_nll(
    model: torch.nn.Module,
    rows: Sequence[Row],
    seeds: Sequence[int],
    *,
    mask_id: int,
    pad_id: int,
    mc_num: int,
    batch_size: int,
    block_size: int | None = None,
) -> list[float]:
    """Per row, LLaDA's Monte-Carlo estimate of -log p(targets | rest) in nats (`mc_num` draws per
    row; the caller passes EvalConfig's mc_num and batch_size); block by block for a block-causal
    model (`block_size`)."""
    return score_variants(model, rows, _mc_variants(rows, seeds, mc_num), mask_id, pad_id, batch_size, block_size)


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
    batch_size: int,
) -> list[bool]:
    """Whether greedy decoding of len(cont) masks after each context yields the continuation.

    Greedy = the sampler's `confidence` strategy at temperature 0 with one token per step: each
    step reveals the masked position whose argmax token is most probable. A row stops at its
    first step whose revealed token differs from the continuation (it cannot come back), so a
    wrong continuation costs one forward. `never_ids` (mask, pad, <|im_start|>, <|delete|>) are
    never predicted, as in the sampler. A block-causal model decodes the continuation block by
    block, each block seeing the earlier ones (decoded, so equal to the continuation) clean.
    """
    block_size = trained_block_size(model)
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
            eligible, clean = target >= 0, torch.where(target >= 0, target, ids)
            blocks = block_ids(eligible, block_size) if block_size else None
            alive = torch.ones(len(batch), dtype=torch.bool, device=device)
            while True:
                masked = (ids == mask_id) & alive[:, None]
                if not bool(masked.any()):
                    break
                if blocks is not None:  # the first block that has masks
                    first = torch.where(masked, blocks, blocks.max() + 1).min(1, keepdim=True).values
                    masked &= blocks == first
                logits = masked_logits(model, ids, clean, attn, eligible, masked, block_size, pad_id).float()
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
