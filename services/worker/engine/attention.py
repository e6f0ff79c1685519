"""Paged attention plugged into transformers' AttentionInterface, so the model's own layers run.

The model sees one packed row of tokens: first the decodes (one token each), then the
prefill chunks. Per layer this function writes the new K/V into their slots, then
- decodes: gathers every decode's blocks into one padded [kv_heads, seqs, len, dim]
  batch and runs one masked SDPA, the query heads of each KV head grouped as rows;
- each prefill chunk: attends causally over its cached prefix plus itself.
The per-step metadata (slots, block ids, masks) is built once by the model runner and
shared by all layers through `current`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from services.worker.engine.kv_cache import KVCache

ATTN_NAME = "tokenmill_paged"


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first token in the packed row
    end: int
    context_start: int  # tokens of this sequence already in the cache
    block_ids: torch.Tensor | None  # blocks covering [0, context_start + n) when context_start > 0
    positions: torch.Tensor  # [n] absolute positions of the chunk's tokens


@dataclass(slots=True)
class StepContext:
    kv: KVCache
    slot_mapping: torch.Tensor  # [T] slot of each packed token
    num_decodes: int = 0
    decode_block_ids: torch.Tensor | None = None  # [num_decodes * max_blocks], padded with block 0
    decode_context_lens: torch.Tensor | None = None  # [num_decodes], including the new token
    decode_len: int = 0  # padded key length = max_blocks * block_size
    prefills: list[PrefillChunk] = field(default_factory=list)
    masks: dict = field(default_factory=dict)  # (kind, index, window) -> mask, built on first use

    def decode_mask(self, window: int | None) -> torch.Tensor:
        key = ("decode", 0, window)
        mask = self.masks.get(key)
        if mask is None:
            j = torch.arange(self.decode_len, device=self.slot_mapping.device)
            lens = self.decode_context_lens[:, None]
            mask = j[None, :] < lens
            if window:
                mask &= j[None, :] >= lens - window
            mask = self.masks[key] = mask[None, :, None, :]  # [1, seqs, 1, len]
        return mask

    def prefill_mask(self, idx: int, window: int | None) -> torch.Tensor | None:
        chunk = self.prefills[idx]
        if chunk.context_start == 0 and not window:
            return None  # plain causal
        key = ("prefill", idx, window)
        mask = self.masks.get(key)
        if mask is None:
            keys = chunk.context_start + (chunk.end - chunk.start)
            j = torch.arange(keys, device=self.slot_mapping.device)[None, :]
            q = chunk.positions[:, None]
            mask = j <= q
            if window:
                mask &= j > q - window
            self.masks[key] = mask
        return mask


current: StepContext | None = None


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, heads, T, dim], key/value [1, kv_heads, T, dim] -> ([1, T, heads, dim], None)."""
    ctx = current
    if ctx is None:
        raise RuntimeError(f"{ATTN_NAME} attention runs only inside the paged engine's model runner")
    layer = module.layer_idx
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    kv = ctx.kv
    q, k, v = query[0], key[0], value[0]
    heads, total, dim = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    kv.k[layer].index_copy_(1, ctx.slot_mapping, k)
    kv.v[layer].index_copy_(1, ctx.slot_mapping, v)
    out = torch.empty(total, heads, dim, dtype=q.dtype, device=q.device)

    nd = ctx.num_decodes
    if nd:
        keys = kv.gather(layer, ctx.decode_block_ids, "k").view(kv_heads, nd, ctx.decode_len, dim)
        vals = kv.gather(layer, ctx.decode_block_ids, "v").view(kv_heads, nd, ctx.decode_len, dim)
        qd = q[:, :nd].reshape(kv_heads, group, nd, dim).transpose(1, 2)  # [kv_heads, seqs, group, dim]
        o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=ctx.decode_mask(window), scale=scaling)
        out[:nd] = o.permute(1, 0, 2, 3).reshape(nd, heads, dim)

    for idx, chunk in enumerate(ctx.prefills):
        s, e = chunk.start, chunk.end
        if chunk.context_start:
            keys = kv.gather(layer, chunk.block_ids, "k")[:, : chunk.context_start + e - s]
            vals = kv.gather(layer, chunk.block_ids, "v")[:, : chunk.context_start + e - s]
        else:
            keys, vals = k[:, s:e], v[:, s:e]
        mask = ctx.prefill_mask(idx, window)
        o = F.scaled_dot_product_attention(q[None, :, s:e], keys[None], vals[None], attn_mask=mask,
                                           is_causal=mask is None, scale=scaling, enable_gqa=group > 1)
        out[s:e] = o[0].transpose(0, 1)
    return out[None], None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention)
