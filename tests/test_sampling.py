"""The plain sampler API on a tiny random ModernBERT (no tokenizer needed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import get_args

import pytest
import torch
from transformers import ModernBertForMaskedLM

from dgpt_core.generation.sampler import (
    STRATEGIES,
    SamplerConfig,
    Strategy,
    TokenIds,
    cut_at_stop,
    delete_shift,
    generate,
    left_pad,
    stream,
)

from .tiny_models import IDS, MAX_LEN, PROMPTS, tiny_modernbert

SCORE_STRATEGIES = tuple(s for s, rule in STRATEGIES.items() if rule.score is not None and rule.commit == "count")
"""The strategies that reveal a count of best-scored masks per step (where position_selection applies)."""


@pytest.fixture(scope="module")
def model() -> ModernBertForMaskedLM:
    # peaked logits, so greedy comparisons are not decided by float noise
    return tiny_modernbert(initializer_range=0.5)


def no_stop(**kw) -> SamplerConfig:
    return SamplerConfig(stop_token_ids=(), **kw)


def force_token(token: int, positions: slice) -> Callable[..., torch.Tensor]:
    """A logits hook making `token` certain at the given block positions."""

    def hook(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[:, positions] = -1e4
        logits[:, positions, token] = 1e4
        return logits

    return hook


@pytest.mark.parametrize(
    ("strategy", "selection"),
    [(s, "topk") for s in STRATEGIES if s not in SCORE_STRATEGIES]
    + [(s, sel) for s in SCORE_STRATEGIES for sel in ("topk", "sample")],
)
def test_strategy_fills_canvas_keeps_prompt_counts_nfe(model, strategy, selection):
    cfg = no_stop(strategy=strategy, position_selection=selection, steps=6, max_new_tokens=12, seed=0)
    result = generate(model, PROMPTS, IDS, cfg)
    prompt_ids, _ = left_pad(PROMPTS, IDS.pad)
    assert torch.equal(result.canvas[:, : result.prompt_width], prompt_ids)
    generated = result.canvas[:, result.prompt_width :]
    assert generated.shape == (2, 12)
    assert not (generated == IDS.mask).any()
    assert not torch.isin(generated, torch.tensor([IDS.pad, IDS.im_start, IDS.delete])).any()
    assert result.answers == generated.tolist() and result.stopped == [False, False]
    if strategy in SCORE_STRATEGIES:
        assert result.nfe == 6
    else:
        assert 1 <= result.nfe <= 6


def test_strategy_literal_names_the_table():
    assert get_args(Strategy) == tuple(STRATEGIES)


def test_model_sees_the_exact_prompt(model):
    seen = []

    def hook(step, x, logits):
        seen.append(x[:, : x.shape[1] - 8].clone())
        return logits

    generate(model, PROMPTS, IDS, no_stop(steps=4, max_new_tokens=8, seed=0), logits_hook=hook)
    prompt_ids, _ = left_pad(PROMPTS, IDS.pad)
    assert seen and all(torch.equal(s, prompt_ids) for s in seen)


@pytest.mark.parametrize("strategy", ["random", "confidence"])
def test_stop_token_cuts_answer_and_drops_eos_padding(model, strategy):
    def hook(step, x, logits):
        logits = force_token(IDS.im_end, slice(3, 4))(step, x, logits)
        return force_token(IDS.eos, slice(4, None))(step, x, logits)

    cfg = SamplerConfig(strategy=strategy, steps=4, max_new_tokens=10, seed=0)
    result = generate(model, PROMPTS, IDS, cfg, logits_hook=hook)
    generated = result.canvas[:, result.prompt_width :]
    assert result.stopped == [True, True]
    assert result.answers == generated[:, :3].tolist()
    assert (generated[:, 4:] == IDS.eos).all()


def test_cut_at_stop_first_of_several():
    generated = torch.tensor([[7, 0, 8, 4], [7, 8, 9, 9], [4, 7, 7, 7]])
    answers, stopped = cut_at_stop(generated, (4, 0))
    assert answers == [[7], [7, 8, 9, 9], []]
    assert stopped == [True, False, True]


def test_seed_reproducible_and_seeds_differ(model):
    cfg = no_stop(strategy="random", steps=8, max_new_tokens=16, temperature=1.0)
    a = generate(model, PROMPTS, IDS, cfg, seed=123).canvas
    b = generate(model, PROMPTS, IDS, cfg, seed=123).canvas
    c = generate(model, PROMPTS, IDS, cfg, seed=124).canvas
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_greedy_confidence_ignores_seed(model):
    cfg = no_stop(strategy="confidence", steps=4, max_new_tokens=8, temperature=0.0)
    assert torch.equal(
        generate(model, PROMPTS, IDS, cfg, seed=1).canvas, generate(model, PROMPTS, IDS, cfg, seed=2).canvas
    )


def test_unchanged_canvas_reuses_logits(model):
    # ancestral with far more steps than tokens: most steps reveal nothing and need no new forward
    result = generate(model, PROMPTS, IDS, no_stop(strategy="random", steps=64, max_new_tokens=8, seed=0))
    assert result.nfe <= 2 * 8  # a forward only after some row revealed a token
    assert not (result.canvas == IDS.mask).any()


def test_tokens_hook_filling_canvas_ends_forwards(model):
    def fill(step, x):
        return x.masked_fill(x == IDS.mask, 7)

    # confidence: step 0 always reveals (an unseeded ancestral step reveals nothing ~3 % of the time)
    result = generate(model, PROMPTS, IDS, no_stop(strategy="confidence", steps=5, max_new_tokens=8), tokens_hook=fill)
    assert result.nfe == 1  # after step 0 no mask is left, so later steps need no forward
    assert not (result.canvas == IDS.mask).any() and (result.canvas == 7).any()


def test_batched_prompts_match_single_prompts(model):
    cfg = no_stop(strategy="confidence", steps=4, max_new_tokens=8, temperature=0.0)
    batched = generate(model, PROMPTS, IDS, cfg).answers
    single = [generate(model, [p], IDS, cfg).answers[0] for p in PROMPTS]
    assert batched == single


def test_stream_yields_steps_plus_one_states_ending_in_final(model):
    cfg = no_stop(strategy="confidence", steps=5, max_new_tokens=10, seed=3)
    states = list(stream(model, PROMPTS, IDS, cfg))
    assert [s.step for s in states] == list(range(6))
    assert (states[0].canvas == IDS.mask).all() and states[0].nfe == 0
    assert [s.done for s in states] == [False] * 5 + [True]
    assert [s.nfe for s in states[1:]] == [1, 2, 3, 4, 5]
    masks = [int((s.canvas == IDS.mask).sum()) for s in states]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0
    final = generate(model, PROMPTS, IDS, cfg)
    assert torch.equal(states[-1].canvas, final.canvas[:, final.prompt_width :])


def test_edits_change_visible_tokens_but_not_on_the_last_step(model):
    cfg = no_stop(
        strategy="random", steps=6, max_new_tokens=16, edit=True, edit_threshold=0.0, edit_rate=1.0, seed=0
    )
    states = list(stream(model, PROMPTS, IDS, cfg))
    edited = 0
    for before, after in zip(states[1:-2], states[2:-1]):
        visible = before.canvas != IDS.mask
        edited += int((visible & (after.canvas != before.canvas)).sum())
    assert edited > 0
    before, final = states[-2].canvas, states[-1].canvas
    visible = before != IDS.mask
    assert torch.equal(final[visible], before[visible])
    assert not (final == IDS.mask).any()


def test_edit_threshold_one_blocks_uncertain_edits(model):
    cfg = no_stop(
        strategy="random", steps=6, max_new_tokens=16, edit=True, edit_threshold=1.0, edit_rate=1.0, seed=0
    )
    states = list(stream(model, PROMPTS, IDS, cfg))
    for before, after in zip(states, states[1:]):
        visible = before.canvas != IDS.mask
        assert torch.equal(after.canvas[visible], before.canvas[visible])


def test_delete_shift_removes_and_appends_masks():
    blk = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    deleted = torch.tensor([[False, True, False, True], [False, False, False, False]])
    assert delete_shift(blk, deleted, IDS.mask).tolist() == [[10, 12, 2, 2], [20, 21, 22, 23]]


def test_predicted_delete_removes_visible_generated_tokens(model):
    def hook(step, x, logits):
        if step == 1:  # make <|delete|> near-certain wherever it is allowed (visible positions)
            logits = logits.clone()
            logits[..., IDS.delete] = 1e4
        return logits

    cfg = no_stop(
        strategy="confidence", steps=4, max_new_tokens=8, edit=True, edit_threshold=0.5, edit_rate=1.0
    )
    states = list(stream(model, PROMPTS, IDS, cfg, seed=0, logits_hook=hook))
    after_first, after_second = states[1].canvas, states[2].canvas
    visible_before = (after_first != IDS.mask).sum(1)
    masks_before = (after_first == IDS.mask).sum(1)
    assert (visible_before == 2).all()
    # step 2 of 4 reveals ceil(masks / 3); every visible token is deleted, its slot a mask appended at the end
    expected_masks = masks_before - (masks_before + 2) // 3 + visible_before
    assert torch.equal((after_second == IDS.mask).sum(1), expected_masks)
    assert (after_second[:, -2:] == IDS.mask).all()
    assert not torch.isin(states[-1].canvas, torch.tensor([IDS.mask, IDS.delete])).any()


SPURIOUS = 9


def spurious_then_delete(delete: bool) -> Callable[..., torch.Tensor]:
    """A logits hook over an 8-token canvas: position i predicts 20 + i (confidence rising from
    0.88 at i = 0 to 0.93, below the edit threshold 0.99), position 7 <|im_end|> (0.95); step 0
    writes SPURIOUS at position 2 for sure, and with `delete` every visible SPURIOUS predicts
    <|delete|> for sure."""

    def hook(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        size = logits.shape[1]
        out = torch.full_like(logits, -1e4)
        pos = torch.arange(size)
        out[:, pos, 20 + pos] = 2.0 + 0.1 * pos.float()
        out[:, size - 1, 20 + size - 1] = -1e4
        out[:, size - 1, IDS.im_end] = 3.0
        out[:, :, 40] = 0.0
        if step == 0:
            out[:, 2] = -1e4
            out[:, 2, SPURIOUS] = 1e4
        if delete:
            out[..., IDS.delete] = torch.where(x[:, -size:] == SPURIOUS, 1e4, -1e4)
        return out

    return hook


def test_stream_shows_a_deleted_token_gone_and_a_mask_appended(model):
    """Step 1 (confidence, 8 masks over 4 steps) reveals positions 2 (SPURIOUS) and 7 (<|im_end|>);
    step 2 reveals 6 and 5 and deletes SPURIOUS: the tokens after it move left and a mask enters
    at the end. The final answer lacks SPURIOUS and is one token shorter than without deletion."""
    cfg = SamplerConfig(strategy="confidence", steps=4, max_new_tokens=8, temperature=0.0, edit=True,
                        edit_threshold=0.99, edit_rate=0.1)
    m, end = IDS.mask, IDS.im_end
    states = list(stream(model, PROMPTS, IDS, cfg, logits_hook=spurious_then_delete(True)))
    assert states[1].canvas.tolist() == [[m, m, SPURIOUS, m, m, m, m, end]] * 2
    assert states[2].canvas.tolist() == [[m, m, m, m, 25, 26, end, m]] * 2
    assert states[-1].canvas.tolist() == [[20, 21, 22, 23, 25, 26, end, end]] * 2
    kept = generate(model, PROMPTS, IDS, cfg, logits_hook=spurious_then_delete(False))
    deleted = generate(model, PROMPTS, IDS, cfg, logits_hook=spurious_then_delete(True))
    assert kept.answers == [[20, 21, SPURIOUS, 23, 24, 25, 26]] * 2
    assert deleted.answers == [[20, 21, 22, 23, 25, 26]] * 2 and deleted.stopped == [True, True]


def test_semi_autoregressive_beyond_max_length(model):
    widths = []

    def hook(step, x, logits):
        widths.append(x.shape[1])
        return logits

    cfg = no_stop(strategy="confidence", steps=3, max_new_tokens=150, block_size=16, seed=0)
    result = generate(model, PROMPTS, IDS, cfg, logits_hook=hook)
    generated = result.canvas[:, result.prompt_width :]
    assert generated.shape == (2, 150)
    assert not (generated == IDS.mask).any()
    assert result.nfe == math.ceil(150 / 16) * 3
    assert max(widths) == MAX_LEN


def test_block_as_long_as_the_model_trims_all_context(model):
    cfg = no_stop(strategy="confidence", steps=2, max_new_tokens=2 * MAX_LEN, block_size=MAX_LEN, seed=0)
    result = generate(model, PROMPTS, IDS, cfg)
    assert result.nfe == 4
    assert not (result.canvas == IDS.mask).any()


def test_full_canvas_trims_long_prompt(model):
    prompt = [list(range(6, 60))]  # 54 tokens + 16 new > 64
    result = generate(model, prompt, IDS, no_stop(steps=2, max_new_tokens=16, seed=0))
    assert result.canvas[0, :54].tolist() == prompt[0]
    assert not (result.canvas == IDS.mask).any()


def test_semi_autoregressive_stops_rows_at_their_stop_block(model):
    def hook(step, x, logits):
        stop_rows = (x == 10).any(1)  # the row whose prompt starts with 10
        forced = force_token(IDS.im_end, slice(0, 1))(step, x, logits)
        return torch.where(stop_rows[:, None, None], forced, logits)

    cfg = SamplerConfig(
        strategy="confidence", steps=2, max_new_tokens=32, block_size=8, stop_token_ids=(IDS.im_end,)
    )
    states = list(stream(model, PROMPTS, IDS, cfg, seed=0, logits_hook=hook))
    final = states[-1].canvas
    assert final.shape == (2, 32) and states[-1].done
    assert final[0, 0] == IDS.im_end and (final[0, 8:] == IDS.pad).all()
    assert not (final[1] == IDS.mask).any()


def test_semi_autoregressive_ends_when_every_row_stopped(model):
    cfg = SamplerConfig(strategy="confidence", steps=2, max_new_tokens=40, block_size=8, seed=0)
    result = generate(model, PROMPTS, IDS, cfg, logits_hook=force_token(IDS.im_end, slice(2, 3)))
    assert result.nfe == 2
    assert result.stopped == [True, True]
    assert result.canvas.shape[1] == result.prompt_width + 8


def test_top_p_keeps_only_the_nucleus():
    from dgpt_core.generation.ops import draw

    lg = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64).log().expand(2000, 4)
    gen = torch.Generator().manual_seed(0)
    dist = draw(lg.clone(), 1.0, 0.6, gen)  # draw overwrites its logits
    probs = dist.probs()
    assert probs.dtype == torch.float64
    assert set(dist.tokens.tolist()) == {0, 1}
    assert torch.allclose(probs[0], torch.tensor([4 / 7, 3 / 7, 0, 0], dtype=torch.float64))
    assert draw(lg.clone(), 1.0, 1e-9, gen).tokens.eq(0).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_draw_returns_the_softmax_of_the_scaled_logits(temperature):
    from dgpt_core.generation.ops import draw

    lg = torch.randn(5, 300)
    dist = draw(lg.clone(), temperature, 1.0, torch.Generator().manual_seed(0))
    expected = (lg / (temperature or 1.0)).softmax(-1)
    picked = expected.gather(1, dist.tokens[:, None]).squeeze(1)
    assert torch.allclose(dist.prob_of(dist.tokens), picked, atol=1e-6)
    assert torch.allclose(dist.probs(), expected, atol=1e-6)
    assert torch.allclose(dist.prob_of(dist.tokens), picked, atol=1e-6)  # still right after normalising
    if temperature == 0:
        assert torch.equal(dist.tokens, lg.argmax(-1))


def test_draw_from_hidden_greedy_matches_the_full_projection():
    from dgpt_core.generation.ops import draw_from_hidden

    torch.manual_seed(0)
    weight, bias, hidden = torch.randn(3000, 16), torch.randn(3000), torch.randn(7, 16)
    banned = [0, 5, 2999]
    weight[2000], bias[2000] = weight[100], bias[100]  # a tie across chunks for row 3: the first index wins
    hidden[3] = 10 * weight[100]
    dist = draw_from_hidden(hidden, weight, bias, banned, 0.0, torch.Generator(), chunk_elements=7 * 1024)
    reference = torch.nn.functional.linear(hidden, weight, bias)
    reference[:, banned] = float("-inf")
    assert torch.equal(dist.tokens, reference.argmax(-1)) and dist.tokens[3] == 100
    assert torch.allclose(dist.confidence(), reference.softmax(-1).amax(-1), rtol=1e-5)
    with pytest.raises(RuntimeError, match="tokens_only"):
        dist.probs()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draw_from_hidden_samples_the_softmax(temperature):
    """Three chunks of 1,024 columns, the last one partial; 100k draws of one row against its
    softmax: the total-variation distance stays at the sampling noise of `draw` itself."""
    from dgpt_core.generation.ops import draw, draw_from_hidden

    torch.manual_seed(0)
    vocab, rows = 3000, 100_000
    weight, bias = torch.randn(vocab, 16), torch.randn(vocab)
    hidden = torch.randn(1, 16).expand(rows, 16).contiguous()
    banned = [0, 5, vocab - 1]
    logits = torch.nn.functional.linear(hidden[:1], weight, bias)[0]
    logits[banned] = float("-inf")
    expected = (logits / temperature).softmax(-1).double()
    dist = draw_from_hidden(hidden, weight, bias, banned, temperature, torch.Generator().manual_seed(1),
                            chunk_elements=rows * 1024)
    freq = torch.bincount(dist.tokens, minlength=vocab).double() / rows
    assert freq[banned].sum() == 0
    assert torch.allclose(dist.confidence().double(), expected[dist.tokens], rtol=1e-4)
    plain = draw(logits.expand(rows, vocab).clone(), temperature, 1.0, torch.Generator().manual_seed(1))
    noise = 0.5 * (torch.bincount(plain.tokens, minlength=vocab).double() / rows - expected).abs().sum()
    assert 0.5 * (freq - expected).abs().sum() < 1.5 * noise


def test_draw_from_hidden_skips_a_fully_banned_chunk():
    from dgpt_core.generation.ops import draw_from_hidden

    torch.manual_seed(0)
    weight, hidden = torch.randn(2048, 8), torch.randn(4, 8)
    banned = list(range(1024))  # the whole first chunk
    for temperature in (0.0, 1.0):
        dist = draw_from_hidden(hidden, weight, None, banned, temperature, torch.Generator().manual_seed(0),
                                chunk_elements=4 * 1024)
        assert (dist.tokens >= 1024).all() and torch.isfinite(dist.confidence()).all()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_drawing_from_hidden_states_matches_drawing_from_logits(model, monkeypatch, strategy, temperature):
    """With the chunk threshold at 0 every step of a strategy that needs only p(drawn token) draws
    through `draw_from_hidden` (the others never do); an identity logits hook forces the logits
    path. Greedy runs agree token for token; sampled runs both finish."""
    from dgpt_core.generation import sampler as sampling

    cfg = no_stop(strategy=strategy, steps=4, max_new_tokens=8, temperature=temperature, seed=0, threshold=0.5)
    calls = []
    original = sampling.draw_from_hidden
    monkeypatch.setattr(sampling, "draw_from_hidden", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(sampling, "PROJECTION_CHUNK", 0)
    fused = generate(model, PROMPTS, IDS, cfg)
    plain = generate(model, PROMPTS, IDS, cfg, logits_hook=lambda step, x, logits: logits)
    assert bool(calls) != STRATEGIES[strategy].needs_distribution
    assert not (fused.canvas == IDS.mask).any()
    never = torch.tensor([IDS.mask, IDS.pad, IDS.im_start, IDS.delete])
    assert not torch.isin(fused.canvas[:, fused.prompt_width :], never).any()
    if temperature == 0:
        assert torch.equal(fused.canvas, plain.canvas)
        assert fused.nfe == plain.nfe


def test_config_validation_and_block_limit(model):
    with pytest.raises(ValueError, match="strategy"):
        SamplerConfig(strategy="best")
    with pytest.raises(ValueError, match="block_size"):
        generate(model, PROMPTS, IDS, max_new_tokens=200)
    with pytest.raises(TypeError):
        SamplerConfig().replace(temprature=0.5)


def test_token_ids_from_a_duck_typed_tokenizer():
    vocab = {"<|mask|>": 7, "<|pad|>": 8, "<|endoftext|>": 9, "<|im_end|>": 10}

    class Tok:
        def convert_tokens_to_ids(self, token):
            return vocab.get(token, 0)

        def convert_ids_to_tokens(self, idx):
            return {v: k for k, v in vocab.items()}.get(idx, "<unk>")

    ids = TokenIds.from_tokenizer(Tok())
    assert ids == TokenIds(mask=7, pad=8, eos=9, im_end=10, delete=None, im_start=None)
    assert ids.default_stops == (10, 9)


@pytest.mark.parametrize("vocab", [5, 64, 300, 1024])
def test_max_and_argmax_matches_torch_max_with_first_index_on_ties(vocab):
    from dgpt_core.generation.ops import max_and_argmax

    lg = torch.randn(7, vocab)
    lg[0] = 1.0  # every entry tied: the first index wins
    lg[1, vocab // 2] = lg[1, -1] = 50.0  # a tie across chunks
    lg[2, -1] = 60.0  # the maximum in the partial last chunk
    values, indices = max_and_argmax(lg)
    expected = lg.max(-1)
    assert torch.equal(values, expected.values)
    assert torch.equal(indices, lg.argmax(-1))
    assert indices[0] == 0 and indices[1] == vocab // 2 and indices[2] == vocab - 1
