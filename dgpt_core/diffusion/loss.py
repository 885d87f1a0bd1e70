"""The diffusion training objective: ELBO-weighted masked loss plus the unweighted edit loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.backbone import block_inputs, logits_at
from .collator import IGNORE_INDEX


class _SuppressColumnInPlace(torch.autograd.Function):
    """Set one column of fresh float32 logits to -inf in place. The backward passes the gradient
    through untouched: it is already zero there (softmax(-inf) = 0 and that column is never a
    target), so no (tokens, vocab) copy is made in either direction."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, column: int) -> torch.Tensor:
        ctx.mark_dirty(logits)
        return logits.index_fill_(1, torch.tensor([column], device=logits.device), float("-inf"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def token_nll(logits: torch.Tensor, targets: torch.Tensor, suppressed_id: int, overwrite: bool = False) -> torch.Tensor:
    """-log p(target) under softmax over the vocabulary without `suppressed_id` (the mask token).

    One fused cross-entropy on float32 logits whose suppressed column is -inf. With `overwrite`
    (float32 logits that nothing else reads, such as a fresh decoder output) the column is set in
    place; otherwise the upcast and the suppression are one broadcast add. Either way the backward
    writes one (tokens, vocab) gradient (a log-sum-exp with a gather and a column read wrote
    three, 1.6x slower at a 50k vocabulary).
    """
    if overwrite and logits.dtype == torch.float32:
        return F.cross_entropy(_SuppressColumnInPlace.apply(logits, suppressed_id), targets, reduction="none")
    suppress = torch.zeros(logits.shape[-1], dtype=torch.float32, device=logits.device)
    suppress[suppressed_id] = float("-inf")
    return F.cross_entropy(logits + suppress, targets, reduction="none")


@dataclass
class LossParts:
    """The total loss and its two terms, all divided by the same normaliser."""

    total: torch.Tensor
    masked: torch.Tensor
    edit: torch.Tensor


def diffusion_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    mask_id: int,
    normalization: str = "token",
    normalizer: torch.Tensor | float | None = None,
    edit_loss_weight: float = 1.0,
) -> LossParts:
    """MDLM loss w(t) * CE on masked positions plus `edit_loss_weight` * CE on edit positions.

    normalization "token": summed loss / `normalizer` (default: the batch's eligible-token count);
    "sequence": each sequence's sum divided by its eligible-token count, summed over sequences, then
    divided by `normalizer` (default: the batch size). Passing the count over a whole
    gradient-accumulation window as `normalizer` makes accumulated micro-batches equal one big batch.
    """
    masked, edits = batch["masked_positions"], batch["edit_positions"]
    scored = masked | edits
    labels = batch["labels"]
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], scored, **block_inputs(batch))
    nll = token_nll(logits, labels[scored], mask_id, overwrite=True)

    rows = scored.nonzero(as_tuple=True)[0]
    is_masked = masked[scored]
    weight = torch.where(is_masked, batch["loss_weight"].to(nll.dtype)[scored], edit_loss_weight)
    weighted = nll * weight
    masked_term = torch.where(is_masked, weighted, 0.0)
    edit_term = weighted - masked_term

    eligible_per_row = (labels != IGNORE_INDEX).sum(dim=1)
    if normalization == "token":
        denom = normalizer if normalizer is not None else eligible_per_row.sum().clamp(min=1)
        masked_sum, edit_sum = masked_term.sum(), edit_term.sum()
    elif normalization == "sequence":
        denom = normalizer if normalizer is not None else labels.shape[0]
        per_token_scale = 1.0 / eligible_per_row.clamp(min=1).to(nll.dtype)[rows]
        masked_sum, edit_sum = (masked_term * per_token_scale).sum(), (edit_term * per_token_scale).sum()
    else:
        raise ValueError(f"unknown loss normalization {normalization!r}")
    masked_loss, edit_loss = masked_sum / denom, edit_sum / denom
    return LossParts(total=masked_loss + edit_loss, masked=masked_loss, edit=edit_loss)
