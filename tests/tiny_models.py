"""The tiny random ModernBERT and special-token ids that the sampler tests share."""

from __future__ import annotations

from typing import Any

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

from dgpt_core.generation.sampler import TokenIds

IDS = TokenIds(mask=2, pad=1, eos=0, im_end=4, delete=5, im_start=3)
PROMPTS = [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26]]
MAX_LEN = 64


def tiny_modernbert(**overrides: Any) -> ModernBertForMaskedLM:
    """Vocabulary 64, hidden 32, 2 layers of global attention, seed 0, in eval mode; `overrides`
    replace ModernBertConfig fields."""
    torch.manual_seed(0)
    fields: dict[str, Any] = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_LEN, global_attn_every_n_layers=1, pad_token_id=IDS.pad,
        eos_token_id=IDS.eos, bos_token_id=IDS.eos, cls_token_id=IDS.eos, sep_token_id=IDS.eos,
        mask_token_id=IDS.mask, attn_implementation="sdpa",
    )
    return ModernBertForMaskedLM(ModernBertConfig(**{**fields, **overrides})).eval()
