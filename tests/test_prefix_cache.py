"""The forward with a key/value cache against transformers' ModernBERT, and the approximate prefix
cache of full-canvas models in the sampler."""

from __future__ import annotations

import pytest
import torch
from transformers import ModernBertForMaskedLM

from dgpt_core.generation.attention import PrefixCache, encode, layer_masks, padding_mask
from dgpt_core.generation.sampler import SamplerConfig, generate

from .tiny_models import IDS, PROMPTS, tiny_modernbert


@pytest.fixture(scope="module")
def model() -> ModernBertForMaskedLM:
    """Global and sliding-window layers (window 8, shorter than the inputs below)."""
    return tiny_modernbert(num_hidden_layers=4, global_attn_every_n_layers=2, local_attention=8,
                           initializer_range=0.5)


def left_padded(rows: int = 3, length: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(6, 64, (rows, length), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[0, :5] = 0
    ids[0, :5] = IDS.pad
    return ids, attn


@torch.inference_mode()
def test_encode_without_cache_is_the_models_forward(model):
    ids, attn = left_padded()
    reference = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    positions = torch.arange(ids.shape[1])
    hidden, keys, values = encode(model.model, ids, positions,
                                  layer_masks(model.config, padding_mask(attn, ids.shape[1]), positions, positions))
    assert torch.allclose(hidden[attn.bool()], reference[attn.bool()], atol=1e-5)
    assert len(keys) == len(values) == model.config.num_hidden_layers
    assert keys[0].shape == (3, 2, 30, 16)


@torch.inference_mode()
def test_the_prefix_cache(model):
    """The block alone against the cache: exact while the block is what the cache saw, an
    approximation once it changed (the context's keys still reflect the old block)."""
    ids, attn = left_padded()
    rows = torch.arange(3)
    prefix = PrefixCache(model.model, 20)
    first = prefix(ids, attn, rows)
    reference = model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, 20:]
    assert torch.allclose(first, reference, atol=1e-5) and prefix.cache.length == 20
    assert torch.allclose(prefix(ids, attn, rows), reference, atol=1e-5)
    changed = ids.clone()
    changed[:, 20:] = IDS.mask
    approx = prefix(changed, attn, rows)
    exact = model.model(input_ids=changed, attention_mask=attn).last_hidden_state[:, 20:]
    assert not torch.allclose(approx, exact, atol=1e-5)
    subset = prefix(changed[1:], attn[1:], torch.tensor([1, 2]))
    assert torch.allclose(subset, approx[1:], atol=1e-5)


@pytest.mark.parametrize("strategy", ["confidence", "threshold"])
def test_sampler_runs_the_whole_context_once_per_block(model, strategy):
    """With the cache, only a block's first forward embeds the context; the other forwards embed
    the block alone, and the result is a complete answer."""
    lengths = []
    handle = model.model.embeddings.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        cfg = SamplerConfig(strategy=strategy, steps=4, max_new_tokens=12, block_size=4, temperature=0.0,
                            stop_token_ids=(), seed=0, prefix_cache=True)
        result = generate(model, PROMPTS, IDS, cfg)
    finally:
        handle.remove()
    assert not (result.canvas == IDS.mask).any()
    assert len(lengths) == result.nfe
    full = [n for n in lengths if n > 4]
    assert len(full) == 3  # one per block
    assert all(n == 4 for n in lengths if n <= 4)


def test_one_step_blocks_are_exact(model):
    """A block decoded in one forward never reads the cache, so the result is the uncached one."""
    cfg = SamplerConfig(strategy="confidence", steps=1, max_new_tokens=12, block_size=3, temperature=0.0,
                        stop_token_ids=(), seed=0)
    cached = generate(model, PROMPTS, IDS, cfg.replace(prefix_cache=True))
    assert torch.equal(cached.canvas, generate(model, PROMPTS, IDS, cfg).canvas)


def test_rows_finishing_apart_keep_the_cache_of_every_row(model):
    """A strategy that does not compact (random: each row reveals its masks at its own pace) keeps
    finished rows in the forward batch, so their cached context stays in use too."""
    cfg = SamplerConfig(strategy="random", steps=5, max_new_tokens=12, block_size=4, temperature=0.0,
                        stop_token_ids=(), seed=0, prefix_cache=True)
    assert not cfg.rule.compacts
    result = generate(model, PROMPTS, IDS, cfg)
    assert not (result.canvas == IDS.mask).any()
