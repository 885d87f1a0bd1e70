"""ModernBERT masked-LM backbone: build from a typed config, or start from a pretrained checkpoint."""

from __future__ import annotations

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM, PreTrainedTokenizerBase

from ..config import ModelConfig
from ..generation.attention import block_forward_masks
from ..hub import hub_error_message, is_offline
from .tokenizer import special_token_ids


def modernbert_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> ModernBertConfig:
    """A ModernBertConfig whose vocabulary and special-token ids all come from the tokenizer."""
    ids = special_token_ids(tokenizer)
    return ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        global_attn_every_n_layers=cfg.global_attn_every_n_layers,
        local_attention=cfg.local_attention,
        embedding_dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        mlp_dropout=cfg.dropout,
        initializer_range=cfg.initializer_range,
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        bos_token_id=ids["eos"],
        cls_token_id=ids["eos"],
        sep_token_id=ids["eos"],
        mask_token_id=ids["mask"],
        attn_implementation=cfg.attn_implementation,
    )


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> ModernBertForMaskedLM:
    """A randomly initialised ModernBertForMaskedLM, or `cfg.init_from` with embeddings resized.

    Built through `from_config`/`from_pretrained`, so under a DeepSpeed ZeRO-3 config that
    transformers knows about (HfDeepSpeedConfig / TrainingArguments(deepspeed=...)) parameters
    are created partitioned inside `zero.Init` and initialised by transformers' own hooks.
    """
    if cfg.init_from:
        return load_pretrained_backbone(cfg, tokenizer)
    config = modernbert_config(cfg, tokenizer)
    return ModernBertForMaskedLM._from_config(config, attn_implementation=cfg.attn_implementation)


def load_pretrained_backbone(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> ModernBertForMaskedLM:
    """Load `cfg.init_from`, resize its embeddings to the tokenizer and point it at our special ids."""
    name = cfg.init_from
    try:
        model = ModernBertForMaskedLM.from_pretrained(name, attn_implementation=cfg.attn_implementation)
    except OSError as err:
        if is_offline() or "offline" in str(err).lower() or "connect" in str(err).lower():
            raise RuntimeError(hub_error_message("model", name)) from None
        raise
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = special_token_ids(tokenizer)
    model.config.pad_token_id = ids["pad"]
    model.config.eos_token_id = ids["eos"]
    model.config.mask_token_id = ids["mask"]
    return model


def unwrap(model: torch.nn.Module) -> ModernBertForMaskedLM:
    """The ModernBertForMaskedLM inside a DeepSpeed engine / DDP wrapper / compiled module / peft
    model (with the adapter's layers in it)."""
    while hasattr(model, "module"):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


BLOCK_INPUTS = ("position_ids", "block_ids", "block_noisy")
"""Batch fields of block diffusion's vectorised input (`dgpt_core.diffusion.blocks`)."""


def block_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The BLOCK_INPUTS a batch carries (none for a full-canvas batch)."""
    return {name: batch[name] for name in BLOCK_INPUTS if name in batch}


def logits_at(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
    block_noisy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits only at `positions` (a bool mask of input_ids' shape), shape (positions.sum(), vocab).

    Without block inputs attention is bidirectional over the real tokens (`attention_mask`); with
    them (block diffusion's vectorised rows) it follows `generation.attention.block_mask`, through
    transformers' own forward (so gradient checkpointing and every wrapper keep working). The
    vocabulary projection is the costliest layer at a large vocab; running it on the scored
    positions alone saves its time and the (batch, length, vocab) activation.
    """
    lm = unwrap(model)
    if block_ids is not None:
        attention_mask = block_forward_masks(lm.config, block_ids, block_noisy, attention_mask.bool(), position_ids,
                                             lm.dtype)
    # a full-canvas forward passes no position ids: any encoder with ModernBERT's `model(input_ids,
    # attention_mask)` call scores with it
    extra = {} if position_ids is None else {"position_ids": position_ids}
    hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
    return lm.decoder(lm.head(hidden[positions]))


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters of the model (an adapter's included), or only those that train; a ZeRO-3
    partitioned parameter counts its full size (ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in unwrap(model).parameters()
               if p.requires_grad or not trainable_only)
