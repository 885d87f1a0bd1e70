"""log p(answer | prompt) of a diffusion model: the estimates policy-gradient training needs, and
the exact value they estimate, for answers short enough to enumerate.

The model's distribution over an answer is that of its reverse process. In continuous time (any
noise schedule: the order in which positions are revealed does not depend on it) that process
reveals the masked positions in a uniformly random order, each token drawn from the model's
conditional given the revealed ones, so

    p(x) = E_order [ prod_j p(x_order(j) | x_order(<j)) ]                          (exact)
    ELBO = E_order [ sum_j log p(x_order(j) | x_order(<j)) ] <= log p(x)      (Jensen)

and the ELBO is MDLM's E_t[ w(t) * sum over masked i of log p(x_i | x_t) ]. A block-causal model
(`block_size`) reveals its answer block after block, each block given the clean earlier ones, so
both factorise over blocks and only the inside of a block is averaged over orders (REFERENCE.md
section 8).

- `exact_and_elbo`: log p(x) by dynamic programming over the subsets of each block (2^size
  conditionals per block), and the ELBO in closed form from the same table; for tests and
  measurements on short answers.
- `one_step_logp`: d1's estimate (diffu-GRPO): every answer token scored in one forward with the
  whole answer (each block) masked and the prompt masked at random. Biased: the tokens of a block
  are scored as if independent given the prompt. One scored copy per row.
- `elbo_logp`: the MDLM ELBO on a stratified grid of t with seeded masks, a lower bound in
  expectation (up to the grid's quadrature). `t_points x mask_draws` scored copies per row.
Rows are (prompt, answer) token lists; every estimate is per row, float64, differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..diffusion.blocks import block_ids
from ..diffusion.elbo import Row, Variant, elbo_variants, masked_token_nll, variant_nll, weighted_row_nll
from ..generation.schedules import NoiseSchedule

MAX_EXACT_BLOCK = 12
"""The longest block `exact_and_elbo` enumerates (2^12 scored copies)."""


def answer_rows(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> list[Row]:
    """One scored row per (prompt, answer): the answer's positions are the targets."""
    return [Row([*p, *a], list(range(len(p), len(p) + len(a)))) for p, a in zip(prompts, answers, strict=True)]


def answer_blocks(row: Row, block_size: int | None) -> list[list[int]]:
    """The positions of each block of the row's targets (one block for a full-canvas model)."""
    if block_size is None or not row.targets:
        return [list(row.targets)] if row.targets else []
    eligible = torch.zeros((1, len(row.ids)), dtype=torch.bool)
    eligible[0, row.targets] = True
    blocks = block_ids(eligible, block_size)[0].tolist()
    return [[p for p in row.targets if blocks[p] == b] for b in range(1, max(blocks) + 1)]


def conditionals(model: torch.nn.Module, rows: Sequence[Row], *, mask_id: int, pad_id: int,
                 block_size: int | None, batch_size: int = 512) -> list[list[torch.Tensor]]:
    """Per row and per block of its answer, a (2^n, n) table (n the block's length): entry
    [visible, i] is log p(token i of the block | the block's tokens in the bit set `visible`
    revealed, its others masked, earlier blocks clean), for i outside `visible`; 0 elsewhere.
    2^n - 1 scored copies per block, `batch_size` copies per forward."""
    blocks = [answer_blocks(row, block_size) for row in rows]
    longest = max((len(b) for bs in blocks for b in bs), default=0)
    if longest > MAX_EXACT_BLOCK:
        raise ValueError(f"exact likelihood enumerates 2^n states of a block of n tokens: a block of {longest} "
                         f"tokens, at most {MAX_EXACT_BLOCK}")
    variants, base = [], []  # base: where the variant's row of its block's table starts in `flat`
    column: dict[tuple[int, int], int] = {}  # (variant, position) -> column of its block's table
    offsets, size = [], 0
    for r, row_blocks in enumerate(blocks):
        offsets.append([])
        for block in row_blocks:
            offsets[-1].append(size)
            n = len(block)
            for visible in range(2**n - 1):
                hidden = [p for i, p in enumerate(block) if not visible >> i & 1]
                column.update({(len(variants), p): i for i, p in enumerate(block)})
                variants.append(Variant(r, torch.tensor(hidden, dtype=torch.long), 1.0))
                base.append(size + visible * n)
            size += 2**n * n
    device = next(model.parameters()).device
    parts, index = [], []
    for start in range(0, len(variants), batch_size):
        nll, where = masked_token_nll(model, rows, variants[start : start + batch_size], mask_id, pad_id, block_size)
        parts.append(-nll)
        index += [base[start + v] + column[start + v, p] for v, p in where.tolist()]
    flat = torch.zeros(size, dtype=torch.float64, device=device)
    if parts:
        flat = flat.index_put((torch.tensor(index, device=device),), torch.cat(parts))
    return [[flat[o : o + 2 ** len(block) * len(block)].view(2 ** len(block), len(block))
             for o, block in zip(offsets[r], row_blocks)] for r, row_blocks in enumerate(blocks)]


def _block_exact(table: torch.Tensor) -> torch.Tensor:
    """log E_order prod p over the orders of one block, from its `conditionals` table."""
    n = table.shape[1]
    log_g = [table.new_zeros(())] + [None] * (2**n - 1)
    for s in range(1, 2**n):  # every subset after its subsets (they are smaller numbers)
        members = [i for i in range(n) if s >> i & 1]
        terms = torch.stack([log_g[s ^ 1 << i] + table[s ^ 1 << i, i] for i in members])
        log_g[s] = torch.logsumexp(terms, 0) - math.log(len(members))
    return log_g[-1]


def _block_elbo(table: torch.Tensor) -> torch.Tensor:
    """E_order sum log p of one block: a masked set M is the set still masked before one of its
    positions is revealed with probability (|M| - 1)! (n - |M|)! / n! for each of its positions."""
    n = table.shape[1]
    total = table.new_zeros(())
    for visible in range(2**n - 1):
        masked = [i for i in range(n) if not visible >> i & 1]
        k = len(masked)
        weight = math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)
        total = total + weight * table[visible, masked].sum()
    return total


def exact_and_elbo(model: torch.nn.Module, rows: Sequence[Row], *, mask_id: int, pad_id: int,
                   block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, log p(answer | prompt) under the model's reverse process, exactly, and its ELBO in
    closed form (what `elbo_logp` estimates), both from one `conditionals` table (blocks of at
    most MAX_EXACT_BLOCK tokens)."""
    tables = conditionals(model, rows, mask_id=mask_id, pad_id=pad_id, block_size=block_size)
    empty = torch.zeros((), dtype=torch.float64)
    exact = [torch.stack([_block_exact(t) for t in row]).sum() if row else empty for row in tables]
    elbo = [torch.stack([_block_elbo(t) for t in row]).sum() if row else empty for row in tables]
    return torch.stack(exact), torch.stack(elbo)


def one_step_logp(model: torch.nn.Module, rows: Sequence[Row], *, mask_id: int, pad_id: int,
                  block_size: int | None, prompt_mask_prob: float, generator: torch.Generator) -> torch.Tensor:
    """d1's one-forward estimate: sum over the answer of log p(token | prompt with each of its
    tokens masked with probability `prompt_mask_prob`, the answer's block masked, earlier blocks
    clean). A fresh prompt mask on every call, drawn from `generator`."""
    variants = []
    for r, row in enumerate(rows):
        targets = set(row.targets)
        context = torch.as_tensor([p for p in range(len(row.ids)) if p not in targets], dtype=torch.long)
        drop = torch.rand(len(context), generator=generator) < prompt_mask_prob
        variants.append(Variant(r, torch.as_tensor(row.targets, dtype=torch.long), 1.0, context[drop]))
    return -variant_nll(model, rows, variants, mask_id, pad_id, block_size)


def elbo_logp(model: torch.nn.Module, rows: Sequence[Row], seeds: Sequence[int], *, mask_id: int, pad_id: int,
              block_size: int | None, schedule: NoiseSchedule, t_points: int, mask_draws: int) -> torch.Tensor:
    """The ELBO estimate of log p(answer | prompt): `mask_draws` seeded masks of the answer at each
    t of a `t_points` stratified grid (`diffusion.elbo.elbo_variants`), each scored copy weighted
    w(t) / (t_points * mask_draws). The same seeds give the same masks (a policy and its
    reference model scored on the same masks: coupled estimates)."""
    variants = elbo_variants(rows, seeds, schedule, t_points, mask_draws)
    if not variants:
        return torch.zeros(len(rows), dtype=torch.float64, device=next(model.parameters()).device)
    return -weighted_row_nll(model, rows, variants, mask_id, pad_id, block_size)
