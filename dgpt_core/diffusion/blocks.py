"""Block diffusion's training input: BD3-LM's vectorised form of a batch.

The eligible tokens of a row (an SFT answer, or all of a pretraining row) are cut into blocks of
`block_size`, numbered from 1 (the context before them, an SFT prompt, is block 0). One forward
scores every block: the row as the collator corrupted it (each block noised at its own t) is
followed by a clean copy of its eligible tokens, which repeats their positions, and
`dgpt_core.generation.attention.block_mask` lets a noisy block see its own noisy tokens, the context
and the clean copies of the earlier blocks, while a clean block sees the context and the clean
blocks up to itself. The last block's clean copy is left out: no noisy block sees it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.backbone import block_inputs, logits_at


def block_ids(eligible: torch.Tensor, block_size: int) -> torch.Tensor:
    """(rows, length): 0 at context positions, 1 + (rank among the row's eligible positions) //
    block_size at eligible ones."""
    rank = eligible.long().cumsum(1) - 1
    return torch.where(eligible, rank // block_size + 1, 0)


def block_times(blocks: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Per position, the t of its block: `times` holds one t per block present, block-major (every
    row's first block, then every row's second, ...), so stratified times spread over the blocks of
    each row, not only over the rows; context positions get their row's first block's t."""
    count = blocks.max(1).values
    table = torch.zeros((blocks.shape[0], int(count.max())), dtype=times.dtype)
    present = torch.arange(table.shape[1])[None, :] < count[:, None]
    table.t()[present.t()] = times
    return table.gather(1, (blocks - 1).clamp(min=0))


def column_positions(rows: torch.Tensor) -> torch.Tensor:
    """The position of every column of (rows, length): 0..length-1 in each row."""
    return torch.arange(rows.shape[1], device=rows.device).expand_as(rows)


def clean_copy(clean_ids: torch.Tensor, eligible: torch.Tensor, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The clean side of `vectorise`: the uncorrupted `clean_ids` at their own positions, keeping the
    eligible tokens of every block but the row's last (no noisy block sees that one)."""
    return {"input_ids": clean_ids, "keep": eligible & (blocks < blocks.max(1, keepdim=True).values),
            "block_ids": blocks, "position_ids": column_positions(clean_ids), "block_noisy": torch.zeros_like(eligible)}


def vectorise(noisy: dict[str, torch.Tensor], clean: dict[str, torch.Tensor], fills: dict[str, Any],
              pad_id: int) -> dict[str, torch.Tensor]:
    """One row per batch row: the `noisy` columns it keeps, then the `clean` columns it keeps, in
    order, right-padded. Both sides hold (rows, columns) tensors `input_ids`, `keep` (the columns
    of the row), `block_ids`, `position_ids`, `block_noisy`; a tensor of `noisy` missing from
    `clean` takes `fills[name]` there (labels and loss flags of the clean copy). Returns them all,
    `keep` as `attention_mask`."""
    rows = noisy["input_ids"].shape[0]
    width = clean["input_ids"].shape[1]
    both = {name: torch.cat([value, clean[name] if name in clean else
                             torch.full((rows, width), fills[name], dtype=value.dtype, device=value.device)], 1)
            for name, value in noisy.items()}
    keep = both["keep"]
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, : int(keep.sum(1).max())]
    out = {name: value.gather(1, order) for name, value in both.items()}
    kept = out.pop("keep")
    out["input_ids"] = out["input_ids"].masked_fill(~kept, pad_id)
    out["attention_mask"] = kept.long()
    return out


def masked_logits(model: torch.nn.Module, ids: torch.Tensor, clean_ids: torch.Tensor, attention_mask: torch.Tensor,
                  eligible: torch.Tensor, scored: torch.Tensor, block_size: int | None, pad_id: int) -> torch.Tensor:
    """Logits at `scored` positions of rows `ids` (masks and all), in the model's own attention: a
    full-canvas model reads the rows as they are; a block-causal one (`block_size`) reads them in
    the vectorised form, the `eligible` span cut into blocks, each seeing the clean copy
    (`clean_ids`) of the earlier ones. Rows are (rows, length) tensors; logits (scored.sum(), vocab)
    in the row-major order of `scored`."""
    if block_size is None:
        return logits_at(model, ids, attention_mask, scored)
    blocks = block_ids(eligible, block_size)
    real = attention_mask.bool()
    noisy = {"input_ids": ids, "keep": real, "block_ids": blocks, "position_ids": column_positions(ids),
             "block_noisy": eligible, "scored": scored}
    batch = vectorise(noisy, clean_copy(clean_ids, eligible, blocks), {"scored": False}, pad_id)
    return logits_at(model, batch["input_ids"], batch["attention_mask"], batch.pop("scored"), **block_inputs(batch))
