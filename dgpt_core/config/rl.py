"""Settings of the reinforcement-learning stage after SFT: group-relative policy optimisation
(GRPO) of the diffusion model on verifiable rewards (`dgpt_core.rlhf`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrictConfig


class RLConfig(StrictConfig):
    """One GRPO step: `prompts_per_step` prompts, `group_size` answers each sampled with the
    model's own decoder, rewards normalised within each group, then `inner_steps` updates of the
    clipped, KL-regularised objective on that batch."""

    prompts_per_step: int = Field(8, gt=0)
    """Prompts drawn per step."""
    group_size: int = Field(8, gt=1)
    """Answers sampled per prompt; their rewards are normalised within the group."""
    inner_steps: int = Field(1, gt=0)
    """Optimizer updates per sampled batch (d1's mu); above 1 the clipping takes effect."""
    learning_rate: float = Field(1e-5, gt=0)
    """AdamW learning rate (constant)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """PPO clipping of the likelihood ratio to [1 - eps, 1 + eps]."""
    kl_coef: float = Field(0.04, ge=0)
    """Weight of the KL term to the reference (SFT) model (k3 estimator, per answer token)."""
    estimator: Literal["one_step", "elbo"] = "one_step"
    """log p(answer | prompt) estimate (`dgpt_core.rlhf.likelihood`): d1's one-step estimate, or the
    MDLM ELBO on a fixed t grid."""
    prompt_mask_prob: float = Field(0.15, ge=0, lt=1)
    """one_step: the share of prompt tokens masked, drawn afresh at every inner step (d1)."""
    elbo_t_points: int = Field(4, gt=0)
    """elbo: points of the stratified t grid."""
    elbo_mask_draws: int = Field(1, gt=0)
    """elbo: seeded masks per grid point; the policy, its old copy and the reference are scored on
    the same masks."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the group's answers (the folder's decoding otherwise; its greedy
    default would give identical answers and no advantage)."""
    scale_advantages: bool = True
    """Divide each group's centred rewards by their standard deviation (GRPO); False keeps them
    centred only (Dr. GRPO)."""
