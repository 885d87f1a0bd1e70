"""Approximate prefix key/value cache for semi-autoregressive block decoding on ModernBERT
(Fast-dLLM's prefix cache).

A bidirectional encoder has no exact cache: every context token attends to the block, so its
keys and values change whenever the block does. The approximation computes the context once per
block, on the block's first step (an all-mask block), and reuses the context's keys and values of
every layer while that block is denoised: the later steps run the layers on the block tokens
alone, attending to the cached context and to the block.

`encode` re-implements the forward of transformers' ModernBertModel on its modules (embeddings;
per layer: pre-norm attention with rotary positions and a global or sliding-window mask, then the
MLP; final norm). Without a cache it equals the model's own forward; a test holds it to that.
Imports only torch: copied beside the weights of exported model folders with `sampler.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefixCache:
    """Per layer, the context's keys and values (rows, heads, width, head_dim), rotary applied."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def rows(self, index: torch.Tensor) -> PrefixCache:
        """The cache of some rows (a strategy that compacts drops finished rows from the batch)."""
        return PrefixCache([k[index] for k in self.keys], [v[index] for v in self.values])


def encode(
    backbone: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    width: int,
    cache: PrefixCache | None = None,
) -> tuple[torch.Tensor, PrefixCache]:
    """Final hidden states of the block, the columns from `width` on, and the context's cache.

    Without `cache`, `input_ids` (rows, width + size) is the context followed by the block, and the
    returned cache holds the first `width` columns. With it, `input_ids` is the block alone
    (rows, size) and the cache stands in for the context, whose keys are not recomputed.
    `attention_mask` always covers context and block (rows, width + size)."""
    config = backbone.config
    size = input_ids.shape[1] - (width if cache is None else 0)
    start = width if cache is not None else 0
    hidden = backbone.embeddings(input_ids=input_ids)
    query_pos = torch.arange(start, width + size, device=input_ids.device)
    key_pos = torch.arange(width + size, device=input_ids.device)
    keep = attention_mask.bool()[:, None, None, :]  # (rows, 1, 1, keys)
    kinds = set(config.layer_types)
    masks = {"full_attention": keep}
    if "sliding_attention" in kinds:
        masks["sliding_attention"] = keep & ((query_pos[:, None] - key_pos[None, :]).abs() <= config.sliding_window)
    rotary = {kind: backbone.rotary_emb(hidden, query_pos[None], kind) for kind in kinds}
    keys, values = [], []
    for i, layer in enumerate(backbone.layers):
        attn = layer.attn
        rows, length = hidden.shape[:2]
        qkv = attn.Wqkv(layer.attn_norm(hidden)).view(rows, length, 3, -1, attn.head_dim)
        query, key, value = qkv.transpose(1, 3).unbind(2)  # each (rows, heads, length, head_dim)
        cos, sin = rotary[layer.attention_type]
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        if cache is None:
            keys.append(key[:, :, :width])
            values.append(value[:, :, :width])
        else:
            key = torch.cat([cache.keys[i], key], 2)
            value = torch.cat([cache.values[i], value], 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=masks[layer.attention_type],
                                             scale=attn.head_dim**-0.5)
        hidden = hidden + attn.out_drop(attn.Wo(out.transpose(1, 2).reshape(rows, length, -1)))
        hidden = hidden + layer.mlp(layer.mlp_norm(hidden))
    hidden = backbone.final_norm(hidden)
    return hidden[:, hidden.shape[1] - size :], cache if cache is not None else PrefixCache(keys, values)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of (rows, heads, length, head_dim), in float32 like transformers."""
    cos, sin = cos[:, None], sin[:, None]
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).to(x.dtype)
