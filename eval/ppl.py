"""ELBO upper bound on perplexity, repeatable: a fixed stratified t grid and seeded masks.

    bound = sum over rows of ELBO(row) / sum over rows of n_tokens(row)     (nats per token)
    ppl <= exp(bound)

The standard error is the ratio estimator's (delta method over rows), so it covers both the
data and the Monte-Carlo noise of the masks. For an SFT model the conditional bound noises only
the answer canvas (answer + <|im_end|> + its eos padding, as trained) and divides by the answer
tokens (content + <|im_end|>): -log p(answer, padding | prompt) >= -log p(answer | prompt), so it
stays an upper bound on the answer's own perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from dgpt_core.diffusion.elbo import Row, elbo_nll, stable_seed
from dgpt_core.generation.options import trained_block_size
from dgpt_core.generation.schedules import NoiseSchedule


def summarize(nll: Sequence[float], n_tokens: Sequence[int]) -> dict[str, float]:
    """Pooled nats/token, its standard error, the perplexity bound and its standard error."""
    b = torch.tensor(list(nll), dtype=torch.float64)
    n = torch.tensor(list(n_tokens), dtype=torch.float64)
    total = float(n.sum())
    if total <= 0:
        raise ValueError("no tokens to score")
    ratio = float(b.sum()) / total
    rows = len(b)
    if rows > 1:
        resid = b - ratio * n
        se = math.sqrt(float((resid**2).sum()) * rows / (rows - 1)) / total
    else:
        se = float("nan")
    ppl = math.exp(ratio)
    return {"nll_per_token": ratio, "nll_stderr": se, "value": ppl, "stderr": ppl * se}


def ppl_bound(
    model: torch.nn.Module,
    rows: Sequence[Row],
    *,
    mask_id: int,
    pad_id: int,
    schedule: NoiseSchedule,
    t_points: int,
    mask_draws: int,
    batch_size: int,
    seed: int = 0,
    norm_tokens: Sequence[int] | None = None,
    dataset: str = "",
) -> dict[str, Any]:
    """The bound over `rows` (targets = the noised positions). `t_points`, `mask_draws` and
    `batch_size` are the caller's EvalConfig values (ppl_t_points, ppl_mask_draws, batch_size);
    `norm_tokens` are the per-row token counts that divide the bound (default: the number of targets).

    Returns value (perplexity bound), stderr, n_tokens, dataset, nll_per_token, nll_stderr,
    n_sequences and the estimator settings; with `norm_tokens` also n_scored_tokens and
    nll_per_scored_token (the same total over every noised position)."""
    rows = [r for r in rows if r.targets]
    if not rows:
        raise ValueError(f"no sequences with scored tokens for the perplexity bound ({dataset})")
    counts = [len(r.targets) for r in rows] if norm_tokens is None else list(norm_tokens)
    seeds = [stable_seed("ppl", seed, *r.ids) for r in rows]
    nll = elbo_nll(
        model, rows, seeds, mask_id=mask_id, pad_id=pad_id, schedule=schedule,
        t_points=t_points, mask_draws=mask_draws, batch_size=batch_size, block_size=trained_block_size(model),
    )
    stats = summarize(nll, counts)
    scored = sum(len(r.targets) for r in rows)
    extra = {} if norm_tokens is None else {  # the canvas as trained (answer + padding), per position
        "n_scored_tokens": scored, "nll_per_scored_token": sum(nll) / scored}
    return {
        "value": stats["value"],
        "stderr": stats["stderr"],
        "n_tokens": int(sum(counts)),
        "dataset": dataset,
        "nll_per_token": stats["nll_per_token"],
        "nll_stderr": stats["nll_stderr"],
        "n_sequences": len(rows),
        "estimator": {"schedule": schedule.name, "t_eps": schedule.eps, "t_points": t_points,
                      "mask_draws": mask_draws, "seed": seed},
        **extra,
    }


def text_rows(sequences: Sequence[Sequence[int]]) -> list[Row]:
    """Unconditional bound: every token of each sequence is a target."""
    return [Row(list(s), list(range(len(s)))) for s in sequences]


def answer_rows(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], im_end_id: int | None
) -> tuple[list[Row], list[int]]:
    """Conditional bound rows from SFT examples (input_ids, eligible_mask): targets = eligible
    positions; the normaliser = eligible tokens up to and including the first <|im_end|>."""
    rows, counts = [], []
    for ids, mask in examples:
        targets = [i for i, m in enumerate(mask) if m]
        if not targets:
            continue
        answer = len(targets)
        if im_end_id is not None:
            ends = [k for k, i in enumerate(targets) if ids[i] == im_end_id]
            answer = ends[0] + 1 if ends else len(targets)
        rows.append(Row(list(ids), targets))
        counts.append(answer)
    return rows, counts
