"""Group-relative policy optimisation (GRPO) of a diffusion model on verifiable rewards.

A step samples `group_size` answers for each of its prompts with the model's own decoder (the
folder's sampler defaults at `RLConfig.temperature`), scores them with the task's reward, and
normalises each group's rewards into advantages. The policy then takes `inner_steps` updates of
the clipped surrogate with a KL term to the frozen reference (SFT) model. The log-likelihood of an
answer is a sequence-level estimate (`likelihood`), so the ratio is the sequence's, normalised
per answer token (GSPO's length-normalised ratio): exp((log p_new - log p_old) / tokens). The same
estimator noise (prompt masks for `one_step`, t-grid masks for `elbo`) is used for the policy,
its rollout-time copy and the reference at each inner step, so the ratio is 1 and the KL 0
wherever the weights agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..config.rl import RLConfig
from ..diffusion.elbo import Row
from ..generation.options import SamplerConfig, TokenIds, trained_block_size
from ..generation.sampler import generate
from ..generation.schedules import NoiseSchedule
from .likelihood import answer_rows, elbo_logp, one_step_logp

Reward = Callable[[int, list[int]], float]
"""reward(prompt index, answer token ids up to the stop token) -> a number."""


def answer_target(answer: list[int], stopped: bool, ids: TokenIds, pad_to: int) -> list[int]:
    """The tokens whose likelihood is trained: an answer as an SFT row ends it (its tokens,
    <|im_end|>, then <|endoftext|> up to a multiple of `pad_to`), or as generated if it never
    stopped."""
    if not stopped:
        return list(answer)
    tokens = [*answer, ids.im_end]
    return tokens + [ids.eos] * (-len(tokens) % pad_to)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Rewards (groups * group_size,) centred on their group's mean, divided by the group's
    standard deviation with `scale` (a group of equal rewards gets advantage 0)."""
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, unbiased=False, keepdim=True) + 1e-6)
    return centred.view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              tokens: torch.Tensor, cfg: RLConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """-(clipped surrogate - kl_coef * KL) averaged over the answers, and its parts. Per answer:
    ratio = exp((logp - old_logp) / tokens); KL to the reference by the k3 estimator of the
    per-token log ratio d = (ref_logp - logp) / tokens: exp(d) - d - 1 (>= 0)."""
    ratio = torch.exp((logp - old_logp) / tokens)
    clipped = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    d = (ref_logp - logp) / tokens
    kl = torch.exp(d) - d - 1
    loss = -(surrogate - cfg.kl_coef * kl).mean()
    stats = {"kl": float(kl.detach().mean()), "ratio": float(ratio.detach().mean()),
             "clip_fraction": float(((ratio - clipped).abs() > 0).double().mean())}
    return loss, stats


def estimate_logp(model: torch.nn.Module, rows: Sequence[Row], cfg: RLConfig, ids: TokenIds, seed: int,
                  schedule: NoiseSchedule, block_size: int | None) -> torch.Tensor:
    """log p(answer | prompt) of every row by `cfg.estimator` for a model trained with
    `block_size`, its random masks drawn from `seed` (the same seed, the same masks)."""
    kw = {"mask_id": ids.mask, "pad_id": ids.pad, "block_size": block_size}
    if cfg.estimator == "one_step":
        return one_step_logp(model, rows, prompt_mask_prob=cfg.prompt_mask_prob,
                             generator=torch.Generator().manual_seed(seed), **kw)
    return elbo_logp(model, rows, [seed * 100_003 + r for r in range(len(rows))], schedule=schedule,
                     t_points=cfg.elbo_t_points, mask_draws=cfg.elbo_mask_draws, **kw)


@dataclass
class Rollout:
    """One step's sampled answers and what the updates need of them."""

    rows: list[Row]
    rewards: torch.Tensor
    advantages: torch.Tensor
    tokens: torch.Tensor
    """Trained tokens per answer (float64)."""
    old_logp: list[torch.Tensor]
    """Per inner step after the first: the rollout-time policy's estimate on that step's masks (at
    the first the weights have not moved, so the policy's own estimate, detached, is it)."""
    ref_logp: list[torch.Tensor]
    """Per inner step: the reference model's estimate on that step's masks."""
    seeds: list[int]
    answer_tokens: float
    """Mean answer length up to the stop token."""


@torch.no_grad()
def rollout(policy: torch.nn.Module, reference: torch.nn.Module, prompts: Sequence[list[int]], reward: Reward,
            cfg: RLConfig, ids: TokenIds, sampler: SamplerConfig, seed: int, schedule: NoiseSchedule) -> Rollout:
    """Sample the groups of `prompts` (prompt i's rewards say `reward(i, ...)`), score them, and
    estimate the rollout-time and reference log-likelihoods for each inner step."""
    was_training = policy.training
    policy.eval()
    try:
        batch = [p for p in prompts for _ in range(cfg.group_size)]
        result = generate(policy, batch, ids, sampler.replace(temperature=cfg.temperature, seed=seed))
        block_size = trained_block_size(policy)
        pad_to = block_size or 1
        targets = [answer_target(a, s, ids, pad_to) for a, s in zip(result.answers, result.stopped)]
        rewards = torch.tensor([reward(i // cfg.group_size, a) for i, a in enumerate(result.answers)],
                               dtype=torch.float64)
        rows = answer_rows(batch, targets)
        seeds = [seed * 1_000 + k for k in range(cfg.inner_steps)]
        old = [estimate_logp(policy, rows, cfg, ids, s, schedule, block_size) for s in seeds[1:]]
        ref = [estimate_logp(reference, rows, cfg, ids, s, schedule, block_size) for s in seeds]
    finally:
        policy.train(was_training)
    return Rollout(rows, rewards, group_advantages(rewards, cfg.group_size, cfg.scale_advantages),
                   torch.tensor([max(len(t), 1) for t in targets], dtype=torch.float64), old, ref, seeds,
                   sum(len(a) for a in result.answers) / len(result.answers))


def grpo_step(policy: torch.nn.Module, reference: torch.nn.Module, optimizer: torch.optim.Optimizer,
              prompts: Sequence[list[int]], reward: Reward, cfg: RLConfig, ids: TokenIds, sampler: SamplerConfig,
              seed: int, schedule: NoiseSchedule) -> dict[str, float]:
    """One GRPO step on `prompts`: rollout, then `cfg.inner_steps` clipped updates. Returns the
    step's reward, advantage-free share (groups whose answers all scored the same), KL, clipping
    share, loss and answer length."""
    batch = rollout(policy, reference, prompts, reward, cfg, ids, sampler, seed, schedule)
    device = next(policy.parameters()).device
    advantages, tokens = batch.advantages.to(device), batch.tokens.to(device)
    parts: dict[str, float] = {}
    loss = torch.zeros(())
    block_size = trained_block_size(policy)
    for k, mask_seed in enumerate(batch.seeds):
        logp = estimate_logp(policy, batch.rows, cfg, ids, mask_seed, schedule, block_size)
        old = logp.detach() if k == 0 else batch.old_logp[k - 1]
        loss, parts = grpo_loss(logp, old, batch.ref_logp[k], advantages, tokens, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
    flat = batch.rewards.view(-1, cfg.group_size)
    return {"reward": float(batch.rewards.mean()), "loss": float(loss.detach()),
            "flat_groups": float((flat.std(1) == 0).double().mean()), "answer_tokens": batch.answer_tokens, **parts}
