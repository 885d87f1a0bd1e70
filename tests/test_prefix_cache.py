"""The approximate prefix cache: its forward against transformers' ModernBERT, and in the sampler."""

from __future__ import annotations

import pytest
import torch
from transformers import ModernBertForMaskedLM

from dgpt_core.generation.attention import encode
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
    block, cache = encode(model.model, ids, attn, width=20)
    assert torch.allclose(block, reference[:, 20:], atol=1e-5)
    assert len(cache.keys) == model.config.num_hidden_layers
    assert cache.keys[0].shape == (3, 2, 20, 16)


@torch.inference_mode()
def test_encode_from_the_cache(model):
    """The block alone against the cache: exact while the block is what the cache saw, an
    approximation once it changed (the context's keys still reflect the old block)."""
    ids, attn = left_padded()
    _, cache = encode(model.model, ids, attn, width=20)
    same, _ = encode(model.model, ids[:, 20:], attn, 20, cache)
    assert torch.allclose(same, model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, 20:], atol=1e-5)
    changed = ids.clone()
    changed[:, 20:] = IDS.mask
    approx, _ = encode(model.model, changed[:, 20:], attn, 20, cache)
    exact = model.model(input_ids=changed, attention_mask=attn).last_hidden_state[:, 20:]
    assert not torch.allclose(approx, exact, atol=1e-5)
    subset, _ = encode(model.model, changed[1:, 20:], attn[1:], 20, cache.rows(torch.tensor([1, 2])))
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
