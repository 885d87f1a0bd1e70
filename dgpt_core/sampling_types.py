"""The sampler's public types: strategies and their rules, hooks, special-token ids, options,
states and results.

Imports only torch, the standard library and the sibling `schedules.py` and `sampling_ops.py`:
copied beside the weights of exported model folders with `sampling.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, get_args

import torch

from .sampling_ops import Drawn, confidence_score, margin_score, neg_entropy_score
from .schedules import ScheduleName

Strategy = Literal["random", "confidence", "margin", "entropy", "threshold"]
"""The keys of `STRATEGIES` (a test holds the two equal)."""


@dataclass(frozen=True)
class StrategyRule:
    """Everything the sampler does differently per strategy (see `STRATEGIES`)."""

    score: Callable[[Drawn], torch.Tensor] | None
    """Score of each drawn position; a step reveals the best-scored masks. None: ancestral, each
    mask is revealed with the schedule's probability, chosen before any token is drawn (and only
    those positions are drawn)."""
    needs_distribution: bool = False
    """`score` reads the whole distribution, not only p(drawn token): steps cannot draw straight
    from the hidden states (`sampling_ops.draw_from_hidden`)."""
    threshold_commit: bool = False
    """Reveal every mask whose score reaches `SamplerConfig.threshold`, at least the count that
    finishes within the steps (Fast-dLLM), instead of exactly that count; `position_selection`
    is not used."""
    ends_at_stop: bool = False
    """A row's block is finished once a stop token has no mask before it; the masks after it
    become pad when the block ends."""
    compacts: bool = False
    """Without editing, a finished row leaves the forward batch for the block's later steps."""


STRATEGIES: Mapping[Strategy, StrategyRule] = MappingProxyType({
    "random": StrategyRule(score=None),
    "confidence": StrategyRule(score=confidence_score),
    "margin": StrategyRule(score=margin_score, needs_distribution=True),
    "entropy": StrategyRule(score=neg_entropy_score, needs_distribution=True),
    "threshold": StrategyRule(score=confidence_score, threshold_commit=True, ends_at_stop=True, compacts=True),
})
"""The rule of each strategy: adding a strategy is one entry here (and its name in `Strategy`)."""

PositionSelection = Literal["topk", "sample"]
LogitsHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""`(step, x, logits) -> logits`; x is the model input window (batch, context + block), logits
cover the block only (batch, block, vocab)."""
TokensHook = Callable[[int, torch.Tensor], torch.Tensor]
"""`(step, x) -> x` after each update; changes to the context part of x are ignored."""
Prompts = Sequence[Sequence[int]] | Sequence[torch.Tensor] | torch.Tensor
DEFAULTS_KEY = "sampler_defaults"
"""Key of a model folder's config.json holding its default sampler options."""


@dataclass(frozen=True)
class TokenIds:
    """Ids of the special tokens the sampler needs; `None` where the tokenizer lacks the token."""

    mask: int
    pad: int
    eos: int
    im_end: int | None = None
    delete: int | None = None
    im_start: int | None = None

    @classmethod
    def from_tokenizer(cls, tok: Any) -> TokenIds:
        """Look the literal special tokens up in any tokenizer with `convert_tokens_to_ids`."""
        ids: dict[str, int | None] = {}
        for field in dataclasses.fields(cls):
            token = "<|endoftext|>" if field.name == "eos" else f"<|{field.name}|>"
            idx = tok.convert_tokens_to_ids(token)
            ids[field.name] = None if idx is None or tok.convert_ids_to_tokens(idx) != token else int(idx)
        missing = [name for name in ("mask", "pad", "eos") if ids[name] is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        return cls(**ids)

    @property
    def default_stops(self) -> tuple[int, ...]:
        return tuple(i for i in (self.im_end, self.eos) if i is not None)


@dataclass(frozen=True)
class SamplerConfig:
    """Options of the reverse process."""

    strategy: Strategy = "random"
    """random: ancestral MDLM (each mask revealed with prob (alpha(s) - alpha(t)) / (1 - alpha(t))
    of `schedule`, t = remaining steps / steps, s = t - 1 / steps); confidence / margin /
    entropy: reveal a count of masks per step (spread evenly over the remaining steps), chosen
    by p(token), p1 - p2 or -H(p); threshold: Fast-dLLM parallel decoding, reveal every mask
    whose p(token) >= `threshold` (at least the best one, and at least the count that finishes
    within `steps`), so the number of steps adapts to the model's certainty."""
    position_selection: PositionSelection = "topk"
    """Score strategies: reveal the top-k scores, or sample positions from
    softmax(score / position_temperature) without replacement."""
    position_temperature: float = 1.0
    """Temperature of position sampling (position_selection="sample")."""
    threshold: float = 0.9
    """Confidence a mask needs to be revealed in parallel (strategy="threshold")."""
    schedule: ScheduleName = "linear"
    """Noise schedule alpha(t) the ancestral sampler follows: the one the model was trained with
    (linear reveals 1 / remaining steps of the masks per step)."""
    t_eps: float = 1e-3
    """The schedule's eps (loglinear: alpha(1) = eps), as in training."""
    steps: int = 32
    """Denoising steps (per block in semi-autoregressive mode); a cap: a block ends as soon as no
    mask is left (without editing), and for strategy="threshold" also once every row has a stop
    token with no mask before it (the masks after it become pad)."""
    max_new_tokens: int = 64
    """Canvas length: the number of new tokens (all blocks together)."""
    temperature: float = 1.0
    """Token temperature; 0 = greedy argmax."""
    top_p: float = 1.0
    """Nucleus filtering of the token distribution (1.0 = off)."""
    seed: int | None = None
    """Seed of the single generator behind every random draw (None = nondeterministic)."""
    edit: bool = False
    """Seed-Diffusion editing: visible generated tokens (never the prompt) may be replaced, or
    deleted when the model predicts <|delete|>; never on the last step of a block."""
    edit_threshold: float = 0.9
    """A visible token is replaced only when the new token's probability is at least this."""
    edit_rate: float = 0.1
    """At most ceil(edit_rate * visible) tokens per row are edited per step (largest gain first)."""
    stop_token_ids: tuple[int, ...] | None = None
    """The answer ends before the first of these (None = <|im_end|> and end-of-text; () = none)."""
    block_size: int | None = None
    """None: denoise the whole canvas at once; n: semi-autoregressive blocks of n tokens."""
    prefix_cache: bool = False
    """Approximate prefix cache (Fast-dLLM): the context's keys and values are computed on a
    block's first forward and reused for the block's later steps, which run the layers on the
    block alone (ModernBERT without a logits hook; otherwise ignored). `nfe` still counts every
    forward, cheap ones included."""

    def __post_init__(self) -> None:
        checks = {
            "strategy": self.strategy in STRATEGIES,
            "position_selection": self.position_selection in get_args(PositionSelection),
            "position_temperature": self.position_temperature > 0,
            "threshold": 0 < self.threshold <= 1,
            "schedule": self.schedule in get_args(ScheduleName),
            "t_eps": 0 <= self.t_eps < 1,
            "steps": self.steps >= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "edit_threshold": 0 <= self.edit_threshold <= 1,
            "edit_rate": 0 < self.edit_rate <= 1,
            "block_size": self.block_size is None or self.block_size >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid sampler options: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}"
            )
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))

    @property
    def rule(self) -> StrategyRule:
        """The rule of `strategy`."""
        return STRATEGIES[self.strategy]

    def stop_ids(self, token_ids: TokenIds) -> tuple[int, ...]:
        """The stop tokens in effect: `stop_token_ids`, or the defaults of `token_ids` when None."""
        return token_ids.default_stops if self.stop_token_ids is None else self.stop_token_ids

    def replace(self, **overrides: Any) -> SamplerConfig:
        """A copy with some fields changed; unknown names raise TypeError."""
        return dataclasses.replace(self, **overrides) if overrides else self


@dataclass
class SamplerState:
    """One intermediate state of `stream`."""

    step: int
    """Denoising steps done so far (0 = the initial all-mask canvas)."""
    block: int
    """Index of the block being denoised."""
    canvas: torch.Tensor
    """(batch, n) generated tokens so far, masks included; pad for rows that already stopped."""
    nfe: int
    """Model forward passes so far."""
    done: bool
    """True on the last state."""


@dataclass
class SampleResult:
    """Outcome of `generate`."""

    answers: list[list[int]]
    """Per row: the generated ids up to (excluding) the first stop token."""
    stopped: list[bool]
    """Per row: whether a stop token was generated."""
    nfe: int
    """Model forward passes."""
    canvas: torch.Tensor
    """(batch, prompt_width + n): the left-padded prompts followed by every generated token."""
    prompt_width: int
    """Columns of `canvas` taken by the left-padded prompts."""
