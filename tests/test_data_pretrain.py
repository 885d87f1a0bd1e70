"""Pretraining data: eos between documents, packing conserves tokens, mixing selections."""

from __future__ import annotations

import numpy as np
import pytest

from dgpt_core.data.pretrain import (
    flat_token_ids,
    pack,
    select_by_tokens,
    select_by_weight,
    take_streaming,
    tokenize_documents,
)
from dgpt_core.models.tokenizer import EOS, train_bpe_tokenizer

DOCS = [f"document {i} says " + "word " * (i % 17) for i in range(300)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(DOCS, 300)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_tokenize_appends_eos_after_every_document(tok, num_proc):
    ds = tokenize_documents(DOCS, tok, num_proc=num_proc, batch_size=64)
    eos = tok.convert_tokens_to_ids(EOS)
    assert len(ds) == len(DOCS)
    for doc, ids in zip(DOCS, ds["input_ids"]):
        assert ids[-1] == eos and eos not in ids[:-1]
        assert tok.decode(ids[:-1]) == doc
    assert sum(ds["num_bytes"]) == sum(len(d.encode()) for d in DOCS)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("seq_len", [16, 37, 128])
def test_packing_conserves_tokens(tok, keep, seq_len):
    ds = tokenize_documents(DOCS, tok)
    flat = flat_token_ids(ds)
    assert len(flat) == sum(len(x) for x in ds["input_ids"])
    packed, stats = pack(flat, seq_len, keep_remainder=keep)
    seqs = packed["input_ids"]
    assert all(len(s) == seq_len for s in seqs[:-1])
    out = np.concatenate([np.asarray(s) for s in seqs])
    assert stats.tokens_in == len(flat)
    if keep:
        assert len(out) == len(flat) and (out == flat).all()
        assert stats.remainder_kept == (len(flat) % seq_len > 0)
    else:
        assert len(out) + stats.remainder_tokens == len(flat)
        assert (out == flat[: len(out)]).all() and len(seqs[-1]) == seq_len
    assert stats.tokens_out == len(out)


def test_selection_by_weight_and_tokens():
    assert len(select_by_weight(100, 1.0, 0)) == 100
    assert len(select_by_weight(100, 0.25, 0)) == 25
    twice = select_by_weight(100, 2.5, 0)
    assert len(twice) == 250 and np.bincount(twice).max() == 3
    assert (select_by_weight(100, 0.3, 7) == select_by_weight(100, 0.3, 7)).all()
    lengths = np.array([10, 20, 30, 40])
    idx = select_by_tokens(lengths, 50, 0)
    assert lengths[idx].sum() >= 50 and lengths[idx[:-1]].sum() < 50
    many = select_by_tokens(lengths, 250, 0)  # more than the source holds: cycles
    assert lengths[many].sum() >= 250 and len(set(many.tolist())) == 4


def test_streaming_stops_at_budget(tok):
    routed = ((("validation" if i % 10 == 0 else "train"), d) for i, d in enumerate(DOCS * 100))
    got = take_streaming(routed, tok, train_token_target=500, batch_size=32)
    n = sum(len(x) for x in got["train"]["input_ids"])
    assert 500 <= n < 500 + max(len(x) for x in got["train"]["input_ids"])
    assert got["validation"]["input_ids"]
