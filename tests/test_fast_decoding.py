"""Confidence-threshold parallel decoding (Fast-dLLM): invariants on a tiny random ModernBERT."""

from __future__ import annotations

import pytest
import torch
from transformers import ModernBertForMaskedLM

from dgpt_core.generation.pipeline import TextDiffusionPipeline
from dgpt_core.generation.sampler import SamplerConfig, generate, left_pad, stream

from .tiny_models import IDS, PROMPTS, tiny_modernbert


@pytest.fixture(scope="module")
def model() -> ModernBertForMaskedLM:
    return tiny_modernbert()


def threshold(**kw) -> SamplerConfig:
    return SamplerConfig(strategy="threshold", **{"stop_token_ids": (), "seed": 0, **kw})


def certain(token_at: dict[int, int], default: int = 7):
    """A logits hook making `default` certain at every block position, `token_at[i]` at position i."""

    def hook(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, -1e4)
        forced[..., default] = 1e4
        for pos, token in token_at.items():
            forced[:, pos] = -1e4
            forced[:, pos, token] = 1e4
        return forced

    return hook


def masks_per_row(canvas: torch.Tensor) -> torch.Tensor:
    return (canvas == IDS.mask).sum(1)


@pytest.mark.parametrize("block_size", [None, 4])
def test_fills_canvas_keeps_prompt_commits_every_step_counts_nfe(model, block_size):
    cfg = threshold(steps=64, max_new_tokens=12, block_size=block_size)
    states = list(stream(model, PROMPTS, IDS, cfg))
    for before, after in zip(states, states[1:]):
        if after.block == before.block:  # at least one commit per row that still has masks
            had = masks_per_row(before.canvas)
            assert (masks_per_row(after.canvas)[had > 0] < had[had > 0]).all()
        else:  # the first step of a new block
            assert (masks_per_row(after.canvas) < block_size).all()
        assert after.nfe == after.step  # one forward per step taken, none wasted
    final = states[-1]
    assert final.done and not (final.canvas == IDS.mask).any() and final.canvas.shape == (2, 12)
    result = generate(model, PROMPTS, IDS, cfg)
    assert result.nfe == final.nfe == len(states) - 1 <= 12
    prompt_ids, _ = left_pad(PROMPTS, IDS.pad)
    assert torch.equal(result.canvas[:, : result.prompt_width], prompt_ids)
    assert torch.equal(result.canvas[:, result.prompt_width :], final.canvas)


def test_at_least_one_commit_per_step_when_nothing_is_confident(model):
    # a random model is never 0.999-confident: exactly one commit per step (the best), so 10 steps
    states = list(stream(model, PROMPTS, IDS, threshold(threshold=0.999, steps=64, max_new_tokens=10)))
    counts = [masks_per_row(s.canvas).tolist() for s in states]
    assert counts == [[10 - k, 10 - k] for k in range(11)]
    assert states[-1].nfe == 10


def test_steps_is_a_cap(model):
    result = generate(model, PROMPTS, IDS, threshold(threshold=0.999, steps=3, max_new_tokens=10))
    assert result.nfe == 3 and not (result.canvas == IDS.mask).any()


def test_certain_model_decodes_in_one_pass(model):
    result = generate(model, PROMPTS, IDS, threshold(steps=16, max_new_tokens=12), logits_hook=certain({}))
    assert result.nfe == 1
    assert (result.canvas[:, result.prompt_width :] == 7).all()


def test_low_threshold_commits_everything_at_once(model):
    result = generate(model, PROMPTS, IDS, threshold(threshold=1e-9, steps=16, max_new_tokens=12))
    assert result.nfe == 1 and not (result.canvas == IDS.mask).any()


def test_full_canvas_stops_once_every_answer_is_complete(model):
    # positions 0-2 certain (7, 7, <|im_end|>), the rest uncertain: one pass, the tail becomes pad
    def hook(step, x, logits):
        logits = logits.clone()
        logits[:, :3] = certain({2: IDS.im_end})(step, x, logits)[:, :3]
        return logits

    cfg = threshold(steps=16, max_new_tokens=12, stop_token_ids=(IDS.im_end,))
    result = generate(model, PROMPTS, IDS, cfg, logits_hook=hook)
    assert result.nfe == 1
    assert result.answers == [[7, 7], [7, 7]] and result.stopped == [True, True]
    assert not (result.canvas == IDS.mask).any()


def test_block_decoding_stops_at_the_block_holding_the_stop_token(model):
    seen_blocks = []

    def hook(step, x, logits):
        second = bool((x[:, : x.shape[1] - 4] == 7).any())  # the context already holds block 0
        seen_blocks.append(second)
        return certain({1: IDS.im_end} if second else {})(step, x, logits)

    cfg = threshold(steps=8, max_new_tokens=16, block_size=4, stop_token_ids=(IDS.im_end,))
    result = generate(model, PROMPTS, IDS, cfg, logits_hook=hook)
    assert result.nfe == 2 and seen_blocks == [False, True]  # one pass per block, blocks 3-4 never run
    assert result.answers == [[7, 7, 7, 7, 7]] * 2 and result.stopped == [True, True]
    assert result.canvas.shape[1] == result.prompt_width + 8


def test_finished_rows_leave_the_forward_batch(model):
    batch_sizes = []

    def hook(step, x, logits):  # the row whose prompt starts with 10 is certain, the other is not
        batch_sizes.append(x.shape[0])
        return torch.where((x == 10).any(1)[:, None, None], certain({})(step, x, logits), logits)

    result = generate(model, PROMPTS, IDS, threshold(threshold=0.999, steps=8, max_new_tokens=8), logits_hook=hook)
    assert batch_sizes == [2] + [1] * 7 and result.nfe == 8
    assert result.answers[0] == [7] * 8 and not (result.canvas == IDS.mask).any()


def test_reproducible_with_a_seed(model):
    cfg = threshold(threshold=0.5, steps=16, max_new_tokens=12, temperature=1.0)
    a, b = generate(model, PROMPTS, IDS, cfg, seed=5), generate(model, PROMPTS, IDS, cfg, seed=5)
    assert torch.equal(a.canvas, b.canvas) and a.nfe == b.nfe


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_threshold_validated(value):
    with pytest.raises(ValueError, match="threshold"):
        SamplerConfig(strategy="threshold", threshold=value)


def test_pipeline_passes_threshold_through(tiny_model, tiny_tokenizer):
    pipe = TextDiffusionPipeline(model=tiny_model.eval(), tokenizer=tiny_tokenizer, device="cpu")
    out = pipe("the cat", strategy="threshold", threshold=1e-9, steps=8, max_new_tokens=8, seed=0)
    assert out[0]["nfe"] == 1
