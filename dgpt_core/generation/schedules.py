"""Noise schedules alpha(t), their ELBO weights, reverse-step reveal probabilities, and the
sampling of diffusion times t.

Imports only torch and the standard library: copied beside the weights of exported model folders
with `sampler.py`, whose ancestral sampler follows the trained schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ScheduleName = Literal["linear", "loglinear", "cosine"]


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha(t) is the probability that a token is still clean at time t in [0, 1].

    The ELBO weight is w(t) = -alpha'(t) / (1 - alpha(t)); the masked-token loss is w(t) * CE.
    """

    name: str
    eps: float = 1e-3

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        if self.name == "linear":
            return 1.0 - t
        if self.name == "loglinear":
            return 1.0 - (1.0 - self.eps) * t
        if self.name == "cosine":
            return 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))
        raise ValueError(f"unknown noise schedule {self.name!r}")

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - alpha(t)."""
        return 1.0 - self.alpha(t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """ELBO weight w(t) = -alpha'(t) / (1 - alpha(t))."""
        if self.name == "linear":
            return 1.0 / t
        if self.name == "loglinear":
            return 1.0 / t  # (1 - eps) / ((1 - eps) t)
        if self.name == "cosine":
            return 0.5 * math.pi * torch.tan(0.5 * math.pi * (1.0 - t))
        raise ValueError(f"unknown noise schedule {self.name!r}")

    def complement(self, t: torch.Tensor) -> torch.Tensor:
        """The time t' whose mask probability is alpha(t): a mask drawn at t and its complement
        (the tokens it left visible) are both masks of the forward process, at t and t'. Clamped
        to [eps, 1]."""
        if self.name == "linear":
            out = 1.0 - t
        elif self.name == "loglinear":
            out = (1.0 - (1.0 - self.eps) * t) / (1.0 - self.eps)
        elif self.name == "cosine":
            out = 1.0 - torch.acos(1.0 - torch.cos(0.5 * math.pi * (1.0 - t))) / (0.5 * math.pi)
        else:
            raise ValueError(f"unknown noise schedule {self.name!r}")
        return out.clamp(min=self.eps, max=1.0)

    def reveal_probability(self, t: float, s: float, sigma: float = 0.0) -> float:
        """Probability that a token masked at time t is clean at time s < t:
        (alpha(s) - (1 - sigma) alpha(t)) / (1 - alpha(t)), where sigma is the ReMDM remasking
        probability of clean tokens (0: the MDLM posterior); 1 when s <= 0 (the last step reveals
        everything) and where alpha(t) = 1 (nothing is masked at t, so the 0/0 is taken as its limit)."""
        if s <= 0:
            return 1.0
        alpha_t, alpha_s = self.alpha(torch.tensor([t, s], dtype=torch.float64)).tolist()
        if alpha_t >= 1.0:
            return 1.0
        return min(1.0, max(0.0, (alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t)))

    def remask_bound(self, t: float, s: float) -> float:
        """ReMDM's sigma_max = min(1, (1 - alpha(s)) / alpha(t)): the largest probability with which
        a clean token at t may be masked at s (0 when s <= 0, 1 where alpha(t) = 0)."""
        if s <= 0:
            return 0.0
        alpha_t, alpha_s = self.alpha(torch.tensor([t, s], dtype=torch.float64)).tolist()
        return 1.0 if alpha_t <= 0.0 else min(1.0, (1.0 - alpha_s) / alpha_t)


def get_schedule(name: str, eps: float = 1e-3) -> NoiseSchedule:
    schedule = NoiseSchedule(name, eps)
    schedule.alpha(torch.zeros(1))  # validates the name
    return schedule


def sample_t(
    batch_size: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    method: str = "stratified",
) -> torch.Tensor:
    """Diffusion times in [eps, 1] for a batch.

    stratified (MDLM's low-discrepancy sampler): t_i = eps + (1 - eps) * ((u + i / n) mod 1) with one
    shared u, so every batch covers [eps, 1] evenly; uniform: i.i.d. draws, clamped to [eps, 1].
    """
    if method == "stratified":
        u = torch.rand((), generator=generator, dtype=torch.float64)
        t = (u + torch.arange(batch_size, dtype=torch.float64) / batch_size) % 1.0
        return (eps + (1.0 - eps) * t).float()
    if method == "uniform":
        return torch.rand(batch_size, generator=generator).clamp(min=eps, max=1.0)
    raise ValueError(f"unknown t sampling method {method!r}")
