"""The sampler's public types: strategies and their rules, hooks, special-token ids, options,
states and results.

Imports only torch, the standard library and the sibling `schedules.py` and `ops.py`:
copied beside the weights of exported model folders with `sampler.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, get_args

import torch

from .ops import Drawn, confidence_score, margin_score, neg_entropy_score
from .schedules import ScheduleName

Commit = Literal["count", "threshold", "entropy_bound"]
Strategy = Literal["random", "confidence", "margin", "entropy", "threshold", "eb"]
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
    from the hidden states (`ops.draw_from_hidden`)."""
    commit: Commit = "count"
    """How many of the scored masks a step reveals: `count`, exactly the count that finishes within
    the steps left (spread evenly); `threshold`, every mask whose score reaches
    `SamplerConfig.threshold` (Fast-dLLM); `entropy_bound`, the masks in order of lowest entropy
    while their summed entropy stays within `SamplerConfig.eb_gamma` (EB-sampler). The last two
    reveal at least the count that finishes within the steps, so `steps` is a cap, and do not use
    `position_selection`."""
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
    "threshold": StrategyRule(score=confidence_score, commit="threshold", ends_at_stop=True, compacts=True),
    "eb": StrategyRule(score=neg_entropy_score, needs_distribution=True, commit="entropy_bound", ends_at_stop=True,
                       compacts=True),
})
"""The rule of each strategy: adding a strategy is one entry here (and its name in `Strategy`)."""

PositionSelection = Literal["topk", "sample"]
Remask = Literal["off", "cap", "rescale", "conf"]
LogitsHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""`(step, x, logits) -> logits`; x is the model input window (batch, context + block), logits
cover the block only (batch, block, vocab)."""
TokensHook = Callable[[int, torch.Tensor], torch.Tensor]
"""`(step, x) -> x` after each update; changes to the context part of x are ignored."""
Prompts = Sequence[Sequence[int]] | Sequence[torch.Tensor] | torch.Tensor
DEFAULTS_KEY = "sampler_defaults"
"""Key of a model folder's config.json holding its default sampler options."""
INFO_KEY = "diffusion_gpt"
"""Key of a model folder's config.json holding what the model is (`dgpt_core.models.info.ModelInfo`)."""


def trained_block_size(model: Any) -> int | None:
    """The block size of a block-causal model (its config's model info records it), None for a
    full-canvas model or one without model info."""
    info = getattr(getattr(model, "config", None), INFO_KEY, None) or {}
    return int(info["block_size"]) if info.get("block_size") else None


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
class Interval:
    """The values a numeric option allows: from `low` to `high`, each end included unless open."""

    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: Any) -> bool:
        if not isinstance(value, int | float):
            return False
        above = self.low < value if self.open_low else self.low <= value
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


FIELD_RANGES: Mapping[str, Interval] = MappingProxyType({
    "position_temperature": Interval(0, open_low=True),
    "threshold": Interval(0, 1, open_low=True),
    "eb_gamma": Interval(0),
    "remask_eta": Interval(0, 1),
    "no_repeat_ngram_size": Interval(0),
    "ngram_penalty": Interval(1),
    "t_eps": Interval(0, 1, open_high=True),
    "steps": Interval(1),
    "max_new_tokens": Interval(1),
    "temperature": Interval(0),
    "top_p": Interval(0, 1, open_low=True),
    "edit_threshold": Interval(0, 1),
    "edit_rate": Interval(0, 1, open_low=True),
    "canvas_blocks": Interval(1),  # and at most `steps`: SamplerConfig checks the pair
    "block_size": Interval(1),
})
"""The range of each numeric SamplerConfig field (None, where a field allows it, is outside any
range's concern); `SamplerConfig` checks them, and `dgpt generate` checks each option as it parses."""


@dataclass(frozen=True)
class SamplerConfig:
    """Options of the reverse process."""

    strategy: Strategy = "random"
    """random: ancestral MDLM (each mask revealed with prob (alpha(s) - alpha(t)) / (1 - alpha(t))
    of `schedule`, t = remaining steps / steps, s = t - 1 / steps); confidence / margin /
    entropy: reveal a count of masks per step (spread evenly over the remaining steps), chosen
    by p(token), p1 - p2 or -H(p); threshold: Fast-dLLM parallel decoding, reveal every mask
    whose p(token) >= `threshold` (at least the best one, and at least the count that finishes
    within `steps`), so the number of steps adapts to the model's certainty; eb: EB-sampler, reveal
    masks in order of lowest entropy while their summed entropy stays within `eb_gamma` (the same
    floor), an error budget per step instead of a confidence bar."""
    position_selection: PositionSelection = "topk"
    """Score strategies: reveal the top-k scores, or sample positions from
    softmax(score / position_temperature) without replacement."""
    position_temperature: float = 1.0
    """Temperature of position sampling (position_selection="sample")."""
    threshold: float = 0.9
    """Confidence a mask needs to be revealed in parallel (strategy="threshold")."""
    eb_gamma: float = 0.1
    """Entropy budget per step in nats (strategy="eb"): larger reveals more masks per step."""
    remask: Remask = "off"
    """ReMDM remasking (Wang et al. 2025): a revealed generated token (never the prompt) is masked
    again with probability sigma_t and decoded anew later; `cap`: sigma_t = min(remask_eta,
    sigma_max), `rescale`: remask_eta * sigma_max, `conf`: sigma_max spread over the revealed tokens
    by softmax(-p at reveal) (the least confident first), with sigma_max = min(1, (1 - alpha_s) /
    alpha_t) of `schedule` (0 on the last step, so every row finishes). The ancestral sampler then
    reveals each mask with (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t) (cap and rescale); the
    other strategies count the remasked tokens in what is left to reveal."""
    remask_eta: float = 0.04
    """eta of the cap and rescale remasking schedules."""
    no_repeat_ngram_size: int = 0
    """Repetition guard (0 = off): at masked positions, tokens that would complete an n-gram of this
    size already present in the row (context or canvas; n-grams with special tokens do not count)
    are banned, or penalised by `ngram_penalty`; see `ops.repeated_ngram_completions`."""
    ngram_penalty: float | None = None
    """None: the guard bans those tokens (as transformers' no_repeat_ngram_size); a value > 1:
    divides their positive logits and multiplies their negative ones (CTRL, as repetition_penalty)."""
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
    canvas_blocks: int = 1
    """LLaDA's semi-autoregressive decoding inside one canvas: the canvas is split into this many
    equal windows revealed left to right, `steps` shared among them; the later windows stay on the
    canvas as masks (unlike `block_size`, which appends blocks, so the model sees the whole answer
    length it was trained on). Keeps confidence-ordered decoding from filling a long canvas with
    end-of-text from the right."""
    block_size: int | None = None
    """A full-canvas model: None denoises the whole canvas at once, n appends semi-autoregressive
    blocks of n tokens. A block-causal model (`trained_block_size`) always decodes block by block
    in the blocks it was trained on: None or that size."""
    prefix_cache: bool | None = None
    """Key/value cache of the context (ModernBERT without a logits hook; otherwise ignored). A
    block-causal model: an exact cache of the prompt and every finished block, each computed once
    (None = on; False decodes without it, recomputing the context at every step). A full-canvas
    model: Fast-dLLM's approximate prefix cache, the context's keys and values computed on a block's
    first forward and reused for its later steps (None = off). `nfe` counts every forward, cheap
    ones included."""

    def __post_init__(self) -> None:
        checks = {
            "strategy": self.strategy in STRATEGIES,
            "position_selection": self.position_selection in get_args(PositionSelection),
            "remask": self.remask in get_args(Remask),
            "schedule": self.schedule in get_args(ScheduleName),
            **{name: getattr(self, name) in allowed or (getattr(self, name) is None and name in _NULLABLE)
               for name, allowed in FIELD_RANGES.items()},
        }
        checks["canvas_blocks"] = checks["canvas_blocks"] and (not checks["steps"] or self.canvas_blocks <= self.steps)
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

    @classmethod
    def of_model(cls, model: Any) -> SamplerConfig:
        """The options a model's config records (its folder's `sampler_defaults`), these defaults
        for the rest."""
        return cls(**(getattr(getattr(model, "config", None), DEFAULTS_KEY, None) or {}))

    def for_method(self, name: str) -> SamplerConfig:
        """A copy decoding by the named method (see `method_options`)."""
        return self.replace(**method_options(name))


MODIFIERS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "guard": MappingProxyType({"no_repeat_ngram_size": 5}),
    "remdm_cap": MappingProxyType({"remask": "cap"}),
    "remdm_rescale": MappingProxyType({"remask": "rescale"}),
    "remdm_conf": MappingProxyType({"remask": "conf"}),
})
"""Sampler options a decoding method name can add to a strategy: `confidence+guard` is confidence
decoding with the 5-gram repetition guard, `random+remdm_cap` ancestral sampling with ReMDM-cap.
The guard's 5: biographies repeat names and relation phrases as 3- and 4-grams (" Sam Davis was
born"), and a 3-gram guard cost the tiny pretrained model 0.16 of its fact precision."""


def method_options(name: str) -> dict[str, Any]:
    """SamplerConfig fields of a decoding method name: a strategy, then any `+modifier`s of
    `MODIFIERS` (e.g. `confidence+guard+remdm_conf`); ValueError on an unknown part."""
    strategy, *modifiers = name.split("+")
    bad = ([strategy] if strategy not in STRATEGIES else []) + [m for m in modifiers if m not in MODIFIERS]
    if bad:
        raise ValueError(f"unknown decoding method {name!r} ({', '.join(map(repr, bad))}): a strategy of "
                         f"{list(STRATEGIES)} followed by any of {['+' + m for m in MODIFIERS]}")
    options: dict[str, Any] = {"strategy": strategy}
    for modifier in modifiers:
        options.update(MODIFIERS[modifier])
    return options


_NULLABLE = frozenset(f.name for f in dataclasses.fields(SamplerConfig) if f.default is None)
"""SamplerConfig fields whose default None means "off" or "the default of the token ids"."""


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
