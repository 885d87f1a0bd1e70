"""The diffusion objective of a training stage: MDLM masking and Seed Diffusion edit corruption."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrictConfig


class DiffusionConfig(StrictConfig):
    """The MDLM masking objective and Seed Diffusion edit corruption."""

    schedule: Literal["linear", "loglinear", "cosine"] = "linear"
    """Noise schedule alpha(t); linear is the original project's, loglinear MDLM's default."""
    t_eps: float = Field(1e-3, gt=0.0, lt=0.5)
    """t is clamped to [t_eps, 1] so the ELBO weight w(t) stays bounded."""
    t_sampling: Literal["uniform", "stratified"] = "stratified"
    """uniform: i.i.d. t per sequence; stratified: low-discrepancy t over the batch (lower variance)."""
    loss_weighting: Literal["elbo", "uniform"] = "elbo"
    """Weight of a masked token's cross-entropy: `elbo`, the schedule's w(t) (1/t for linear: the
    MDLM bound), or `uniform`, 1 at every t (masked-LM training; lower variance, no longer the
    bound). The validation ELBO always uses w(t)."""
    complementary_masking: bool = False
    """Every row enters the batch twice: once masked at its t, once with exactly the eligible
    tokens that mask left visible (at the schedule's complement time), so every eligible token is
    scored once per pair (a variance reduction). The batch holds twice per_device_batch_size
    rows: halve it to keep the compute."""
    loss_normalization: Literal["token", "sequence"] = "token"
    """token: divide summed loss by the number of eligible tokens (MDLM); sequence: by each
    sequence's eligible count, then average over sequences (LLaDA SFT)."""
    edit_start: float = Field(0.8, ge=0.0, le=1.0)
    """Fraction of training after which the edit stage starts (0.0 = edits from the first step,
    1.0 = never)."""
    edit_prob: float = Field(0.1, ge=0.0, le=1.0)
    """Probability that a visible eligible token is swapped for a random token in the edit stage."""
    edit_prob_final: float | None = Field(None, ge=0.0, le=1.0)
    """When set, edit_prob is linearly annealed to this value from the edit start to the end."""
    edit_loss_targets: Literal["visible", "corrupted"] = "visible"
    """Which visible tokens get the unweighted reconstruction loss in the edit stage: every
    visible eligible token (the original project) or only the swapped and inserted ones."""
    edit_loss_weight: float = Field(1.0, ge=0.0)
    """Multiplier of the edit loss in the total loss."""
    insert_prob: float = Field(0.0, ge=0.0, le=1.0)
    """Per visible eligible token, probability of inserting a spurious token before it (edit stage
    only), labelled <|delete|>: the model learns to flag tokens that should not be there, and the
    sampler's editing steps delete them."""
    insert_copy_prob: float = Field(0.5, ge=0.0, le=1.0)
    """Share of inserted tokens that copy the token they precede (a duplicated word); the rest
    are random non-special tokens."""
    block_size: int | None = Field(None, gt=0)
    """Block diffusion (BD3-LM): the eligible tokens (the SFT answer, or the whole text in
    pretraining) are cut into blocks of this many tokens, each noised at its own t and predicted
    from the context, the clean earlier blocks and its own noisy tokens (attention bidirectional
    inside a block, causal across blocks; one forward scores every block, on the noisy copy and a
    clean copy side by side). None: the full-canvas model, all eligible tokens one block."""
    seed: int = 0
    """Seed of the collator's generator; each batch derives its own stream from it."""
