"""Invariants of the repetition-safe and adaptive decoding options: ReMDM remasking, the
entropy-bounded strategy (EB-sampler) and the repetition guard, and the decoding method names."""

from __future__ import annotations

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from dgpt_core.generation.ops import entropy_bound_commit, penalise, repeated_ngram_completions
from dgpt_core.generation.options import MODIFIERS, method_options
from dgpt_core.generation.sampler import SamplerConfig, generate, stream
from dgpt_core.generation.schedules import NoiseSchedule

from .tiny_models import IDS, PROMPTS, tiny_modernbert


@pytest.fixture(scope="module")
def model():
    return tiny_modernbert(initializer_range=0.5)


def states(model, **options) -> list:
    cfg = SamplerConfig(stop_token_ids=(), seed=0, max_new_tokens=12, **options)
    return list(stream(model, PROMPTS, IDS, cfg))


def reveal_counts(canvases: list[torch.Tensor]) -> torch.Tensor:
    """Per position, how many times it went from mask to a token."""
    counts = torch.zeros_like(canvases[0])
    for before, after in zip(canvases, canvases[1:]):
        counts += ((before == IDS.mask) & (after != IDS.mask)).long()
    return counts


@pytest.mark.parametrize("strategy", ["random", "confidence", "threshold", "eb"])
def test_without_remasking_every_position_is_revealed_exactly_once(model, strategy):
    run = states(model, strategy=strategy, steps=6, temperature=1.0)
    assert (reveal_counts([s.canvas for s in run]) == 1).all()
    assert not (run[-1].canvas == IDS.mask).any()


@pytest.mark.parametrize("remask", ["cap", "rescale", "conf"])
@pytest.mark.parametrize("strategy", ["random", "confidence", "eb"])
def test_remasking_remasks_only_generated_tokens_and_finishes(model, remask, strategy):
    hooked: list[torch.Tensor] = []

    def record(step: int, x: torch.Tensor) -> torch.Tensor:
        hooked.append(x.clone())
        return x

    cfg = SamplerConfig(stop_token_ids=(), seed=0, max_new_tokens=12, steps=8, strategy=strategy,
                        remask=remask, remask_eta=0.5)
    run = list(stream(model, PROMPTS, IDS, cfg, tokens_hook=record))
    canvases = [s.canvas for s in run]
    remasks = sum(((a != IDS.mask) & (b == IDS.mask)).sum() for a, b in zip(canvases, canvases[1:]))
    assert remasks > 0, "eta 0.5 over 8 steps remasks something"
    width = hooked[0].shape[1] - 12
    prompt = hooked[0][:, :width]
    assert all(torch.equal(x[:, :width], prompt) for x in hooked), "the prompt is never remasked"
    assert not (canvases[-1] == IDS.mask).any(), "the last step remasks nothing and reveals everything"


def test_remasking_off_and_eta_zero_change_nothing(model):
    plain = generate(model, PROMPTS, IDS, SamplerConfig(stop_token_ids=(), seed=3, steps=6, max_new_tokens=12,
                                                        strategy="confidence"))
    capped = generate(model, PROMPTS, IDS, SamplerConfig(stop_token_ids=(), seed=3, steps=6, max_new_tokens=12,
                                                         strategy="confidence", remask="cap", remask_eta=0.0))
    assert torch.equal(plain.canvas[:, plain.prompt_width :], capped.canvas[:, capped.prompt_width :])


def test_remask_bound_and_compensated_reveal_probability():
    schedule = NoiseSchedule("linear")
    assert schedule.remask_bound(0.5, 0.25) == pytest.approx(0.25 / 0.5)
    assert schedule.remask_bound(1.0, 0.9) == 1.0  # nothing is clean at t = 1
    assert schedule.remask_bound(0.1, 0.0) == 0.0  # the last step keeps every token
    # sigma = 0 is MDLM; remasking sigma alpha_t of the clean tokens is paid back at the masks
    assert schedule.reveal_probability(0.5, 0.25, 0.0) == pytest.approx(0.5)
    assert schedule.reveal_probability(0.5, 0.25, 0.2) == pytest.approx((0.75 - 0.8 * 0.5) / 0.5)


def test_eb_reveals_at_least_one_per_step_and_more_with_a_larger_budget(model):
    for gamma in (0.0, 1e-9):
        run = states(model, strategy="eb", steps=12, eb_gamma=gamma)
        new = [int(((a == IDS.mask) & (b != IDS.mask)).sum(1).min()) for a, b in
               zip([s.canvas for s in run], [s.canvas for s in run[1:]])]
        assert min(new) >= 1
    tight = generate(model, PROMPTS, IDS, SamplerConfig(strategy="eb", steps=12, max_new_tokens=12, eb_gamma=0.0,
                                                        stop_token_ids=()))
    loose = generate(model, PROMPTS, IDS, SamplerConfig(strategy="eb", steps=12, max_new_tokens=12, eb_gamma=1e6,
                                                        stop_token_ids=()))
    assert tight.nfe == 12 and loose.nfe == 1


def test_entropy_bound_commit_takes_the_lowest_entropies_within_the_budget():
    inf = float("inf")
    entropy = torch.tensor([[0.5, 0.1, inf, 0.2, 3.0], [2.0, 2.5, inf, inf, inf]], dtype=torch.float64)
    chosen = entropy_bound_commit(entropy, torch.tensor([1, 1]), gamma=0.35)
    assert chosen.tolist() == [[False, True, False, True, False], [True, False, False, False, False]]
    floor = entropy_bound_commit(entropy, torch.tensor([3, 2]), gamma=0.0)
    assert floor.tolist() == [[True, True, False, True, False], [True, True, False, False, False]]


def test_guard_changes_nothing_when_no_ngram_repeats(model):
    # a hook making each position's own distinct token certain: nothing can repeat
    def distinct(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, -1e4)
        for i in range(logits.shape[1]):
            out[:, i, 30 + i] = 1e4
        return out

    base = SamplerConfig(stop_token_ids=(), seed=0, steps=12, max_new_tokens=12, strategy="confidence")
    plain = generate(model, PROMPTS, IDS, base, logits_hook=distinct)
    guarded = generate(model, PROMPTS, IDS, base.replace(no_repeat_ngram_size=2), logits_hook=distinct)
    assert torch.equal(plain.canvas, guarded.canvas)
    assert plain.answers[0] == list(range(30, 42))


def test_guard_bans_the_token_that_would_repeat_an_ngram(model):
    # the prompt holds "10 11 12"; the block's first two positions are forced to 10 11, the rest
    # prefers 12: the guard (n = 3) must not complete "10 11 12" at position 2
    def hook(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, -1e4)
        out[:, 0, 10] = out[:, 1, 11] = 1e4
        out[:, 2:, 12] = 1e3
        out[:, 2:, 13] = 1e2
        return out

    cfg = SamplerConfig(stop_token_ids=(), seed=0, steps=6, max_new_tokens=6, strategy="confidence", temperature=0)
    plain = generate(model, [[10, 11, 12]], IDS, cfg, logits_hook=hook)
    guarded = generate(model, [[10, 11, 12]], IDS, cfg.replace(no_repeat_ngram_size=3), logits_hook=hook)
    assert plain.answers[0][:3] == [10, 11, 12]
    assert guarded.answers[0][:3] == [10, 11, 13]


def test_ngram_completions_match_transformers_left_to_right():
    """At the next position of a fully visible prefix, the guard bans what transformers'
    NoRepeatNGramLogitsProcessor bans; with n = 1 and a penalty it is repetition_penalty."""
    torch.manual_seed(0)
    seq = torch.randint(6, 12, (3, 20))
    vocab = 16
    for n in (2, 3):
        ours = torch.zeros((3, vocab), dtype=torch.bool)
        masked = torch.cat([seq, torch.full((3, 1), IDS.mask)], 1)
        targets = torch.zeros_like(masked, dtype=torch.bool)
        targets[:, -1] = True
        rows, _, tokens = repeated_ngram_completions(masked, targets, masked != IDS.mask, n)
        ours[rows, tokens] = True
        theirs = NoRepeatNGramLogitsProcessor(n)(seq, torch.zeros((3, vocab))) == float("-inf")
        assert torch.equal(ours, theirs)
    logits = torch.randn(3, vocab)
    masked = torch.cat([seq, torch.full((3, 1), IDS.mask)], 1)
    targets = torch.zeros_like(masked, dtype=torch.bool)
    targets[:, -1] = True
    rows, _, tokens = repeated_ngram_completions(masked, targets, masked != IDS.mask, 1)
    ours = logits.clone()
    penalise(ours, rows, tokens, 1.3)
    assert torch.allclose(ours, RepetitionPenaltyLogitsProcessor(1.3)(seq, logits.clone()))


def test_ngram_completions_look_both_ways():
    # "5 6 7" earlier; the masked position sits before "6 7": 5 would repeat the 3-gram
    seq = torch.tensor([[5, 6, 7, 9, IDS.mask, 6, 7]])
    targets = seq == IDS.mask
    rows, at, tokens = repeated_ngram_completions(seq, targets, seq != IDS.mask, 3)
    assert list(zip(at.tolist(), tokens.tolist())) == [(4, 5)]


def test_method_names():
    assert method_options("confidence") == {"strategy": "confidence"}
    assert method_options("confidence+guard+remdm_conf") == {"strategy": "confidence", **MODIFIERS["guard"],
                                                              **MODIFIERS["remdm_conf"]}
    assert SamplerConfig().for_method("eb+guard").no_repeat_ngram_size == MODIFIERS["guard"]["no_repeat_ngram_size"]
    with pytest.raises(ValueError, match="'nope'"):
        method_options("confidence+nope")
    with pytest.raises(ValueError, match="'fast'"):
        method_options("fast")


@pytest.mark.parametrize("strategy", ["random", "confidence", "threshold", "eb"])
def test_canvas_blocks_reveal_window_by_window_once_each(model, strategy):
    run = states(model, strategy=strategy, steps=8, canvas_blocks=3, temperature=1.0)  # windows 0-3, 4-7, 8-11
    canvases = [s.canvas for s in run]
    assert (reveal_counts(canvases) == 1).all() and not (canvases[-1] == IDS.mask).any()
    for before, after in zip(canvases, canvases[1:]):
        new = (before == IDS.mask) & (after != IDS.mask)
        for end in (4, 8):  # nothing past a window's end is revealed while the window has masks
            assert not (new[:, end:].any(1) & (before[:, :end] == IDS.mask).any(1)).any()
    if strategy in ("random", "confidence"):  # fixed steps: 3 + 3 + 2 shares of 8
        assert len(run) - 1 == 8


def test_canvas_blocks_may_not_exceed_the_steps():
    with pytest.raises(ValueError, match="canvas_blocks=5"):
        SamplerConfig(steps=4, canvas_blocks=5)
