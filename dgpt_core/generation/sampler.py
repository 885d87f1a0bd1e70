"""Reverse-process samplers for masked discrete diffusion language models.

`generate` / `stream`: ancestral MDLM sampling, LLaDA/Dream-style count-based unmasking by a
score, Seed-Diffusion editing of visible tokens (with deletion), and semi-autoregressive blocks
with a sliding window. Imports only torch and the standard library: the file is copied beside
the weights of exported model folders and imported there by the `text-diffusion` pipeline.

Prompts are left-padded (attention mask 0), so every row's context ends at the same column and
the canvas follows it; rotary positions make this exact. Tokens are drawn only where the canvas
can change (masked positions, plus visible generated ones when editing), by float64 inverse-CDF
draws from one seedable `torch.Generator`. The options, the rule of each strategy (`STRATEGIES`)
and the result types are in `options.py`, the tensor primitives in `ops.py`, the
approximate prefix cache in `attention.py`, the noise schedules the ancestral sampler follows
in `schedules.py` (all copied with this file).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from .attention import ContextCache, PrefixCache, block_forward_masks
from .ops import (
    PROJECTION_CHUNK,
    Drawn,
    after_stop,
    delete_shift,
    draw,
    draw_from_hidden,
    entropy_bound_commit,
    penalise,
    repeated_ngram_completions,
    select_positions,
    threshold_commit,
)
from .options import (
    STRATEGIES,
    LogitsHook,
    PositionSelection,
    Prompts,
    SamplerConfig,
    SampleResult,
    SamplerState,
    Strategy,
    StrategyRule,
    TokenIds,
    TokensHook,
    trained_block_size,
)
from .schedules import NoiseSchedule

__all__ = [
    "STRATEGIES", "LogitsHook", "PositionSelection", "Prompts", "SampleResult", "SamplerConfig", "SamplerState",
    "Strategy", "StrategyRule", "TokenIds", "TokensHook", "cut_at_stop", "delete_shift", "generate", "left_pad",
    "stream",
]


def left_pad(
    prompts: Prompts, pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id prompts into (ids, attention_mask), both (batch, longest)."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts.reshape(1, -1) if prompts.dim() == 1 else prompts
        ids = ids.to(device=device, dtype=torch.long)
        return ids, torch.ones_like(ids)
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows:
        raise ValueError("no prompts given")
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    lengths = torch.tensor([len(r) for r in rows])
    mask = (torch.arange(ids.shape[1]) >= ids.shape[1] - lengths[:, None]).long()
    return ids.to(device), mask.to(device)


def cut_at_stop(generated: torch.Tensor, stop_ids: Sequence[int]) -> tuple[list[list[int]], list[bool]]:
    """Each row up to its first stop token (excluded), and whether it had one."""
    is_stop = torch.isin(
        generated, torch.as_tensor(list(stop_ids), device=generated.device, dtype=torch.long)
    )
    stopped = is_stop.any(1)
    ends = torch.where(stopped, is_stop.int().argmax(1), generated.shape[1]).tolist()
    rows = generated.tolist()
    return [row[:end] for row, end in zip(rows, ends)], stopped.tolist()


def generate(
    model: torch.nn.Module,
    prompts: Prompts,
    token_ids: TokenIds,
    config: SamplerConfig | None = None,
    *,
    logits_hook: LogitsHook | None = None,
    tokens_hook: TokensHook | None = None,
    **overrides: Any,
) -> SampleResult:
    """Sample answers for a batch of token-id prompts; `overrides` replace `config` fields."""
    cfg = (config or SamplerConfig()).replace(**overrides)
    (state,) = collections.deque(
        stream(model, prompts, token_ids, cfg, logits_hook=logits_hook, tokens_hook=tokens_hook), maxlen=1
    )
    prompt_ids, _ = left_pad(prompts, token_ids.pad, state.canvas.device)
    answers, stopped = cut_at_stop(state.canvas, cfg.stop_ids(token_ids))
    canvas = torch.cat([prompt_ids, state.canvas], 1)
    return SampleResult(answers, stopped, state.nfe, canvas, prompt_ids.shape[1])


@torch.inference_mode()
def stream(
    model: torch.nn.Module,
    prompts: Prompts,
    token_ids: TokenIds,
    config: SamplerConfig | None = None,
    *,
    logits_hook: LogitsHook | None = None,
    tokens_hook: TokensHook | None = None,
    **overrides: Any,
) -> Iterator[SamplerState]:
    """Yield the initial canvas, then the state after every denoising step; the last has done=True.

    Full canvas: at most steps + 1 states (a block ends early when nothing is left to decode,
    see `SamplerConfig.steps`). Semi-autoregressive, and always for a block-causal model (blocks of
    its trained size): at most steps states per block run; a row stops after the first block that
    contains a stop token, and the run ends when every row stopped or `max_new_tokens` is reached.
    """
    cfg = (config or SamplerConfig()).replace(**overrides)
    device = next(model.parameters()).device
    ctx, ctx_mask = left_pad(prompts, token_ids.pad, device)
    batch = ctx.shape[0]
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    trained = trained_block_size(model)
    if trained is not None and cfg.block_size not in (None, trained):
        raise ValueError(f"the model is block-causal with blocks of {trained} tokens: block_size must be None or "
                         f"{trained}, not {cfg.block_size}")
    block = trained or cfg.block_size or cfg.max_new_tokens
    if max_len is not None and min(block, cfg.max_new_tokens) > max_len:
        raise ValueError(
            f"a block of {min(block, cfg.max_new_tokens)} tokens exceeds the model's maximum length {max_len}; "
            f"set block_size <= {max_len} for semi-autoregressive generation"
        )
    gen = torch.Generator(device=device)
    gen.seed() if cfg.seed is None else gen.manual_seed(cfg.seed)
    never = [i for i in (token_ids.mask, token_ids.pad, token_ids.im_start) if i is not None]
    stop_ids = torch.tensor(cfg.stop_ids(token_ids), dtype=torch.long, device=device)
    banned_at_masks = never + ([token_ids.delete] if token_ids.delete is not None else [])
    special = {i for i in dataclasses.astuple(token_ids) if i is not None} | set(cfg.stop_ids(token_ids))
    cached = trained is not None and cfg.prefix_cache is not False and _splits(model, logits_hook)
    run = _Run(model, cfg, token_ids, gen, torch.tensor(never, device=device), banned_at_masks, stop_ids,
               torch.tensor(sorted(special), device=device), NoiseSchedule(cfg.schedule, cfg.t_eps), logits_hook,
               tokens_hook, trained is not None, ContextCache(model.model, max_len) if cached else None)

    was_training = model.training
    model.eval()
    try:
        out = torch.empty((batch, 0), dtype=torch.long, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        ctx_blocks = torch.zeros_like(ctx)  # the block of each context column: 0 for the prompt
        step = nfe = 0
        rows = active.nonzero().squeeze(1)
        for b, start in enumerate(range(0, cfg.max_new_tokens, block)):
            size = min(block, cfg.max_new_tokens - start)
            previous, rows = rows, active.nonzero().squeeze(1)
            window = _window(ctx[rows], ctx_mask[rows], ctx_blocks[rows], None if max_len is None else max_len - size)
            if run.context is not None:  # the columns it has not encoded: the prompt, then the last block
                kept = torch.isin(previous, rows).nonzero().squeeze(1)
                columns = (window[0], window[1]) if b == 0 else (out[rows, -block:], ctx_mask[rows, -block:])
                run.context.start_block(kept, *columns)
            if b == 0:
                yield SamplerState(0, 0, ctx.new_full((batch, size), token_ids.mask), 0, False)
            for blk, block_nfe, last in _denoise_block(run, *window, size, step, b + 1):
                step += 1
                finished = torch.isin(blk, stop_ids).any(1)
                done = last and (start + size >= cfg.max_new_tokens or bool(finished.all()))
                canvas = torch.cat([out, _expand_rows(blk, rows, batch, token_ids.pad)], 1)
                yield SamplerState(step, b, canvas, nfe + block_nfe, done)
            nfe += block_nfe
            out = canvas
            ctx = torch.cat([ctx, canvas[:, -size:]], 1)
            ctx_mask = torch.cat([ctx_mask, active.long()[:, None].expand(batch, size)], 1)
            ctx_blocks = torch.cat([ctx_blocks, ctx_blocks.new_full((batch, size), b + 1)], 1)
            active[rows[finished]] = False
            if not active.any():
                break
    finally:
        model.train(was_training)


@dataclass
class _Run:
    """What every step of one `stream` call needs."""

    model: torch.nn.Module
    cfg: SamplerConfig
    ids: TokenIds
    gen: torch.Generator
    never: torch.Tensor
    """Ids never drawn: mask, pad, im_start."""
    banned_at_masks: list[int]
    """`never` and <|delete|>: the ids never drawn at a masked position."""
    stops: torch.Tensor
    """Stop token ids in effect."""
    special: torch.Tensor
    """Special and stop token ids: n-grams with one of them are not guarded against repeating."""
    schedule: NoiseSchedule
    """The noise schedule of ancestral steps."""
    logits_hook: LogitsHook | None
    tokens_hook: TokensHook | None
    block_causal: bool
    """The model attends block-causally (`trained_block_size`): a block sees itself and the clean
    earlier blocks and prompt, never what follows."""
    context: ContextCache | None
    """The exact cache of a block-causal model's prompt and finished blocks (None: uncached)."""


def _splits(model: torch.nn.Module, logits_hook: LogitsHook | None) -> bool:
    """Whether the sampler may run ModernBERT's backbone and head apart (no hook needs all logits)."""
    return logits_hook is None and getattr(getattr(model, "config", None), "model_type", None) == "modernbert"


def _denoise_block(
    run: _Run, context: torch.Tensor, context_mask: torch.Tensor, context_blocks: torch.Tensor, size: int,
    first_step: int, block_number: int,
) -> Iterator[tuple[torch.Tensor, int, bool]]:
    """Denoise `size` masks after the context in at most cfg.steps steps; after each step yield
    the block (rows, size), the forward passes so far and whether the block is finished. The block
    is block `block_number` after the context's (`context_blocks`: the block of each column).
    With cfg.canvas_blocks > 1 the masks are revealed window by window, left to right, each window
    with its share of the steps (a window whose masks are all revealed hands over at once).
    When the strategy's rule compacts (and without editing) a row leaves the forward batch once it
    is finished."""
    cfg, rule, mask_id = run.cfg, run.cfg.rule, run.ids.mask
    rows, width = context.shape
    blk = context.new_full((rows, size), mask_id)
    attn = torch.cat([context_mask, context_mask.new_ones((rows, size))], 1)
    blocks = torch.cat([context_blocks, context_blocks.new_full((rows, size), block_number)], 1)
    forward = _Forward(run, width, blocks if run.block_causal else None)
    compact = rule.compacts and not cfg.edit
    live = torch.arange(rows, device=context.device)
    # p(token) when each position was revealed: what remask="conf" remasks by
    revealed_p = blk.new_zeros((rows, size), dtype=torch.float64) if cfg.remask == "conf" else None
    windows = _windows(size, cfg.steps, cfg.canvas_blocks)
    j = 0
    for k, (end, budget) in enumerate(windows):
        for i in range(budget):
            final = k == len(windows) - 1 and i == budget - 1
            current = blk[live] if compact else blk
            x = torch.cat([context[live] if compact else context, current], 1)
            get_draw = functools.partial(forward, first_step + j, x, attn[live] if compact else attn, live)
            current_p = None if revealed_p is None else (revealed_p[live] if compact else revealed_p)
            new, new_p = _denoise_step(run, current, current_p, get_draw, budget - i, budget,
                                       cfg.edit and not final, end)
            blk = blk.index_put((live,), new) if compact else new
            if revealed_p is not None:
                revealed_p = revealed_p.index_put((live,), new_p) if compact else new_p
            if run.tokens_hook is not None:
                blk = run.tokens_hook(first_step + j, torch.cat([context, blk], 1))[:, width:]
            j += 1
            pending = blk == mask_id
            if rule.ends_at_stop:
                pending &= ~after_stop(blk, run.stops)
            unfinished = pending.any(1)
            last = final or (not cfg.edit and not bool(unfinished.any()))
            if last and rule.ends_at_stop:
                blk = blk.masked_fill(blk == mask_id, run.ids.pad)
            yield blk, forward.nfe, last
            if last:
                return
            if compact:
                live = unfinished.nonzero().squeeze(1)
            if not cfg.edit and not bool(pending[live, :end].any()):
                break


def _windows(size: int, steps: int, blocks: int) -> list[tuple[int, int]]:
    """(end position, steps) of each window of `canvas_blocks` decoding: `blocks` equal windows of
    the `size` positions (fewer when size < blocks), the steps split as evenly as they go."""
    width = -(-size // blocks)
    ends = sorted({min(size, (k + 1) * width) for k in range(blocks)})
    return [(end, steps // len(ends) + (k < steps % len(ends))) for k, end in enumerate(ends)]


class _Forward:
    """Token draws at the block positions that need one.

    The model runs only when asked and its input changed since the last run (ancestral steps that
    reveal nothing need none); `nfe` counts the runs. For ModernBERT without a logits hook, the
    vocabulary projection runs on the requested positions alone. Steps that draw at masks only (no
    editing), without nucleus filtering, for a strategy that needs no more than p(drawn token),
    draw straight from the hidden states (`draw_from_hidden`) without ever making the (positions,
    vocab) logits, on CPU when those would exceed PROJECTION_CHUNK (on a GPU the many small chunk
    kernels would cost more than the memory traffic they save)."""

    def __init__(self, run: _Run, width: int, blocks: torch.Tensor | None) -> None:
        self.run, self.width = run, width
        self.split = _splits(run.model, run.logits_hook)
        self.may_draw_from_hidden = (self.split and run.cfg.top_p == 1 and not run.cfg.rule.needs_distribution
                                     and not run.cfg.no_repeat_ngram_size)
        self.nfe = 0
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, block hidden or logits)
        self.blocks = blocks
        """Block of every input column of a block-causal model (rows of the block's batch, columns)."""
        self.prefix = PrefixCache(run.model.model, width) if self.split and run.cfg.prefix_cache and blocks is None \
            else None

    def _block_output(self, x: torch.Tensor, attn: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        if self.cached is None or not torch.equal(self.cached[0], x):
            model, width = self.run.model, self.width
            if self.run.context is not None:
                out, forwards = self.run.context(live, x[:, width:])
                self.nfe += forwards - 1
            elif self.prefix is not None:
                out = self.prefix(x, attn, live)
            elif self.blocks is not None:
                positions = torch.arange(x.shape[1], device=x.device)
                masks = block_forward_masks(model.config, self.blocks[live], (positions >= width).expand_as(x),
                                            attn.bool(), positions, next(model.parameters()).dtype)
                out = (model.model(input_ids=x, attention_mask=masks).last_hidden_state if self.split
                       else model(input_ids=x, attention_mask=masks).logits)[:, width:]
            elif self.split:
                out = model.model(input_ids=x, attention_mask=attn).last_hidden_state[:, width:]
            else:
                out = model(input_ids=x, attention_mask=attn).logits[:, width:]
            self.cached = (x.clone(), out)
            self.nfe += 1
        return self.cached[1]

    def _draws_from_hidden(self, hidden: torch.Tensor, editing: bool) -> bool:
        logits = hidden.shape[0] * self.run.model.decoder.out_features
        return self.may_draw_from_hidden and not editing and hidden.device.type == "cpu" and logits > PROJECTION_CHUNK

    def __call__(self, step: int, x: torch.Tensor, attn: torch.Tensor, live: torch.Tensor, positions: torch.Tensor,
                 masked_at: torch.Tensor, editing: bool) -> Drawn:
        """Tokens drawn at `positions` (a bool mask of the block) for the block's rows `live`;
        `masked_at` says which of those positions are masks (never drawn as <|delete|>)."""
        run, model = self.run, self.run.model
        out = self._block_output(x, attn, live)
        if self.split:
            hidden = model.head(out[positions])
            if self._draws_from_hidden(hidden, editing):
                return draw_from_hidden(hidden, model.decoder.weight, model.decoder.bias, run.banned_at_masks,
                                        run.cfg.temperature, run.gen)
            lg = model.decoder(hidden)
        else:
            lg = (out if run.logits_hook is None else run.logits_hook(step, x, out))[positions]
        lg = lg.float()
        lg.index_fill_(1, run.never, float("-inf"))
        if run.ids.delete is not None:
            lg[:, run.ids.delete].masked_fill_(masked_at, float("-inf"))
        if run.cfg.no_repeat_ngram_size:
            self._guard(lg, x, attn, positions, masked_at)
        return draw(lg, run.cfg.temperature, run.cfg.top_p, run.gen)

    def _guard(self, lg: torch.Tensor, x: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor,
               masked_at: torch.Tensor) -> None:
        """The repetition guard on the logits `lg` of the drawn `positions`: at the masked ones,
        tokens that would repeat an n-gram of the row's context or block."""
        run, width = self.run, self.width
        targets = torch.zeros_like(x, dtype=torch.bool)
        targets[:, width:][positions] = masked_at
        plain = attn.bool() & (x != run.ids.mask) & ~torch.isin(x, run.special)
        rows, at, tokens = repeated_ngram_completions(x, targets, plain, run.cfg.no_repeat_ngram_size)
        index = torch.full(positions.shape, -1, dtype=torch.long, device=x.device)
        index[positions] = torch.arange(lg.shape[0], device=x.device)
        penalise(lg, index[rows, at - width], tokens, run.cfg.ngram_penalty)


def _expand_rows(current: torch.Tensor, rows: torch.Tensor, batch: int, pad_id: int) -> torch.Tensor:
    """The block of the active `rows` placed into a (batch, size) tensor, pad in the other rows."""
    full = current.new_full((batch, current.shape[1]), pad_id)
    full[rows] = current
    return full


def _window(ids: torch.Tensor, mask: torch.Tensor, blocks: torch.Tensor,
            max_ctx: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop columns that are padding in every row, then keep at most the last `max_ctx` columns
    (of the ids, their attention mask and their blocks)."""
    lead = int((mask.cumsum(1) == 0).sum(1).min()) if ids.shape[1] else 0
    if max_ctx is not None:
        lead = max(lead, ids.shape[1] - max_ctx)
    return ids[:, lead:], mask[:, lead:], blocks[:, lead:]


def _denoise_step(
    run: _Run,
    blk: torch.Tensor,
    revealed_p: torch.Tensor | None,
    get_draw: Callable[[torch.Tensor, torch.Tensor, bool], Drawn],
    remaining: int,
    steps: int,
    editing: bool,
    end: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One reverse step t -> s on the block (batch, size), t = remaining / steps and s = t - 1 / steps;
    `remaining` counts this step too; only masks before position `end` may be revealed (the
    window of canvas_blocks decoding; `steps` are the window's). Returns the new block and
    `revealed_p` (p(token) when each position was revealed, kept for remask="conf", else None)
    brought up to date.
    `get_draw(positions, masked_at, editing)` draws tokens at the block positions `positions`."""
    cfg, rule, ids, gen = run.cfg, run.cfg.rule, run.ids, run.gen
    t, s = remaining / steps, (remaining - 1) / steps
    masked = blk == ids.mask
    remasked, repaid = _remasked(run, blk, masked, revealed_p, t, s)
    masked_all = masked
    if end < masked.shape[1]:  # a canvas_blocks window: only its masks may be revealed
        masked = masked.clone()
        masked[:, end:] = False
    reveal = None
    if rule.score is None:
        # positions are chosen independently of the tokens, so tokens are drawn for them alone
        p = run.schedule.reveal_probability(t, s, repaid)
        u = torch.rand(masked.shape, generator=gen, dtype=torch.float64, device=blk.device)
        reveal = masked & (u < p)
    cand = torch.ones_like(masked) if editing else (masked if reveal is None else reveal)
    if not bool(cand.any()):
        return blk.masked_fill(remasked, ids.mask), revealed_p
    cand_masked = masked_all[cand]
    dist = get_draw(cand, cand_masked, editing)
    tok = dist.tokens
    drawn = blk.clone()
    drawn[cand] = tok

    if rule.score is not None:
        score = blk.new_full(masked.shape, float("-inf"), dtype=torch.float64)
        score[cand] = rule.score(dist).double()
        score = score.masked_fill(~masked, float("-inf"))
        left = masked.sum(1)
        # what finishes within the steps left, the tokens remasked now included
        count = torch.minimum(left, (left + remasked.sum(1) + remaining - 1) // remaining)
        if rule.commit == "threshold":
            chosen = threshold_commit(score, count, cfg.threshold)
        elif rule.commit == "entropy_bound":
            chosen = entropy_bound_commit(-score, count, cfg.eb_gamma)
        else:
            sample = cfg.position_selection == "sample"
            chosen = select_positions(score, count, sample, cfg.position_temperature, gen)
        reveal = masked & chosen
    update = reveal

    if editing:
        current = blk[cand]
        conf = dist.confidence()
        gain_c = (conf - dist.prob_of(current)).double()
        eligible = ~cand_masked & (tok != current) & (conf >= cfg.edit_threshold)
        gain = blk.new_full(masked.shape, float("-inf"), dtype=torch.float64)
        gain[cand] = gain_c.masked_fill(~eligible, float("-inf"))
        cap = torch.ceil((~masked_all).sum(1) * cfg.edit_rate).long()
        edits = select_positions(gain, cap) & torch.isfinite(gain)
        update = update | edits

    new = torch.where(update, drawn, blk).masked_fill(remasked, ids.mask)
    if revealed_p is not None:
        p_drawn = torch.zeros_like(revealed_p)
        p_drawn[cand] = dist.confidence().double()
        revealed_p = torch.where(update, p_drawn, revealed_p)
    if editing and ids.delete is not None:
        deleted = edits & (drawn == ids.delete) & ~remasked
        if bool(deleted.any()):
            new = delete_shift(new, deleted, ids.mask)
            if revealed_p is not None:
                revealed_p = delete_shift(revealed_p, deleted, 0.0)
    return new, revealed_p


def _remasked(run: _Run, blk: torch.Tensor, masked: torch.Tensor, revealed_p: torch.Tensor | None,
              t: float, s: float) -> tuple[torch.Tensor, float]:
    """ReMDM: the revealed generated tokens masked again on the step t -> s (a bool mask of the
    block), and the remasking probability the ancestral reveal pays back at the masks: sigma_t for
    cap and rescale, 0 for conf (whose masks keep the MDLM posterior, as in ReMDM)."""
    cfg = run.cfg
    if cfg.remask == "off":
        return torch.zeros_like(masked), 0.0
    bound = run.schedule.remask_bound(t, s)
    sigma = {"cap": min(cfg.remask_eta, bound), "rescale": cfg.remask_eta * bound, "conf": bound}[cfg.remask]
    revealed = ~masked & (blk != run.ids.pad)
    repaid = 0.0 if cfg.remask == "conf" else sigma
    if sigma == 0 or not bool(revealed.any()):  # no draw: the random stream stays that of remask="off"
        return torch.zeros_like(masked), repaid
    if cfg.remask != "conf":
        prob = revealed.double() * sigma
    else:
        assert revealed_p is not None
        weight = torch.exp(-revealed_p).masked_fill(~revealed, 0.0)
        prob = sigma * weight / weight.sum(1, keepdim=True).clamp(min=torch.finfo(weight.dtype).tiny)
    u = torch.rand(masked.shape, generator=run.gen, dtype=torch.float64, device=blk.device)
    return revealed & (u < prob), repaid
