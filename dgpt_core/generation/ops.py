"""Tensor primitives of the sampler: token draws (from logits, or straight from hidden states),
the strategies' position scores, position selections, threshold commits (Fast-dLLM), entropy
bounded commits (EB-sampler), the repetition guard's n-gram search, stop detection and deletion
shifts.

Imports only torch: like `sampler.py`, this file is copied beside the weights of exported model
folders (see export.PIPELINE_FILES) and imported there by the `text-diffusion` pipeline.
"""

from __future__ import annotations

import torch


class Drawn:
    """Tokens drawn per row, and the distribution they were drawn from, normalised on demand.

    At a large vocabulary every full pass over the (rows, vocab) logits costs about as much as
    the rest of a sampler step, so nothing is computed before it is asked for: greedy ancestral
    steps make one pass (the max), greedy confidence steps three (max, exp, sum), and only the
    margin and entropy scores write the normalised distribution."""

    def __init__(self, tokens: torch.Tensor, weights: torch.Tensor | None, total: torch.Tensor | None,
                 logits: torch.Tensor | None = None, row_max: torch.Tensor | None = None,
                 confidence: torch.Tensor | None = None) -> None:
        self.tokens = tokens
        self._weights, self._total = weights, total  # unnormalised probabilities and their row sums
        self._logits, self._row_max = logits, row_max  # greedy: turned into weights on first use
        self._confidence = confidence  # p(tokens), when known without the distribution

    @classmethod
    def tokens_only(cls, tokens: torch.Tensor, confidence: torch.Tensor) -> Drawn:
        """Drawn tokens and their probabilities alone (see `draw_from_hidden`): `confidence()` only."""
        return cls(tokens, None, None, confidence=confidence)

    def confidence(self) -> torch.Tensor:
        """p(tokens[r]) for each row r."""
        return self._confidence if self._confidence is not None else self.prob_of(self.tokens)

    def _unnormalised(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None:
            if self._logits is None or self._row_max is None:
                raise RuntimeError("this draw kept only the drawn tokens' probabilities (Drawn.tokens_only)")
            self._weights = self._logits.sub_(self._row_max[:, None]).exp_()
            self._total = self._weights.sum(-1)
        assert self._total is not None
        return self._weights, self._total

    def prob_of(self, ids: torch.Tensor) -> torch.Tensor:
        """p(ids[r]) for each row r."""
        weights, total = self._unnormalised()
        return weights.gather(1, ids[:, None]).squeeze(1) / total

    def probs(self) -> torch.Tensor:
        """The whole (rows, vocab) distribution (normalised in place)."""
        weights, total = self._unnormalised()
        weights.div_(total[:, None])
        self._total = torch.ones_like(total)
        return weights


def draw(lg: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> Drawn:
    """Draw one token per row of float32 logits (greedy at temperature 0); `lg` is overwritten
    (writing a fresh (rows, vocab) tensor costs more than the arithmetic at a large vocabulary)."""
    if temperature == 0:
        row_max, tokens = max_and_argmax(lg)
        return Drawn(tokens, None, None, logits=lg, row_max=row_max)
    if temperature != 1:
        lg.div_(temperature)
    weights = lg.sub_(lg.amax(-1, keepdim=True)).exp_()
    if top_p < 1:
        probs = weights.div_(weights.sum(-1, keepdim=True))
        sorted_p, order = probs.sort(-1, descending=True)
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        weights = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    tokens, _, total = categorical(weights, gen)
    return Drawn(tokens, weights, total.to(weights.dtype))


PROJECTION_CHUNK = 1 << 22
"""Logits per column chunk of `draw_from_hidden` (16 MiB in float32); below this many logits in
all, a plain projection followed by `draw` makes fewer operations and is as fast."""


def draw_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, banned: list[int],
    temperature: float, gen: torch.Generator, chunk_elements: int = PROJECTION_CHUNK,
) -> Drawn:
    """Like `draw` on the logits `hidden @ weight.T + bias` (any float dtype, rows of `hidden`)
    with the `banned` columns at -inf and top_p 1, without ever making those (rows, vocab) logits.

    The projection runs in column chunks of about `chunk_elements` logits, written into one
    reused buffer, and each chunk is reduced while it is still in cache. Greedy: the chunk's max
    and argmax. Sampling: one exact draw within the chunk (inverse CDF over sums of 64-column
    blocks, then within the chosen block, in float64), merged across chunks by weighted reservoir
    sampling (the running choice is replaced by the chunk's with probability chunk mass / mass so
    far), which draws from the whole distribution exactly. Either way the drawn token's
    probability comes from the chunks' log-sum-exps. On CPU at a 50k vocabulary, allocating the
    projection's output and re-reading it for the softmax cost a third of the projection itself."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    width = max(1024, min(vocab, chunk_elements // max(rows, 1)))
    pieces = -(-vocab // width)
    width = -(-vocab // pieces // 64) * 64  # equal chunks of whole blocks: no short tail the banned ids could fill
    buffer = hidden.new_empty((rows, width))
    offsets = torch.arange(64, device=hidden.device)
    log_mass = hidden.new_full((rows,), float("-inf"), dtype=torch.float64)  # log-sum-exp of the chunks so far
    chosen = torch.zeros(rows, dtype=torch.long, device=hidden.device)
    chosen_logit = hidden.new_full((rows,), float("-inf"), dtype=torch.float64)
    for start in range(0, vocab, width):
        end = min(vocab, start + width)
        out = buffer[:, : end - start]
        if bias is None:
            torch.mm(hidden, weight[start:end].t(), out=out)
        else:
            torch.addmm(bias[start:end], hidden, weight[start:end].t(), out=out)
        out = out.float()  # itself for float32 models
        local = [i - start for i in banned if start <= i < end]
        if local:
            out[:, local] = float("-inf")
        if temperature not in (0, 1):
            out.div_(temperature)
        if temperature == 0:
            top, pick = max_and_argmax(out)
        else:
            top = out.amax(-1)
        top = top.clamp(min=torch.finfo(out.dtype).min)  # a fully banned chunk has mass 0, not nan
        weights = out.sub_(top[:, None]).exp_()
        top = top.double()
        if temperature == 0:
            pick_logit, mass = top, weights.sum(-1)
        else:
            pick, pick_weight, mass = categorical(weights, gen, offsets)
            pick_logit = pick_weight.double().log() + top
        chunk_log_mass = mass.double().log() + top
        merged = torch.logaddexp(log_mass, chunk_log_mass)
        if temperature == 0:
            take = pick_logit > chosen_logit  # strict: the first chunk keeps a tie, like argmax
        else:
            u = torch.rand(rows, generator=gen, dtype=torch.float64, device=hidden.device)
            take = u < (chunk_log_mass - merged).exp()
        chosen = torch.where(take, pick + start, chosen)
        chosen_logit = torch.where(take, pick_logit, chosen_logit)
        log_mass = merged
    return Drawn.tokens_only(chosen, (chosen_logit - log_mass).exp().to(torch.float32))


def categorical(
    weights: torch.Tensor, gen: torch.Generator, offsets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One exact inverse-CDF draw per row of unnormalised probabilities (rows, n), the CDF and the
    uniform in float64; returns (columns, their weights, row sums). `offsets`: arange(64), if at hand.

    As precise as float64 Gumbel-max (bucket widths are relative, so no tail is truncated) but
    one random number per row instead of one per vocabulary entry: a float64 Gumbel draw cost
    most of a step at a 4k vocabulary, and a flat float64 cumsum over the vocabulary is slow on
    CPU, so the CDF runs over the sums of 64-column blocks, then within the chosen block."""
    if offsets is None:
        offsets = torch.arange(64, device=weights.device)
    rows, n = weights.shape
    full = n - n % 64
    sums = weights[:, :full].unflatten(1, (-1, 64)).sum(-1)
    if full < n:
        sums = torch.cat([sums, weights[:, full:].sum(-1, keepdim=True)], 1)
    sums = sums.double()
    cdf = sums.cumsum(-1)
    u = torch.rand((rows, 1), generator=gen, dtype=torch.float64, device=weights.device) * cdf[:, -1:]
    block = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    rest = u - (cdf - sums).gather(1, block)
    columns = block * 64 + offsets
    inside = columns < n
    values = weights.gather(1, columns.clamp(max=n - 1)).masked_fill_(~inside, 0.0)
    inner = values.double().cumsum(-1)
    k = torch.searchsorted(inner, rest, right=True).clamp_(max=63)
    picked = values.gather(1, k)
    bad = picked == 0  # float64 rounding at a block edge: take the block's heaviest column instead
    if bool(bad.any()):
        k = torch.where(bad, values.argmax(-1, keepdim=True), k)
        picked = values.gather(1, k)
    return columns.gather(1, k).squeeze(1), picked.squeeze(1), cdf[:, -1]


def max_and_argmax(lg: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the largest value and its first index, like `lg.max(-1)`.

    On CPU, reductions that also return indices are 4x (max) to 12x (argmax) slower than `amax`
    at a 50k vocabulary, so the index is looked for in the one chunk that holds the maximum."""
    rows, vocab = lg.shape
    full = vocab - vocab % chunk
    chunk_max = lg[:, :full].unflatten(1, (-1, chunk)).amax(-1)
    if full < vocab:
        chunk_max = torch.cat([chunk_max, lg[:, full:].amax(-1, keepdim=True)], 1)
    top, block = chunk_max.max(-1)
    start = block * chunk
    columns = (start[:, None] + torch.arange(chunk, device=lg.device)).clamp_(max=vocab - 1)
    first = (lg.gather(1, columns) == top[:, None]).int().argmax(-1)
    return top, start + first


def confidence_score(drawn: Drawn) -> torch.Tensor:
    """Per drawn position: p(drawn token)."""
    return drawn.confidence()


def margin_score(drawn: Drawn) -> torch.Tensor:
    """Per drawn position: p1 - p2, the gap between the two likeliest tokens."""
    top2 = drawn.probs().topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def neg_entropy_score(drawn: Drawn) -> torch.Tensor:
    """Per drawn position: -H(p)."""
    probs = drawn.probs()
    return (probs * probs.clamp(min=torch.finfo(probs.dtype).tiny).log()).sum(-1)  # 2-3x faster than entr


def select_positions(
    score: torch.Tensor,
    count: torch.Tensor,
    sample: bool = False,
    temperature: float = 1.0,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Per row, a bool mask of the `count` highest scores, or `count` positions sampled without
    replacement from softmax(score / temperature) (Gumbel-top-k, drawn from `gen`)."""
    if sample:
        noise = torch.empty_like(score).exponential_(generator=gen)
        score = score / temperature - noise.log()
    order = score.argsort(dim=1, descending=True)
    take = torch.arange(score.shape[1], device=score.device)[None, :] < count[:, None]
    return torch.zeros_like(take).scatter_(1, order, take)


def threshold_commit(score: torch.Tensor, least: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM parallel commit: every position whose score (confidence) reaches `threshold`, and
    at least the `least` best of each row (`score` is -inf where nothing may be committed, and
    `least` must not exceed the committable positions of the row)."""
    return select_positions(score, least) | (score >= threshold)


def entropy_bound_commit(entropy: torch.Tensor, least: torch.Tensor, gamma: float) -> torch.Tensor:
    """EB-sampler (Ben-Hamu et al. 2025): per row, the positions in order of lowest entropy while
    their summed entropy stays within `gamma`, and at least the `least` lowest (`entropy` is +inf
    where nothing may be committed; `least` must not exceed the committable positions of the row,
    and is at least 1 in every row with one)."""
    ordered, order = entropy.sort(dim=1)
    within = ordered.cumsum(1) <= gamma
    take = within | (torch.arange(entropy.shape[1], device=entropy.device)[None, :] < least[:, None])
    return torch.zeros_like(take).scatter_(1, order, take & torch.isfinite(ordered))


def repeated_ngram_completions(
    seq: torch.Tensor, targets: torch.Tensor, plain: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens that would make an n-gram already present in the row: the repetition guard.

    `seq` (rows, L) are the ids of the model input (context and block), `plain` (rows, L) marks
    the positions whose token counts (visible, not special), `targets` (rows, L) the masked
    positions to guard. For each target i and each window of n positions around it whose other
    n - 1 positions are plain, every plain n-gram of the row equal to the window on those positions
    gives its token at i's place. Unlike transformers' NoRepeatNGramLogitsProcessor, which looks
    only at the n - 1 tokens left of the next position, a diffusion canvas fills in any order, so
    the windows where i is first, middle or last all count. n = 1 gives every plain token of the
    row (what transformers' repetition_penalty penalises). Returns (row, position, token) triples."""
    rows, length = seq.shape
    empty = seq.new_empty(0)
    if length < n or not bool(targets.any()):
        return empty, empty, empty
    grams = seq.unfold(1, n, 1)  # (rows, G, n)
    gram_plain = plain.unfold(1, n, 1)
    whole = gram_plain.all(-1)  # (rows, G): n-grams that may be repeated
    equal = grams[:, :, None, :] == grams[:, None, :, :]  # (rows, window a, gram j, n)
    out_r, out_p, out_t = [], [], []
    for k in range(n):
        others = [m for m in range(n) if m != k]
        window_ok = targets[:, k : k + grams.shape[1]] & gram_plain[:, :, others].all(-1)
        match = equal[..., others].all(-1) & window_ok[:, :, None] & whole[:, None, :]
        r, a, j = match.nonzero(as_tuple=True)
        out_r.append(r)
        out_p.append(a + k)
        out_t.append(grams[r, j, k])
    return torch.cat(out_r), torch.cat(out_p), torch.cat(out_t)


def penalise(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, penalty: float | None) -> None:
    """In place: logits[rows, tokens] to -inf (penalty None), else divided by `penalty` where
    positive and multiplied where negative (CTRL, as transformers' repetition_penalty)."""
    if rows.numel() == 0:
        return
    if penalty is None:
        logits[rows, tokens] = float("-inf")
        return
    picked = logits[rows, tokens]
    logits[rows, tokens] = torch.where(picked > 0, picked / penalty, picked * penalty)


def after_stop(blk: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """Positions at or after each row's first stop token (all False in a row without one)."""
    return torch.isin(blk, stop_ids).cumsum(1) > 0


def delete_shift(blk: torch.Tensor, deleted: torch.Tensor, mask_id: int | float) -> torch.Tensor:
    """Remove the `deleted` positions of each row, shift the rest left and fill the tail with
    `mask_id` (masks; any fill value for a tensor kept aligned with the block)."""
    order = torch.argsort(deleted.to(torch.uint8), dim=1, stable=True)
    shifted = blk.gather(1, order)
    size = blk.shape[1]
    tail = torch.arange(size, device=blk.device)[None, :] >= size - deleted.sum(1, keepdim=True)
    return shifted.masked_fill(tail, mask_id)
