"""Batch collation with MDLM masking and Seed Diffusion edit corruption, in batched tensor ops.

Each batch gets its own random stream, derived from the collator seed and the batch's token
content, so corruption is reproducible, identical in DataLoader workers and the main process, and
unchanged when a resumed run skips the batches it has already seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import DiffusionConfig
from ..generation.schedules import get_schedule, sample_t
from .blocks import block_ids, block_times, clean_copy, column_positions, vectorise

IGNORE_INDEX = -100
_HASH_MOD = (1 << 61) - 1


@dataclass(frozen=True)
class EditState:
    """Where the curriculum is: whether the edit stage is on, and its corruption probabilities."""

    active: bool
    edit_prob: float
    insert_prob: float


def edit_state(cfg: DiffusionConfig, progress: float) -> EditState:
    """Edit stage on once `progress` (fraction of training done) reaches cfg.edit_start; edit_prob is
    linearly annealed towards cfg.edit_prob_final over the rest of training when that is set."""
    if progress < cfg.edit_start or cfg.edit_start >= 1.0:
        return EditState(False, 0.0, 0.0)
    prob = cfg.edit_prob
    if cfg.edit_prob_final is not None:
        span = max(1.0 - cfg.edit_start, 1e-12)
        frac = min(max((progress - cfg.edit_start) / span, 0.0), 1.0)
        prob = cfg.edit_prob + frac * (cfg.edit_prob_final - cfg.edit_prob)
    return EditState(True, prob, cfg.insert_prob)


class DiffusionCollator:
    """Pads examples and corrupts them for the diffusion loss.

    Input features: `input_ids` (list[int]) and optionally `eligible_mask` (list[int] 0/1, the
    positions that may be noised and are scored; SFT answers). Without it every real token is
    eligible (pretraining). Prompt and padding are never noised.

    Output batch:
      input_ids, attention_mask  corrupted model input;
      labels                     original token at eligible positions (<|delete|> at inserted
                                 spurious tokens), else -100;
      masked_positions           positions replaced by <|mask|> (weighted MDLM loss);
      edit_positions             visible positions scored by the unweighted edit loss;
      loss_weight                per position, the ELBO weight w(t) of its diffusion time;
      t                          the diffusion times: one per sequence, or one per block;
      edit_active, edit_prob     curriculum state of this batch (0-dim tensors, for logging).
    With `complementary_masking` the batch is the features twice, the second copy masked where the
    first is not. With `block_size` (block diffusion) the rows are in the vectorised form of
    `dgpt_core.diffusion.blocks` and carry `position_ids`, `block_ids` and `block_noisy` too: every
    block has its own t, and the clean copy that follows the corrupted row is never scored.
    """

    def __init__(
        self,
        cfg: DiffusionConfig,
        *,
        mask_id: int,
        pad_id: int,
        delete_id: int,
        replacement_ids: Sequence[int],
        max_length: int,
        pad_to_multiple_of: int | None = None,
    ):
        if len(replacement_ids) < 2:
            raise ValueError("replacement_ids needs at least two non-special token ids")
        self.cfg = cfg
        self.schedule = get_schedule(cfg.schedule, cfg.t_eps)
        self.mask_id, self.pad_id, self.delete_id = mask_id, pad_id, delete_id
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.replacement_ids = torch.tensor(sorted(set(replacement_ids)), dtype=torch.long)
        vocab_bound = int(self.replacement_ids.max()) + 1
        # position of each id inside replacement_ids (-1 for special ids), to draw a *different* token
        self._replacement_index = torch.full((max(vocab_bound, mask_id, pad_id, delete_id) + 1,), -1)
        self._replacement_index[self.replacement_ids] = torch.arange(len(self.replacement_ids))
        # Curriculum clock in shared memory, so DataLoader workers see what the trainer sets:
        # [manual progress, batches consumed before this epoch, max_steps, accumulation, epoch generation]
        self._clock = torch.zeros(5, dtype=torch.float64).share_memory_()
        self._generation_seen, self._batches_collated = -1.0, 0

    @classmethod
    def from_tokenizer(cls, cfg: DiffusionConfig, tokenizer: Any, max_length: int, **kwargs: Any) -> DiffusionCollator:
        from ..models.tokenizer import non_special_token_ids, special_token_ids

        ids = special_token_ids(tokenizer)
        return cls(
            cfg,
            mask_id=ids["mask"],
            pad_id=ids["pad"],
            delete_id=ids["delete"],
            replacement_ids=non_special_token_ids(tokenizer),
            max_length=max_length,
            **kwargs,
        )

    def set_progress(self, fraction: float) -> None:
        """Fix the curriculum at `fraction` of training for every following batch (manual use)."""
        self._clock[0] = float(fraction)
        self._clock[2] = 0.0

    def start_epoch(self, steps_done: int, max_steps: int, accumulation: int) -> None:
        """Let each batch compute its own training step: the next batch collated is the first of
        optimizer step `steps_done + 1`. Called by the trainer when training or an epoch starts;
        exact with prefetching, DataLoader workers and resumed runs alike."""
        generation = float(self._clock[4]) + 1.0
        self._clock.copy_(torch.tensor([0.0, steps_done * accumulation, max_steps, accumulation, generation]))

    def batch_progress(self) -> float:
        """Fraction of training done when the batch being collated is used (advances the clock)."""
        manual, base, max_steps, accumulation, generation = self._clock.tolist()
        if max_steps <= 0:
            return manual
        if generation != self._generation_seen:
            self._generation_seen, self._batches_collated = generation, 0
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        # the default batch sampler hands batches to workers round-robin
        batch_number = int(base) + self._batches_collated * workers + worker_id
        self._batches_collated += 1
        return min(batch_number // int(accumulation) / max_steps, 1.0)

    def pad(self, features: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pad to the longest example: (input_ids, attention_mask, eligible) tensors."""
        lengths = [len(f["input_ids"]) for f in features]
        longest = max(lengths)
        if longest > self.max_length:
            row = lengths.index(longest)
            raise ValueError(f"example {row} of the batch has {longest} tokens, more than max_length={self.max_length}")
        if self.pad_to_multiple_of:
            longest = min(-(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of, self.max_length)
        input_ids = torch.full((len(features), longest), self.pad_id, dtype=torch.long)
        eligible = torch.zeros((len(features), longest), dtype=torch.bool)
        for row, feature in enumerate(features):
            n = lengths[row]
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            if "eligible_mask" in feature and feature["eligible_mask"] is not None:
                eligible[row, :n] = torch.as_tensor(feature["eligible_mask"], dtype=torch.bool)
            else:
                eligible[row, :n] = True
        attention_mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        return input_ids, attention_mask, eligible & attention_mask

    def generator_for(self, input_ids: torch.Tensor) -> torch.Generator:
        """A generator seeded from the collator seed and a polynomial hash of the batch's tokens."""
        flat = input_ids.flatten().to(torch.int64) % _HASH_MOD
        powers = torch.arange(1, flat.numel() + 1, dtype=torch.int64) * 1_000_003 % _HASH_MOD
        content = int((flat * powers % _HASH_MOD).sum() % _HASH_MOD)
        return torch.Generator().manual_seed((self.cfg.seed * 0x9E3779B97F4A7C15 + content) % (1 << 63))

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask, eligible = self.pad(features)
        state = edit_state(self.cfg, self.batch_progress())
        generator = self.generator_for(input_ids)
        if self.cfg.complementary_masking:
            input_ids, attention_mask, eligible = (x.repeat(2, 1) for x in (input_ids, attention_mask, eligible))
        return self.corrupt(input_ids, attention_mask, eligible, state, generator)

    def corrupt(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        eligible: torch.Tensor,
        state: EditState,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """Mask, swap and insert on a padded batch; see the class docstring for the outputs."""
        batch, length = input_ids.shape
        block_size = self.cfg.block_size
        blocks = block_ids(eligible, block_size) if block_size else None
        pairs = self.cfg.complementary_masking
        drawn = batch // 2 if pairs else batch  # the rows whose times are drawn; the twins' follow
        count = drawn if blocks is None else int(blocks[:drawn].max(1).values.sum())
        t = sample_t(count, generator, self.cfg.t_eps, self.cfg.t_sampling)
        t_at = t[:, None].expand(drawn, length) if blocks is None else block_times(blocks[:drawn], t)
        if pairs:
            t, t_at = (torch.cat([x, self.schedule.complement(x)]) for x in (t, t_at))
        draws = torch.rand((batch, length), generator=generator)
        masked = eligible & (draws < self.schedule.mask_prob(t_at))
        if pairs:  # rows [drawn:] repeat rows [:drawn]: each masks what its twin left visible
            masked[drawn:] = eligible[drawn:] & ~masked[:drawn]
        labels = torch.where(eligible, input_ids, IGNORE_INDEX)
        noisy = torch.where(masked, self.mask_id, input_ids)
        edit_scored = torch.zeros_like(masked)
        # per position: (value, fill where rows grow, value at an inserted token)
        columns = {"input_ids": noisy, "attention_mask": attention_mask.bool(), "labels": labels,
                   "masked_positions": masked, "edit_positions": edit_scored, "loss_weight": self.loss_weight(t_at)}
        if blocks is not None:
            columns["block_ids"] = blocks

        if state.active:
            visible = eligible & ~masked
            swapped = visible & (torch.rand((batch, length), generator=generator) < state.edit_prob)
            columns["input_ids"] = torch.where(swapped, self._random_other_tokens(input_ids, generator), noisy)
            columns["edit_positions"] = visible if self.cfg.edit_loss_targets == "visible" else swapped
            if state.insert_prob > 0:
                inserts = visible & (torch.rand((batch, length), generator=generator) < state.insert_prob)
                if inserts.any():
                    spurious = self._spurious_tokens(columns["input_ids"], generator)
                    columns = self._insert_spurious(inserts, spurious, columns)

        columns["attention_mask"] = columns["attention_mask"].long()
        if blocks is not None:
            columns = self._vectorise(columns, input_ids, eligible, blocks)
        return {
            **columns,
            "t": t,
            "edit_active": torch.tensor(float(state.active)),
            "edit_prob": torch.tensor(state.edit_prob),
        }

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per position, the weight of a masked token's cross-entropy at its time (cfg.loss_weighting)."""
        return self.schedule.weight(t) if self.cfg.loss_weighting == "elbo" else torch.ones_like(t)

    def _vectorise(self, columns: dict[str, torch.Tensor], clean_ids: torch.Tensor, eligible: torch.Tensor,
                   blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """The corrupted rows followed by the clean copy of their eligible tokens but the last block
        (`dgpt_core.diffusion.blocks.vectorise`)."""
        noisy = dict(columns)
        real = noisy.pop("attention_mask").bool()
        noisy.update(keep=real, position_ids=column_positions(real), block_noisy=noisy["labels"] != IGNORE_INDEX)
        fills = {"labels": IGNORE_INDEX, "masked_positions": False, "edit_positions": False, "loss_weight": 0.0}
        return vectorise(noisy, clean_copy(clean_ids, eligible, blocks), fills, self.pad_id)

    def _random_other_tokens(self, original: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random non-special token per position, never equal to the original token."""
        pool = len(self.replacement_ids)
        draw = torch.randint(0, pool, original.shape, generator=generator)
        index_of_original = self._replacement_index[original.clamp(max=len(self._replacement_index) - 1)]
        # shifting a colliding draw by one keeps the draw uniform over the other pool-1 tokens
        draw = torch.where(draw == index_of_original, (draw + 1) % pool, draw)
        return self.replacement_ids[draw]

    def _spurious_tokens(self, visible_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Per position, the token an insertion before it would add: with cfg.insert_copy_prob a copy
        of the visible token there (a duplicated word, as real drafts have), else a random
        non-special token other than it."""
        copy = torch.rand(visible_ids.shape, generator=generator) < self.cfg.insert_copy_prob
        return torch.where(copy, visible_ids, self._random_other_tokens(visible_ids, generator))

    def _insert_spurious(
        self, inserts: torch.Tensor, spurious: torch.Tensor, columns: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Insert `spurious[r, p]` before each position (r, p) of `inserts`, labelled <|delete|> and
        scored by the edit loss: the model sees an ordinary token and learns to flag it (the
        <|delete|> token itself never enters the input). Rows shift right; the batch grows by the
        largest insertion count up to max_length, and a row that then overflows loses tokens from
        its end, never its start, and never an inserted token without its label."""
        batch, length = inserts.shape
        shift = inserts.long().cumsum(dim=1)
        new_pos = torch.arange(length)[None, :] + shift
        out_len = min(self.max_length, length + int(shift[:, -1].max()))
        rows = torch.arange(batch)[:, None].expand(batch, length)
        keep = new_pos < out_len
        ins = inserts & (new_pos - 1 < out_len)

        def scatter(values: torch.Tensor, fill: Any, at_insert: Any) -> torch.Tensor:
            out = torch.full((batch, out_len), fill, dtype=values.dtype)
            out[rows[keep], new_pos[keep]] = values[keep]
            out[rows[ins], new_pos[ins] - 1] = at_insert[ins] if isinstance(at_insert, torch.Tensor) else at_insert
            return out

        # per column: the value where a row grows, and at an inserted token (its block and weight
        # are those of the token it precedes)
        rules = {"input_ids": (self.pad_id, spurious), "attention_mask": (False, True),
                 "labels": (IGNORE_INDEX, self.delete_id), "masked_positions": (False, False),
                 "edit_positions": (False, True), "loss_weight": (0.0, columns["loss_weight"])}
        if "block_ids" in columns:
            rules["block_ids"] = (0, columns["block_ids"])
        return {name: scatter(columns[name], *rules[name]) for name in columns}
