"""Pretraining text -> token ids (eos after every document) -> fixed-length packed sequences.

Tokenization runs through `datasets.map(num_proc=...)`; packing works on the flat Arrow buffer of
all token ids (no Python loop over tokens), so every token ends up in exactly one sequence except
a final remainder shorter than max_seq_len, which is kept or dropped-and-counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase


def _ds():
    import datasets

    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    datasets.disable_progress_bars()
    return datasets


def _encode_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, eos_id: int) -> dict[str, list]:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [[*x, eos_id] for x in ids], "num_bytes": [len(t.encode("utf-8")) for t in batch["text"]]}


def token_features():
    """Features of a tokenized-documents dataset (int32 ids keep the Arrow buffers small)."""
    datasets = _ds()
    return datasets.Features({"input_ids": datasets.List(datasets.Value("int32")), "num_bytes": datasets.Value("int64")})


def documents_dataset(columns: dict[str, list]):
    """{"input_ids", "num_bytes"} lists -> Dataset with `token_features()` (also when empty)."""
    return _ds().Dataset.from_dict(columns, features=token_features())


def tokenize_documents(texts, tokenizer: PreTrainedTokenizerBase, num_proc: int = 1, batch_size: int = 1000):
    """A datasets.Dataset (or list of str) of documents -> Dataset with `input_ids` (eos appended)
    and `num_bytes` (UTF-8 size of the source text)."""
    datasets = _ds()
    ds = texts if isinstance(texts, datasets.Dataset) else datasets.Dataset.from_dict({"text": list(texts)})
    if not len(ds):
        return documents_dataset({"input_ids": [], "num_bytes": []})
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    return ds.map(
        _encode_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None,
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id},
        features=token_features(),
        desc="tokenize",
    )


def take_streaming(
    routed: Iterable[tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    train_token_target: int,
    batch_size: int = 1000,
) -> dict[str, dict[str, list]]:
    """Tokenize a streaming iterator of (split, document) batch by batch until the train split
    holds `train_token_target` tokens (eos included; the crossing document is kept whole).
    Returns {split: {"input_ids": [...], "num_bytes": [...]}}."""
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    out: dict[str, dict[str, list]] = {sp: {"input_ids": [], "num_bytes": []} for sp in ("train", "validation")}
    train_tokens = 0
    buf: list[tuple[str, str]] = []

    def flush() -> bool:
        nonlocal train_tokens
        enc = _encode_batch({"text": [t for _, t in buf]}, tokenizer, eos_id)
        for (split, _), ids, nb in zip(buf, enc["input_ids"], enc["num_bytes"]):
            if split == "train" and train_tokens >= train_token_target:
                return True
            out[split]["input_ids"].append(ids)
            out[split]["num_bytes"].append(nb)
            if split == "train":
                train_tokens += len(ids)
        buf.clear()
        return train_tokens >= train_token_target

    for item in routed:
        buf.append(item)
        if len(buf) == batch_size and flush():
            return out
    if buf:
        flush()
    return out


def select_by_tokens(lengths: np.ndarray, target: int, seed: int) -> np.ndarray:
    """Indices of documents (seeded order, cycling when the target exceeds the total) whose
    lengths sum to at least `target` tokens (whole documents only)."""
    total = int(lengths.sum())
    if total == 0 or target <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    reps = math.ceil(target / total)
    order = np.concatenate([rng.permutation(len(lengths)) for _ in range(reps)])
    n = int(np.searchsorted(np.cumsum(lengths[order]), target, side="left")) + 1
    return order[: min(n, len(order))]


def select_by_weight(n: int, weight: float, seed: int) -> np.ndarray:
    """`weight` times the rows: full repetitions plus a seeded subset for the fraction."""
    rng = np.random.default_rng(seed)
    whole, frac = int(weight), weight - int(weight)
    parts = [np.arange(n) for _ in range(whole)]
    if frac > 0:
        parts.append(np.sort(rng.permutation(n)[: round(frac * n)]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class PackStats:
    tokens_in: int
    sequences: int
    full_sequences: int
    remainder_tokens: int
    remainder_kept: bool

    @property
    def tokens_out(self) -> int:
        """Tokens in the packed sequences (all of them unless the remainder was dropped)."""
        return self.tokens_in - (0 if self.remainder_kept else self.remainder_tokens)


def flat_token_ids(ds) -> np.ndarray:
    """All `input_ids` of a tokenized dataset concatenated, as int32 (Arrow, no Python loop)."""
    if not len(ds):
        return np.zeros(0, dtype=np.int32)
    col = ds.with_format("arrow")[:]["input_ids"]
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in col.chunks]
    return np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(0, dtype=np.int32)


def pack(token_ids: np.ndarray, max_seq_len: int, keep_remainder: bool = True):
    """Cut a flat token stream into `max_seq_len` sequences -> (Dataset with `input_ids`, PackStats)."""
    datasets = _ds()
    n = len(token_ids)
    full = n // max_seq_len
    rem = n - full * max_seq_len
    end = n if (keep_remainder and rem) else full * max_seq_len
    offsets = list(range(0, full * max_seq_len + 1, max_seq_len))
    if keep_remainder and rem:
        offsets.append(n)
    values = pa.array(token_ids[:end].astype(np.int32), type=pa.int32())
    arr = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)
    ds = datasets.Dataset(pa.table({"input_ids": arr}))
    stats = PackStats(tokens_in=n, sequences=len(offsets) - 1, full_sequences=full, remainder_tokens=rem,
                      remainder_kept=bool(keep_remainder and rem))
    return ds, stats
