"""What every suite shares: sizes per preset, the model and data under test, alternating timing."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import ModernBertForMaskedLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dgpt_core.config import (
    ModelConfig,
    RunConfig,
    WorldConfig,
    load_run_config,
    parse_override,
    read_folder_run_config,
    set_by_path,
)
from dgpt_core.data.skills import SkillItem, generate_skills, read_skills_jsonl
from dgpt_core.data.stage_cache import uses_world
from dgpt_core.generation.sampler import SamplerConfig
from dgpt_core.models.backbone import build_model
from dgpt_core.models.tokenizer import (
    add_diffusion_tokens,
    load_tokenizer,
    non_special_token_ids,
    tokenizer_fingerprint,
)
from eval.data import render_prompt

log = logging.getLogger(__name__)

LARGE_VOCAB = 50257
"""GPT-2's vocabulary size: the "50k vocabulary" of the targets."""


@dataclass(frozen=True)
class BenchSizes:
    """How much each suite measures; `ci` keeps the whole harness within seconds."""

    reps: int
    """Alternating repetitions per comparison (the median is reported)."""
    train_steps: int
    """Training steps per repetition of each step kind."""
    train_vocabs: tuple[int, ...]
    """Vocabulary sizes of the training comparison besides the model's own."""
    overhead_vocabs: tuple[int, ...]
    """Vocabulary sizes of the sampler-overhead measurement."""
    skills_per_skill: int
    """Skills test items per skill for the decoding comparison."""
    batch_size: int
    """Prompts per sampler call."""
    thresholds: tuple[float, ...]
    """Confidence thresholds of threshold decoding."""
    lengths: tuple[int, ...]
    """Generation lengths of the time-vs-length plot."""
    length_block: int
    """Block size of the block-decoding curve of that plot."""
    baseline_budget: float
    """Fraction of the preset's training steps the AR baseline runs (1.0 = the same token budget)."""
    ppl_sequences: int
    """Held-out sequences scored by the perplexity comparison."""
    world_people: int
    """Held-out people of the world workload (runs whose SFT data is the world): their biography
    requests (decoding comparison), reversed and attribute questions (baseline comparison)."""


SIZES = {
    "ci": BenchSizes(
        reps=2, train_steps=1, train_vocabs=(LARGE_VOCAB,), overhead_vocabs=(4096, LARGE_VOCAB),
        skills_per_skill=2, batch_size=16, thresholds=(0.5, 0.9), lengths=(128, 256), length_block=64,
        baseline_budget=1.0, ppl_sequences=4, world_people=4,
    ),
    "tiny": BenchSizes(
        reps=5, train_steps=2, train_vocabs=(4096, LARGE_VOCAB), overhead_vocabs=(4096, LARGE_VOCAB),
        skills_per_skill=30, batch_size=64, thresholds=(0.5, 0.7, 0.9, 0.95), lengths=(128, 256, 512, 1024),
        length_block=128, baseline_budget=1.0, ppl_sequences=32, world_people=100,
    ),
}


@dataclass
class Subject:
    """The diffusion model under test, its run config, tokenizer, data and skills test items."""

    run: RunConfig
    model: ModernBertForMaskedLM
    tokenizer: PreTrainedTokenizerBase
    data_dir: Path
    """Root of the prepared data (tokenizer/, pretrain/, sft/)."""
    skills: list[SkillItem]
    description: str
    notes: list[str] = field(default_factory=list)

    @property
    def world(self) -> WorldConfig | None:
        """The world settings when the run's SFT data is the synthetic world, else None (skills)."""
        return self.run.data.world if uses_world(self.run.data.sft.sources) else None


@dataclass
class Workload:
    """Prompts a decoding comparison runs and how each answer is scored."""

    name: str
    """What the prompts are: `skills` (skills test items) or `world` (the synthetic world)."""
    prompts: list[list[int]]
    canvas: int
    """New tokens each prompt is decoded into."""
    scorer: Callable[[int, str], dict[str, float]]
    """(item index, answer text) -> scores in [0, 1]; an item may give only some of the keys."""
    quality_keys: tuple[str, ...]
    """The scores whose means decide equal quality, the headline one first."""
    canvas_blocks: int = 1
    """`SamplerConfig.canvas_blocks` of every decoding of the workload (long answers:
    `EvalConfig.long_windows`, as in the eval suite), capped at each setting's steps."""

    def sampler(self, cfg: SamplerConfig) -> SamplerConfig:
        """`cfg` on this workload: its canvas and windows (at most one window per step)."""
        return cfg.replace(max_new_tokens=self.canvas, canvas_blocks=min(self.canvas_blocks, cfg.steps))


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt rendered as the eval renders it for SFT models."""
    return tokenizer(render_prompt(tokenizer, messages, "sft"), add_special_tokens=False)["input_ids"]


def run_config(model_dir: Path | None, preset: str, overrides: list[str] | None) -> RunConfig:
    """The model folder's run config (else the preset's) with `key.path=value` overrides applied."""
    run = read_folder_run_config(model_dir) if model_dir is not None else None
    if run is None:
        return load_run_config(preset, overrides)
    tree = run.model_dump(mode="json")
    for item in overrides or []:
        set_by_path(tree, *parse_override(item))
    return RunConfig.model_validate(tree)


def load_subject(
    model_dir: str | Path | None, preset: str, out_dir: Path, data_dir: str | Path | None = None,
    skills_jsonl: str | Path | None = None, run_overrides: list[str] | None = None,
) -> Subject:
    """A trained model folder (its run_config.yaml gives the data), or a random-weight model of
    the preset's shape on freshly prepared data; `run_overrides` change that run config."""
    from dgpt_core.data.stages import prepare_all

    notes: list[str] = [f"run config overrides: {' '.join(run_overrides)}"] if run_overrides else []
    model_dir = Path(model_dir) if model_dir is not None else None
    run = run_config(model_dir, preset, run_overrides)
    if model_dir is not None:
        tokenizer = load_tokenizer(model_dir)
        model = ModernBertForMaskedLM.from_pretrained(str(model_dir)).eval()
        description = f"{model_dir} (trained)"
    else:
        model = tokenizer = None
        description = f"random weights, preset {preset}"
    root = Path(data_dir) if data_dir else _find_data(model_dir, tokenizer)
    if root is None:  # prepared here (deterministic: the data the run config describes)
        root = out_dir / "data"
        prepare_all(run.data, run.tokenizer, run.model.max_seq_len, root)
    notes.append(f"data: {root}")
    if tokenizer is None:
        tokenizer = load_tokenizer(root / "tokenizer")
        torch.manual_seed(run.seed)
        model = build_model(run.model, tokenizer).eval()
    elif tokenizer_fingerprint(load_tokenizer(root / "tokenizer")) != tokenizer_fingerprint(tokenizer):
        notes.append(f"warning: the tokenizer of {root} differs from the model's")
    skills_path = Path(skills_jsonl) if skills_jsonl else root / "sft" / "skills_test.jsonl"
    if skills_path.exists():
        skills = read_skills_jsonl(skills_path)
    else:
        skills = generate_skills(run.data.skills, "test")
        skills_path = Path("generate_skills(test)")
    if uses_world(run.data.sft.sources):
        notes.append(f"world test items: dgpt_core.data.world.test_pairs ({run.data.world.people} people)")
    else:
        notes.append(f"skills test items from {skills_path}")
    return Subject(run, model, tokenizer, root, skills, description, notes)


def _find_data(model_dir: Path | None, tokenizer: PreTrainedTokenizerBase | None) -> Path | None:
    """The flow's data stage beside the model's stage folder (stages/data-*/), when its tokenizer
    is the model's."""
    if model_dir is None or tokenizer is None:
        return None
    want = tokenizer_fingerprint(tokenizer)
    for candidate in sorted(model_dir.resolve().parent.parent.glob("data-*")):
        if (candidate / "tokenizer").is_dir() and (candidate / "sft").is_dir():
            if tokenizer_fingerprint(load_tokenizer(candidate / "tokenizer")) == want:
                return candidate
    return None


def per_skill(items: Sequence[SkillItem], n: int) -> list[SkillItem]:
    """The first `n` items of every skill, skills interleaved."""
    by_skill: dict[str, list[SkillItem]] = {}
    for item in items:
        by_skill.setdefault(item.skill, []).append(item)
    groups = [group[:n] for group in by_skill.values()]
    return [g[i] for i in range(n) for g in groups if i < len(g)]


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of exactly `vocab_size` ids with the diffusion special tokens (for
    throughput at a vocabulary size no trained tokenizer of ours has)."""
    from tokenizers import Tokenizer, models

    words = {f"w{i}": i for i in range(vocab_size - 6)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")))
    tokenizer = add_diffusion_tokens(tokenizer)
    assert len(tokenizer) == vocab_size, len(tokenizer)
    return tokenizer


def random_tokens(tokenizer: PreTrainedTokenizerBase, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Token ids drawn uniformly from the tokenizer's non-special ids."""
    pool = torch.tensor(non_special_token_ids(tokenizer))
    return pool[torch.randint(len(pool), shape, generator=torch.Generator().manual_seed(seed))]


def random_model(shape: ModelConfig, tokenizer: PreTrainedTokenizerBase, **changes: Any) -> ModernBertForMaskedLM:
    """A random-weight model of `shape` (fields in `changes` replaced) for `tokenizer`'s vocabulary."""
    torch.manual_seed(0)
    return build_model(shape.model_copy(update=changes), tokenizer)


def alternate(fns: dict[str, Callable[[], Any]], reps: int, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds of each function per repetition, run in turn (A B C A B C ...) after one warm-up each."""
    if warmup:
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds


@contextlib.contextmanager
def counted_forwards(model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """While open, the rows (`forwards`: one per row of every forward) and token positions
    (`token_forwards`, padding included) that pass through the model's input embedding: what
    each forward of a diffusion model or a KV-cached causal LM costs, counted the same way."""
    counts = {"forwards": 0, "token_forwards": 0}

    def count(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        counts["forwards"] += args[0].shape[0]
        counts["token_forwards"] += args[0].numel()

    handle = model.get_input_embeddings().register_forward_pre_hook(count)
    try:
        yield counts
    finally:
        handle.remove()


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repetitions of numerator[i] / denominator[i]."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))
