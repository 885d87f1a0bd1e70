"""Block attention for ModernBERT, and the forward with a key/value cache.

Block diffusion (BD3-LM) cuts a sequence into blocks: attention is bidirectional inside a block and
causal across blocks. Every position carries a block index (0 for the prompt, the context every
block sees) and whether it is a noisy position (a block being denoised) or a clean one:
- a clean query sees the clean keys of its own block and of earlier blocks;
- a noisy query sees the noisy keys of its own block and the clean keys of earlier blocks.
`block_mask` is that rule, the one definition training (the vectorised input of noisy and clean
copies, `dgpt_core.diffusion.blocks`) and decoding share. A position always sees itself.

`encode` re-implements the forward of transformers' ModernBertModel on its modules (embeddings;
per layer: pre-norm attention with rotary positions and a global or sliding-window mask, then the
MLP; final norm) for some query tokens against a `KVCache` of earlier ones, and returns the new
tokens' keys and values. For a block-causal model the cache is exact: no earlier position ever
attends to a later one, so the prompt and every finished block are computed once. For a
full-canvas (bidirectional) model it is Fast-dLLM's approximate prefix cache: the context's keys
are reused while the block they were computed with changes. Without a cache `encode` equals the
model's own forward; tests hold it to that.

Imports only torch: copied beside the weights of exported model folders with `sampler.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """Per layer, the keys and values of earlier tokens (rows, heads, n, head_dim), rotary applied,
    and which of the n columns are real tokens (rows, n); columns are shared positions of all rows
    (prompts are left-padded)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    real: torch.Tensor

    @property
    def length(self) -> int:
        return self.real.shape[1]

    def rows(self, index: torch.Tensor) -> KVCache:
        """The cache of some rows (finished rows leave the batch)."""
        return KVCache([k[index] for k in self.keys], [v[index] for v in self.values], self.real[index])

    def extend(self, keys: list[torch.Tensor], values: list[torch.Tensor], real: torch.Tensor) -> KVCache:
        """This cache followed by more columns (per layer (rows, heads, m, head_dim), and (rows, m))."""
        return KVCache([torch.cat([a, b], 2) for a, b in zip(self.keys, keys)],
                       [torch.cat([a, b], 2) for a, b in zip(self.values, values)], torch.cat([self.real, real], 1))

    def last(self, columns: int) -> KVCache:
        """The newest `columns` columns (a sliding window over a context longer than the model's)."""
        return KVCache([k[:, :, -columns:] for k in self.keys], [v[:, :, -columns:] for v in self.values],
                       self.real[:, -columns:])


def block_mask(block: torch.Tensor, noisy: torch.Tensor, real: torch.Tensor, query_start: int = 0) -> torch.Tensor:
    """(rows, 1, queries, keys) bool: which key each query attends to, for the positions of one
    sequence (rows, keys) given their block index, noisy flag and whether they are real tokens;
    the queries are the positions from `query_start` on."""
    bq, nq = block[:, query_start:, None], noisy[:, query_start:, None]
    bk, nk = block[:, None, :], noisy[:, None, :]
    clean_key = ~nk & ((bk < bq) | ((bk == bq) & ~nq))
    noisy_key = nk & nq & (bk == bq)
    keys = torch.arange(block.shape[1], device=block.device)
    itself = keys[None, :] == keys[query_start:, None]
    return ((real[:, None, :] & (clean_key | noisy_key)) | itself)[:, None]


def layer_masks(config, allowed: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mask of each attention kind of the model: `allowed` (rows, 1, queries, keys) for global
    layers, and within the sliding window of local layers (positions (queries,) / (keys,), or per
    row (rows, queries) / (rows, keys))."""
    masks = {"full_attention": allowed}
    if "sliding_attention" in set(config.layer_types):
        near = (query_pos[..., :, None] - key_pos[..., None, :]).abs() <= config.sliding_window
        masks["sliding_attention"] = allowed & (near if near.dim() == 2 else near[:, None])
    return masks


def forward_masks(config, allowed: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`layer_masks` in the form transformers' ModernBertModel takes as `attention_mask` (a dict by
    layer kind): boolean for sdpa, additive for eager; other kernels take no arbitrary mask."""
    kernel = getattr(config, "_attn_implementation", "sdpa")
    if kernel not in ("sdpa", "eager"):
        raise ValueError(f"block attention needs the sdpa or eager attention kernel, not {kernel!r}")
    masks = layer_masks(config, allowed, positions, positions)
    if kernel == "eager":
        low = torch.finfo(dtype).min
        masks = {kind: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, low) for kind, m in masks.items()}
    return masks


def block_forward_masks(config, block: torch.Tensor, noisy: torch.Tensor, real: torch.Tensor, positions: torch.Tensor,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`forward_masks` of `block_mask`: a block-causal forward through transformers' ModernBertModel."""
    return forward_masks(config, block_mask(block, noisy, real), positions, dtype)


def encode(
    backbone: torch.nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    masks: dict[str, torch.Tensor],
    cache: KVCache | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Final hidden states of `input_ids` (rows, n) at `positions` (n,), attending to the cache's
    columns and to each other as `masks` allows (by layer kind, (rows, 1, n, cache + n) bool, see
    `layer_masks`), and the per-layer keys and values of these n tokens (to extend the cache)."""
    config = backbone.config
    hidden = backbone.embeddings(input_ids=input_ids)
    rotary = {kind: backbone.rotary_emb(hidden, positions[None], kind) for kind in set(config.layer_types)}
    keys, values = [], []
    for i, layer in enumerate(backbone.layers):
        attn = layer.attn
        rows, length = hidden.shape[:2]
        qkv = attn.Wqkv(layer.attn_norm(hidden)).view(rows, length, 3, -1, attn.head_dim)
        query, key, value = qkv.transpose(1, 3).unbind(2)  # each (rows, heads, length, head_dim)
        cos, sin = rotary[layer.attention_type]
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        keys.append(key)
        values.append(value)
        if cache is not None:
            key, value = torch.cat([cache.keys[i], key], 2), torch.cat([cache.values[i], value], 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=masks[layer.attention_type],
                                             scale=attn.head_dim**-0.5)
        hidden = hidden + attn.out_drop(attn.Wo(out.transpose(1, 2).reshape(rows, length, -1)))
        hidden = hidden + layer.mlp(layer.mlp_norm(hidden))
    return backbone.final_norm(hidden), keys, values


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of (rows, heads, length, head_dim), in float32 like transformers."""
    cos, sin = cos[:, None], sin[:, None]
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def padding_mask(real: torch.Tensor, queries: int) -> torch.Tensor:
    """(rows, 1, queries, keys): every query sees every real key (a bidirectional model)."""
    return real.bool()[:, None, None, :].expand(-1, 1, queries, -1)


class PrefixCache:
    """Fast-dLLM's approximate prefix cache of a full-canvas model, for one block: the first forward
    (context and block, `width` context columns) keeps the context's keys and values, the later
    ones run the layers on the block alone against them."""

    def __init__(self, backbone: torch.nn.Module, width: int) -> None:
        self.backbone, self.width = backbone, width
        self.cache: KVCache | None = None

    def __call__(self, x: torch.Tensor, attn: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Hidden states of the block columns of `x` (the rows `live` of the block's batch)."""
        config, width, length = self.backbone.config, self.width, x.shape[1]
        keys = torch.arange(length, device=x.device)
        if self.cache is None:
            hidden, k, v = encode(self.backbone, x, keys, layer_masks(config, padding_mask(attn, length), keys, keys))
            self.cache = KVCache([t[:, :, :width] for t in k], [t[:, :, :width] for t in v], attn[:, :width].bool())
            return hidden[:, width:]
        cache = self.cache if live.shape[0] == self.cache.real.shape[0] else self.cache.rows(live)
        masks = layer_masks(config, padding_mask(attn, length - width), keys[width:], keys)
        return encode(self.backbone, x[:, width:], keys[width:], masks, cache)[0]


class ContextCache:
    """The exact cache of a block-causal model while it decodes block after block: the prompt and
    every finished block are encoded once, by the first forward of the block that follows them
    (one forward of those columns and the new masked block, under `block_mask`). Beyond the model's
    `max_len`, the oldest columns leave the cache (rotary positions keep the distances)."""

    def __init__(self, backbone: torch.nn.Module, max_len: int | None) -> None:
        self.backbone, self.max_len = backbone, max_len
        self.cache: KVCache | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.position = 0
        """Position of the next column."""

    def start_block(self, rows: torch.Tensor, ids: torch.Tensor, real: torch.Tensor) -> None:
        """A block of the batch rows `rows` (indices into the rows of the previous block) follows the
        columns `ids` (rows, n; the prompt, or the block just finished), which are not encoded yet."""
        if self.cache is not None and rows.shape[0] != self.cache.real.shape[0]:
            self.cache = self.cache.rows(rows)
        self.pending = (ids, real.bool())

    def __call__(self, live: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Hidden states of the `block` tokens (those of the block's rows `live`), and the forwards
        it took: one, or two when a step for some rows only finds columns still to encode."""
        forwards = 0
        if self.pending is not None:
            ids, real = self.pending
            self.pending = None
            if live.shape[0] == ids.shape[0]:
                return self._encode(ids, real, block, live), 1
            self._encode(ids, real, ids[:, :0], torch.arange(ids.shape[0], device=ids.device))
            forwards = 1
        return self._encode(block[:, :0], block[:, :0].bool(), block, live), forwards + 1

    def _encode(self, columns: torch.Tensor, real: torch.Tensor, block: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        n, size = columns.shape[1], block.shape[1]
        if self.cache is not None and self.max_len is not None and self.cache.length + n + size > self.max_len:
            keep = self.max_len - n - size
            self.cache = self.cache.last(keep) if keep > 0 else None
        cache = self.cache
        if cache is not None and live.shape[0] != cache.real.shape[0]:
            cache = cache.rows(live)
        device, rows = block.device, block.shape[0]
        blocks = torch.cat([torch.zeros(n, dtype=torch.long, device=device), torch.ones(size, dtype=torch.long, device=device)])
        noisy = blocks.bool()
        new_real = torch.cat([real, real.new_ones((rows, size))], 1)
        allowed = block_mask(blocks.expand(rows, -1), noisy.expand(rows, -1), new_real)
        before = 0 if cache is None else cache.length
        if cache is not None:
            allowed = torch.cat([padding_mask(cache.real, n + size), allowed], -1)
        positions = torch.arange(self.position, self.position + n + size, device=device)
        key_positions = torch.arange(self.position - before, self.position + n + size, device=device)
        hidden, keys, values = encode(self.backbone, torch.cat([columns, block], 1), positions,
                                      layer_masks(self.backbone.config, allowed, positions, key_positions), cache)
        if n:
            new = KVCache([k[:, :, :n] for k in keys], [v[:, :, :n] for v in values], real)
            self.cache = new if self.cache is None else self.cache.extend(new.keys, new.values, new.real)
            self.position += n
        return hidden[:, n:]
