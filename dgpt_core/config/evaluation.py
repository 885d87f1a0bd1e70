"""Typed settings of the eval suite: which tasks, how to sample, how to estimate likelihoods.

Every field carries a docstring; unknown keys are errors; the resolved config is saved into
metrics.json (meta.settings), so a rerun with the same settings gives the same numbers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..generation.options import STRATEGIES, SamplerConfig, method_options
from .base import StrictConfig

LOCAL_TASKS = ("ppl", "dgpt_skills", "dgpt_chitchat_mc", "dgpt_heldout_text", "repetition", "editing",
               "dgpt_world", "storage")
"""Tasks that run offline: the perplexity bounds, the local lm-eval tasks, the repetition study,
the editing metric, the synthetic world's QA tasks and storage probe."""
DEFAULTS_METHOD = "defaults"
"""The decoding method of `EvalConfig.strategies` that is the model folder's sampler defaults."""
DEFAULT_LONG_ANSWER_CANVAS = 64
"""Canvas of long answers for a model that records none (a biography is 30-60 tokens)."""


class EvalConfig(StrictConfig):
    """Settings of `run_eval` / `dgpt eval`."""

    tasks: list[str] = Field(default_factory=lambda: list(LOCAL_TASKS))
    """What to run: `ppl` (ELBO perplexity bounds), `dgpt_skills` (held-out skills, exact match),
    `dgpt_chitchat_mc` (next-reply multiple choice), `dgpt_heldout_text` (held-out documents through
    lm-eval's loglikelihood_rolling), `repetition` (generation comparison), `editing` (SFT models:
    repair of swapped and inserted tokens in held-out answers), `dgpt_world` (SFT models: questions
    and biography requests about the synthetic world's people), `storage` (cloze probes of every
    person's facts); the last two run only when the run's data has a `world` source (else skipped
    with a note), and with it the repetition study generates biographies of held-out people. And any
    standard lm-eval task name (hellaswag, arc_easy, piqa, lambada, gsm8k, ...; needs the Hub)."""
    strategies: list[str] = Field(default_factory=lambda: list(STRATEGIES))
    """Decoding methods compared in every generative task, at the same steps and seed: a strategy
    of the sampler's table, optionally with `+modifier`s (`confidence+guard`: the n-gram repetition
    guard; `random+remdm_cap`: ReMDM remasking; see generation.options.MODIFIERS); and `defaults`:
    the model folder's own sampler defaults, whole (what a user gets with no flags)."""
    steps: int = Field(16, ge=1)
    """Denoising steps (per block when block_size is set) of every generation; for the
    `threshold` strategy a cap (it stops once nothing is left to decode)."""
    threshold: float = Field(SamplerConfig.threshold, gt=0.0, le=1.0)
    """Confidence a mask needs to be revealed in parallel by the `threshold` strategy (Fast-dLLM)."""
    steps_grid: list[int] = Field(default_factory=lambda: [4, 8, 16])
    """Step counts of the quality-vs-steps sweep on dgpt_skills and dgpt_world (held-out questions;
    plot: exact match vs NFE per strategy); [] skips the sweep."""
    block_size: int | None = Field(None, ge=1)
    """Semi-autoregressive block length; None denoises the whole canvas at once."""
    temperature: float = Field(0.0, ge=0.0)
    """Token temperature of benchmark generations (0 = argmax tokens; positions still follow the
    strategy, so `random` is random-order greedy)."""
    repetition_temperature: float | None = Field(None, ge=0.0)
    """Token temperature of the repetition study; None = `temperature`."""
    seed: int = 0
    """Seed of every sampler call, likelihood mask draw and data choice."""
    limit: int | None = Field(None, gt=0)
    """At most this many items per task (per skill for dgpt_skills, per test set for dgpt_world;
    prompts per mode for the repetition study); None = all."""
    model_kind: Literal["auto", "untrained", "pretrain", "sft"] = "auto"
    """untrained / pretrain: plain-text prompts; sft: chat-template prompts and the conditional
    bound; auto: the kind the model folder records (config.json `diffusion_gpt.kind`), else sft."""

    skills_canvas: int | None = Field(None, ge=1)
    """Answer canvas (new tokens) of dgpt_skills; None = the task's fixed `max_gen_toks` (24).
    Never derived from a reference answer."""
    chat_canvas: int = Field(32, ge=1)
    """Canvas of chat replies in the repetition study."""
    plain_canvas: int = Field(48, ge=1)
    """Canvas of plain-text continuations in the repetition study."""
    long_answer_canvas: int | None = Field(None, ge=1)
    """Canvas of long answers (the world's biography requests: dgpt_world_bio and the chat replies
    of the repetition study); None = the canvas the SFT model trained long answers on
    (`ModelInfo.long_answer_canvas`), else DEFAULT_LONG_ANSWER_CANVAS."""
    long_answer_blocks: int = Field(8, ge=1)
    """canvas_blocks of long answers (`SamplerConfig.canvas_blocks`: windows revealed left to right
    inside the canvas, LLaDA's semi-autoregressive decoding): an SFT model pads answers with
    end-of-text, and on a long canvas the confidence orders otherwise fill it with end-of-text from
    the right and stop after a few tokens. Capped at the steps."""
    plain_prompt_tokens: int = Field(16, ge=1)
    """Prompt length (tokens of a held-out document) of plain-text continuations."""
    repetition_prompts: int = Field(32, gt=0)
    """Prompts per mode in the repetition study (before `limit`)."""
    samples_in_report: int = Field(4, ge=0)
    """Sample generations per strategy and mode shown in report.md (skills: one per skill)."""
    standard_canvas: int = Field(64, ge=1)
    """Canvas of standard lm-eval generate_until tasks (their max_gen_toks is capped to this)."""

    ppl_t_points: int = Field(16, ge=1)
    """Size of the fixed stratified t grid of the ELBO bound (midpoints of equal strata of [eps, 1])."""
    ppl_mask_draws: int = Field(2, ge=1)
    """Seeded masks drawn per sequence and t value."""
    ppl_max_sequences: int = Field(64, gt=0)
    """Held-out sequences scored by each bound (before `limit`)."""
    schedule: Literal["auto", "linear", "loglinear", "cosine"] = "auto"
    """Noise schedule of the bound; auto = the training schedule the model folder records (config.json
    `diffusion_gpt.schedule`), else linear."""
    t_eps: float = Field(1e-3, gt=0.0, lt=0.5)
    """Lower end of the t grid."""

    mc_num: int = Field(16, ge=1)
    """Monte-Carlo draws of LLaDA's loglikelihood estimate (continuation only; one draw suffices
    for one-token continuations and is used then)."""
    greedy_check: bool = True
    """loglikelihood's is_greedy: decode the continuation's length greedily (confidence order,
    argmax tokens, one token per step) and compare; off = always False."""
    batch_size: int = Field(32, gt=0)
    """Rows per model forward in likelihood estimates and prompts per sampler call."""

    edit_swap_prob: float = Field(0.1, ge=0.0, le=1.0)
    """Editing metric: probability that an answer token (content or <|im_end|>) is swapped for a
    different random non-special token."""
    edit_insert_prob: float = Field(0.1, ge=0.0, le=1.0)
    """Editing metric: probability that a spurious token (half the time a random non-special token
    other than the next one, half the time a copy of the next token) is inserted before an answer token."""
    edit_examples: int = Field(200, gt=0)
    """Held-out SFT examples scored by the editing metric; not capped by `limit` (one forward per
    example, and presets set `limit` small for the generative tasks)."""

    chitchat_items: int = Field(100, gt=0)
    """Items of dgpt_chitchat_mc (before `limit`)."""
    chitchat_choices: int = Field(4, ge=2)
    """Choices per item: the real next reply and choices - 1 replies from other conversations."""
    chitchat_history: int = Field(3, ge=1)
    """Most recent messages kept as the context of an item (ends with the user turn)."""
    chitchat_max_reply_chars: int = Field(120, gt=0)
    """Replies (real and distractors) longer than this are not used."""

    skills_jsonl: str | None = None
    """Held-out skills (write_skills_jsonl format); None = the SFT data folder's skills_test.jsonl
    when given, else generated from the model's data config (run_config.yaml) or the default."""
    pretrain_data_dir: str | None = None
    """Pretraining data folder (save_to_disk, packed input_ids) whose `validation` split is the
    held-out text; None = built from the data config's embedded/local sources."""
    sft_data_dir: str | None = None
    """SFT data folder (input_ids, eligible_mask) whose `validation` split gives the conditional
    bound; None = built from the data config's embedded/local chat sources."""
    cache_dir: str | None = None
    """Where task data files are written; None = `<out>/task_data`."""
    plots: bool = True
    """Write the PNG plots."""

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"no strategies; choose from {list(STRATEGIES)}")
        for name in value:
            if name != DEFAULTS_METHOD:
                method_options(name)  # raises on an unknown strategy or modifier
        return value

    @field_validator("steps_grid")
    @classmethod
    def _positive_steps(cls, value: list[int]) -> list[int]:
        if any(s < 1 for s in value):
            raise ValueError("steps_grid entries must be >= 1")
        return sorted(set(value))

    @property
    def repetition_token_temperature(self) -> float:
        """The token temperature of the repetition study: `repetition_temperature`, else `temperature`."""
        return self.temperature if self.repetition_temperature is None else self.repetition_temperature

    def long_canvas(self, trained: int | None) -> int:
        """The canvas of long answers for an SFT model trained on long answers of `trained` tokens
        (its folder's `long_answer_canvas`; None for other models): see `long_answer_canvas`."""
        return self.long_answer_canvas or trained or DEFAULT_LONG_ANSWER_CANVAS

    def long_windows(self, block_size: int | None) -> int:
        """canvas_blocks of long answers for a model of `block_size` (`trained_block_size`): 1 for a
        block-causal model, which decodes left to right by itself, else `long_answer_blocks`. The
        sampler settings cap it at their steps."""
        return 1 if block_size else self.long_answer_blocks

    def standard_tasks(self) -> list[str]:
        """Requested tasks that are not local (standard lm-eval tasks)."""
        return [t for t in self.tasks if t not in LOCAL_TASKS]

    def wants(self, task: str) -> bool:
        return task in self.tasks
