"""GRPO of `dgpt_core.rlhf.grpo` on a toy task a tiny random model cannot do at first: the reward
is the share of answer tokens drawn from a set of 8 of its 64 tokens."""

import copy

import pytest
import torch

from dgpt_core.config.rl import RLConfig
from dgpt_core.generation.options import SamplerConfig
from dgpt_core.generation.schedules import NoiseSchedule
from dgpt_core.rlhf.grpo import answer_target, group_advantages, grpo_loss, grpo_step
from tests.tiny_models import IDS, tiny_modernbert

WANTED = set(range(40, 48))


def share_wanted(_: int, answer: list[int]) -> float:
    return sum(t in WANTED for t in answer) / 3


def test_advantages_are_centred_per_group_and_zero_for_a_flat_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5]), 4)
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64), atol=1e-5, rtol=0)
    assert adv[4:].abs().max() == 0
    assert group_advantages(torch.tensor([2.0, 0.0]), 2, scale=False).tolist() == [1.0, -1.0]


def test_the_loss_is_the_policy_gradient_at_ratio_one_and_clips_beyond_it():
    cfg = RLConfig(kl_coef=0.0, clip_eps=0.2)
    logp = torch.tensor([-2.0, -3.0], dtype=torch.float64, requires_grad=True)
    adv, tokens = torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([2.0, 2.0], dtype=torch.float64)
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), adv, tokens, cfg)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / tokens / 2)  # d/dlogp of -mean(A * ratio) at ratio 1
    assert stats["clip_fraction"] == 0 and stats["kl"] == 0
    far = torch.tensor([-1.0, -3.0], dtype=torch.float64, requires_grad=True)  # answer 0's ratio e^0.5 > 1.2
    loss, stats = grpo_loss(far, logp.detach(), logp.detach(), adv, tokens, cfg)
    loss.backward()
    assert far.grad[0] == 0 and stats["clip_fraction"] == 0.5
    cfg = RLConfig(kl_coef=1.0)
    _, stats = grpo_loss(far.detach(), far.detach(), logp.detach(), adv, tokens, cfg)
    assert stats["kl"] > 0


def test_an_answer_is_trained_as_the_sft_rows_end_it():
    assert answer_target([7, 8, 9], True, IDS, 8) == [7, 8, 9, IDS.im_end, IDS.eos, IDS.eos, IDS.eos, IDS.eos]
    assert answer_target([7, 8], True, IDS, 1) == [7, 8, IDS.im_end]
    assert answer_target([7, 8, 9], False, IDS, 8) == [7, 8, 9]


@pytest.mark.parametrize("estimator", ["one_step", "elbo"])
def test_grpo_raises_the_reward_of_a_toy_task_within_a_few_dozen_steps(estimator):
    policy = tiny_modernbert().train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    cfg = RLConfig(per_device_batch_size=4, group_size=8, learning_rate=3e-3, estimator=estimator, kl_coef=0.01,
                   inner_steps=2, elbo_t_points=2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    sampler = SamplerConfig(strategy="random", steps=3, max_new_tokens=3, stop_token_ids=[])
    prompts = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [13, 14]]
    rewards = [grpo_step(policy, reference, optimizer, prompts, share_wanted, cfg, IDS, sampler, seed,
                         NoiseSchedule("linear"))["reward"] for seed in range(30)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.35 and last > first + 0.3, rewards
