"""The ancestral sampler follows the noise schedule the model was trained with."""

from __future__ import annotations

import math

import pytest
from transformers import ModernBertForMaskedLM

from dgpt_core.generation.sampler import SamplerConfig, generate, stream
from dgpt_core.generation.schedules import NoiseSchedule
from dgpt_core.models.info import ModelInfo

from .tiny_models import IDS, PROMPTS, tiny_modernbert


@pytest.fixture(scope="module")
def model() -> ModernBertForMaskedLM:
    return tiny_modernbert()


@pytest.mark.parametrize("name", ["linear", "loglinear"])
def test_linear_schedules_reveal_one_over_the_remaining_steps(name):
    schedule = NoiseSchedule(name, 1e-3)  # loglinear: (1 - eps) cancels out of the ratio
    steps = 8
    for remaining in range(steps, 0, -1):
        p = schedule.reveal_probability(remaining / steps, (remaining - 1) / steps)
        assert p == pytest.approx(1 / remaining, rel=1e-9)


def test_reveal_probability_formula_last_step_and_zero_over_zero():
    def alpha(t: float) -> float:
        return 1 - math.cos(math.pi / 2 * (1 - t))

    cosine = NoiseSchedule("cosine")
    expected = (alpha(0.25) - alpha(0.5)) / (1 - alpha(0.5))
    assert cosine.reveal_probability(0.5, 0.25) == pytest.approx(expected)
    assert cosine.reveal_probability(1 / 8, 0.0) == 1.0
    assert NoiseSchedule("loglinear", eps=1.0).reveal_probability(0.5, 0.25) == 1.0  # alpha = 1: 0/0


def test_cosine_first_step_reveals_the_schedule_fraction(model):
    """8 steps: the first step t = 1 -> s = 7/8 reveals (alpha(s) - alpha(1)) / (1 - alpha(1)) =
    1 - cos(pi / 16) ~ 1.9 % of the masks under the cosine schedule, not the linear 1/8."""
    rows, canvas = 256, 16
    prompts = [[10 + i % 40] for i in range(rows)]
    cfg = SamplerConfig(strategy="random", schedule="cosine", steps=8, max_new_tokens=canvas, seed=0)
    states = stream(model, prompts, IDS, cfg)
    next(states)
    first = next(states)
    revealed = float((first.canvas != IDS.mask).double().mean())
    expected = 1 - math.cos(math.pi / 16)
    n = rows * canvas
    assert abs(revealed - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert abs(revealed - 1 / 8) > 0.05


@pytest.mark.parametrize("schedule", ["linear", "loglinear", "cosine"])
def test_every_schedule_reveals_everything_by_the_last_step(model, schedule):
    cfg = SamplerConfig(strategy="random", schedule=schedule, steps=5, max_new_tokens=12, seed=1,
                        stop_token_ids=())
    result = generate(model, PROMPTS, IDS, cfg)
    assert not (result.canvas == IDS.mask).any()


def test_config_takes_the_model_info_defaults_and_validates_the_schedule():
    info = ModelInfo("sft", schedule="cosine", answer_canvas=8)
    cfg = SamplerConfig(**info.initial_sampler_defaults())
    assert (cfg.schedule, cfg.strategy, cfg.steps) == ("cosine", "confidence", 8)
    with pytest.raises(ValueError, match="schedule"):
        SamplerConfig(schedule="quadratic")
    with pytest.raises(ValueError, match="t_eps"):
        SamplerConfig(t_eps=1.0)
