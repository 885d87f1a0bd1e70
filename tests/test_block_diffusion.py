"""Block diffusion: the block mask, the vectorised training input, and block-by-block decoding with
an exact key/value cache, on tiny random ModernBERTs."""

from __future__ import annotations

import pytest
import torch

from dgpt_core.config import DiffusionConfig
from dgpt_core.diffusion.blocks import block_ids
from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.diffusion.loss import diffusion_loss
from dgpt_core.generation.attention import block_mask, forward_masks
from dgpt_core.generation.options import INFO_KEY
from dgpt_core.generation.sampler import SamplerConfig, generate
from dgpt_core.models.backbone import block_inputs, logits_at

from .tiny_models import IDS, PROMPTS, tiny_modernbert

B = 4


def block_model(**overrides):
    model = tiny_modernbert(**overrides)
    setattr(model.config, INFO_KEY, {"kind": "sft", "block_size": B})
    return model


def collator(block_size=B, **cfg) -> DiffusionCollator:
    return DiffusionCollator(DiffusionConfig(block_size=block_size, **cfg), mask_id=IDS.mask, pad_id=IDS.pad,
                             delete_id=IDS.delete, replacement_ids=list(range(6, 64)), max_length=64)


def sft_features(n: int = 6) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(6, 64, (3 + i % 3,), generator=gen).tolist()
        answer = torch.randint(6, 64, (5 + 2 * i,), generator=gen).tolist()
        out.append({"input_ids": prompt + answer, "eligible_mask": [0] * len(prompt) + [1] * len(answer)})
    return out


def test_the_block_mask():
    """Context (block 0) and two blocks of one row, as the vectorised input lays them out: the noisy
    copies of blocks 1 and 2, then the clean copy of block 1."""
    block = torch.tensor([[0, 0, 1, 1, 2, 2, 1, 1]])
    noisy = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]]).bool()
    allowed = block_mask(block, noisy, torch.ones_like(noisy))[0, 0].int()
    assert allowed.tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0],  # context: itself
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # noisy block 1: context and itself
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 1],  # noisy block 2: context, itself, the clean block 1
        [1, 1, 0, 0, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0, 1, 1],  # clean block 1: context and itself
        [1, 1, 0, 0, 0, 0, 1, 1],
    ]
    padded = block_mask(block, noisy, torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]]).bool())[0, 0]
    assert not padded[:7, 7].any() and padded[7, 7]  # a pad key is seen by nobody but itself


def test_the_vectorised_batch():
    features = sft_features()
    batch = collator()(features)
    for row, feature in enumerate(features):
        answer = sum(feature["eligible_mask"])
        prompt = len(feature["input_ids"]) - answer
        blocks = -(-answer // B)
        clean = B * (blocks - 1)  # every block but the last
        assert int(batch["attention_mask"][row].sum()) == prompt + answer + clean
        noisy = batch["block_noisy"][row]
        assert int(noisy.sum()) == answer
        kept = batch["attention_mask"][row].bool()
        copy = kept & ~noisy & (batch["block_ids"][row] > 0)
        assert batch["input_ids"][row][copy].tolist() == feature["input_ids"][prompt : prompt + clean]
        assert batch["position_ids"][row][copy].tolist() == list(range(prompt, prompt + clean))
        assert not (batch["labels"][row][copy] != -100).any()
    assert len(batch["t"]) == sum(-(-sum(f["eligible_mask"]) // B) for f in features)


def test_a_blocks_logits_ignore_every_later_position():
    """Changing the tokens of later blocks (noisy and clean copies) leaves a block's logits
    exactly as they were."""
    model = block_model(num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=6)
    batch = collator()(sft_features())
    first = (batch["block_noisy"] & (batch["block_ids"] == 1))
    changed = batch["input_ids"].clone()
    later = batch["attention_mask"].bool() & (batch["block_ids"] > 1)
    changed[later] = (changed[later] + 7) % 58 + 6
    with torch.no_grad():
        before = logits_at(model, batch["input_ids"], batch["attention_mask"], first, **block_inputs(batch))
        after = logits_at(model, changed, batch["attention_mask"], first, **block_inputs(batch))
    assert torch.equal(before, after)
    second = batch["block_noisy"] & (batch["block_ids"] == 2)
    with torch.no_grad():
        moved = logits_at(model, changed, batch["attention_mask"], second, **block_inputs(batch))
        kept = logits_at(model, batch["input_ids"], batch["attention_mask"], second, **block_inputs(batch))
    assert not torch.equal(moved, kept)


def test_each_block_is_scored_as_decoding_sees_it():
    """The vectorised forward gives every noisy block the logits that one forward of the context,
    the clean earlier blocks and that noisy block gives it (what uncached decoding runs)."""
    model = block_model()
    batch = collator()(sft_features(3))
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=forward_masks(
            model.config, block_mask(batch["block_ids"], batch["block_noisy"], batch["attention_mask"].bool()),
            batch["position_ids"], model.dtype)).last_hidden_state
        for row in range(3):
            kept = batch["attention_mask"][row].bool()
            ids, blocks, noisy = batch["input_ids"][row], batch["block_ids"][row], batch["block_noisy"][row]
            for b in range(1, int(blocks[noisy].max()) + 1):
                context = kept & ~noisy & (blocks < b)
                own = noisy & (blocks == b)
                x = torch.cat([ids[context], ids[own]])[None]
                alone = torch.cat([blocks[context], blocks[own]])[None]
                flags = torch.cat([noisy[context], noisy[own]])[None]
                masks = forward_masks(model.config, block_mask(alone, flags, torch.ones_like(flags)),
                                      torch.arange(x.shape[1]), model.dtype)
                single = model.model(input_ids=x, attention_mask=masks).last_hidden_state[0, -int(own.sum()):]
                assert torch.allclose(single, hidden[row][own], atol=1e-5)


def test_one_block_over_all_the_text_is_the_full_canvas_model():
    """Pretraining rows (every token eligible) in one block: the same corrupted batch as block_size
    None, and the same loss."""
    model = block_model()
    features = [{"input_ids": f["input_ids"]} for f in sft_features()]
    full, one = collator(None)(features), collator(64)(features)
    for name in ("input_ids", "attention_mask", "labels", "masked_positions", "t", "loss_weight"):
        assert torch.equal(full[name], one[name]), name
    with torch.no_grad():
        a = diffusion_loss(model, full, mask_id=IDS.mask).total
        b = diffusion_loss(model, one, mask_id=IDS.mask).total
    assert torch.allclose(a, b, atol=1e-6)


def test_edit_corruption_keeps_blocks_and_positions_consistent():
    """Swaps and spurious insertions in block mode: inserted tokens take the block of the token they
    precede, are labelled <|delete|> and scored by the edit loss, and the clean copy stays clean."""
    batch = collator(edit_start=0.0, edit_prob=0.2, insert_prob=0.3)(sft_features())
    inserted = batch["labels"] == IDS.delete
    assert inserted.any() and batch["edit_positions"][inserted].all() and batch["block_noisy"][inserted].all()
    assert (batch["block_ids"][inserted] > 0).all()
    clean = batch["attention_mask"].bool() & ~batch["block_noisy"] & (batch["block_ids"] > 0)
    assert not (batch["input_ids"][clean] == IDS.mask).any() and not batch["edit_positions"][clean].any()


def test_block_ids():
    eligible = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0]]).bool()
    assert block_ids(eligible, 2).tolist() == [[0, 0, 1, 1, 2, 2, 3, 0]]


@pytest.mark.parametrize("strategy", ["confidence", "threshold", "random"])
@pytest.mark.parametrize("layers", [{}, {"num_hidden_layers": 3, "global_attn_every_n_layers": 2, "local_attention": 6}])
def test_cached_decoding_equals_uncached_block_causal_decoding(strategy, layers):
    model = block_model(**layers)
    cfg = SamplerConfig(strategy=strategy, steps=3, max_new_tokens=14, temperature=0.0, stop_token_ids=(), seed=0)
    cached = generate(model, PROMPTS, IDS, cfg)
    uncached = generate(model, PROMPTS, IDS, cfg.replace(prefix_cache=False))
    assert torch.equal(cached.canvas, uncached.canvas)
    assert cached.nfe == uncached.nfe
    assert not (cached.canvas == IDS.mask).any()


def test_the_cache_encodes_every_context_column_once():
    """Each forward embeds the block (B tokens), and the first of a block also the columns before
    it not yet in the cache: the prompt, then the block just finished."""
    model = block_model()
    lengths = []
    handle = model.model.embeddings.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        result = generate(model, PROMPTS, IDS, SamplerConfig(strategy="confidence", steps=2, max_new_tokens=12,
                                                             temperature=0.0, stop_token_ids=(), seed=0))
    finally:
        handle.remove()
    prompt = max(len(p) for p in PROMPTS)
    assert lengths == [prompt + B, B, B + B, B, B + B, B] and result.nfe == len(lengths)


def test_a_row_stops_at_the_block_with_its_stop_token():
    model = block_model()
    cfg = SamplerConfig(strategy="confidence", steps=B, max_new_tokens=40, temperature=0.0, seed=0)

    def stop_in_second_block(step, x, logits):
        if x.shape[1] >= max(len(p) for p in PROMPTS) + B and step % B == 0:
            logits[:, 0, IDS.im_end] = 1e4
        return logits

    result = generate(model, PROMPTS, IDS, cfg, logits_hook=stop_in_second_block)
    assert all(result.stopped) and all(len(a) <= 2 * B for a in result.answers)


def test_a_block_model_refuses_another_block_size():
    with pytest.raises(ValueError, match="block-causal with blocks of 4"):
        generate(block_model(), PROMPTS, IDS, SamplerConfig(block_size=8, max_new_tokens=8))
