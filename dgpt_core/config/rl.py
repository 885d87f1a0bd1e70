"""Settings of the reinforcement-learning stage after SFT: group-relative policy optimisation
(GRPO) of the diffusion model on verifiable rewards (`dgpt_core.rlhf`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .training import LaunchedTrainingConfig

RLTask = Literal["world", "skills"]
WorldQuestion = Literal["attribute", "reversal", "biography"]


class RLConfig(LaunchedTrainingConfig):
    """The `rl` stage: each optimizer step draws `per_device_batch_size` prompts per device,
    samples `group_size` answers for each with the model's own decoder, normalises the rewards
    within each group, and takes `inner_steps` updates of the clipped, KL-regularised objective on
    that batch (one update per optimizer step of the loop, so `max_steps` counts updates)."""

    enabled: bool = False
    """Run the stage after SFT (its model is then the run's final model)."""
    task: RLTask = "world"
    """Where the prompts and rewards come from: `world`, the train people's questions (exact match
    against the stored value; a biography scores the F1 of its facts); `skills`, the train split of
    the synthetic skills (exact match)."""
    world_questions: list[WorldQuestion] = Field(default_factory=lambda: ["attribute", "reversal"])
    """world: the kinds of questions asked (attribute questions, reversed questions, biography
    requests)."""
    max_prompts: int | None = Field(None, gt=0)
    """Use at most this many prompts of the task (a seeded sample); None = all."""
    per_device_batch_size: int = Field(8, gt=0)
    """Prompts per device per step (each sampled `group_size` times)."""
    max_steps: int = Field(60, gt=0)
    """Optimizer updates to run."""
    learning_rate: float = Field(1e-5, gt=0)
    """AdamW learning rate."""
    lr_scheduler: str = "constant"
    """transformers scheduler name."""
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    """Fraction of steps spent in linear warmup."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    logging_steps: int = Field(1, gt=0)
    """Log reward, KL, answer length and loss every N optimizer steps."""
    group_size: int = Field(8, gt=1)
    """Answers sampled per prompt; their rewards are normalised within the group."""
    inner_steps: int = Field(1, gt=0)
    """Updates per sampled batch (d1's mu); above 1 the clipping takes effect."""
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

    @model_validator(mode="after")
    def _rollouts_are_whole_in_checkpoints(self) -> RLConfig:
        if self.inner_steps > 1 and self.gradient_accumulation_steps > 1:
            raise ValueError("rl.inner_steps > 1 needs gradient_accumulation_steps=1 (each update reuses one rollout)")
        if self.save_steps and self.save_steps % self.inner_steps:
            raise ValueError(f"rl.save_steps={self.save_steps} must be a multiple of inner_steps={self.inner_steps}: "
                             "a checkpoint falls between rollouts")
        return self

