"""Reinforcement learning after SFT: the answer log-likelihood estimates of a diffusion model
(`likelihood`: exact for short answers, d1's one-step estimate, the ELBO) and group-relative
policy optimisation on verifiable rewards (`grpo`)."""

from .. import lazy_exports

_EXPORTS = {
    "answer_rows": "likelihood", "exact_and_elbo": "likelihood",
    "one_step_logp": "likelihood", "elbo_logp": "likelihood",
    "Reward": "grpo", "Rollout": "grpo", "answer_target": "grpo", "group_advantages": "grpo", "grpo_loss": "grpo",
    "grpo_step": "grpo", "rollout": "grpo",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
