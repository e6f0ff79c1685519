"""Paged attention plugged into transformers' AttentionInterface, so the model's own layers run.

The model sees one packed row of tokens: first the decodes (one token each), then the
prefill chunks. Per layer this function writes the new K/V into their slots, then
- decodes: per group of similar context length, gathers the blocks into one padded
  [kv_heads, seqs, len, dim] batch and runs one masked SDPA, the query heads of each
  KV head grouped as rows (a sliding-window layer gathers only the window's blocks);
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
    block_ids: torch.Tensor | None  # blocks covering [key_offset, context_start + n) when context_start > 0
    positions: torch.Tensor  # [n] absolute positions of the chunk's tokens
    key_offset: int = 0  # position of the first gathered key (> 0 when blocks left a sliding window)


@dataclass(slots=True)
class DecodeGroup:
    """Decodes [start, start + count) of the packed row, padded to the group's longest context.

    The runner groups decodes of similar length (sorted longest first) so little padding is gathered.
    """

    start: int
    count: int
    context_lens: list[int]  # including the new token
    tables: list[list[int]] | None  # each sequence's blocks in use; None = `block_ids` given whole
    block_size: int
    device: torch.device
    block_ids: torch.Tensor | None = None
    length: int = 0
    views: dict = field(default_factory=dict)  # window -> (block ids, key length, mask)

    def view(self, window: int | None) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Blocks to gather and the [1, count, 1, len] mask; a sliding window gathers only its own blocks."""
        v = self.views.get(window)
        if v is None:
            v = self.views[window] = self._build(window)
        return v

    def _build(self, window: int | None):
        bs, lens, dev = self.block_size, self.context_lens, self.device
        first = [0] * self.count
        ids, length = self.block_ids, self.length
        if self.tables is not None:
            if window:
                first = [max(0, n - window) // bs for n in lens]
            nblk = max(-(-n // bs) - f for n, f in zip(lens, first, strict=True))
            flat: list[int] = []
            for table, n, f in zip(self.tables, lens, first, strict=True):
                used = table[f : -(-n // bs)]
                flat += used
                flat += [0] * (nblk - len(used))
            ids, length = torch.tensor(flat, dtype=torch.long, device=dev), nblk * bs
        pos = torch.tensor(first, device=dev)[:, None] * bs + torch.arange(length, device=dev)[None, :]
        n = torch.tensor(lens, device=dev)[:, None]
        mask = pos < n
        if window:
            mask &= pos >= n - window
        return ids, length, mask[None, :, None, :]


@dataclass(slots=True)
class StepContext:
    kv: KVCache
    slot_mapping: torch.Tensor  # [T] slot of each packed token
    num_decodes: int = 0
    decode_block_ids: torch.Tensor | None = None  # one group given whole: [num_decodes * max_blocks]
    decode_context_lens: torch.Tensor | None = None  # [num_decodes], including the new token
    decode_len: int = 0  # padded key length = max_blocks * block_size
    prefills: list[PrefillChunk] = field(default_factory=list)
    masks: dict = field(default_factory=dict)  # (index, window) -> prefill mask, built on first use
    decode_groups: list[DecodeGroup] = field(default_factory=list)

    def groups(self) -> list[DecodeGroup]:
        if not self.decode_groups and self.num_decodes:
            self.decode_groups = [DecodeGroup(0, self.num_decodes, self.decode_context_lens.tolist(), None,
                                              self.kv.block_size, self.slot_mapping.device, self.decode_block_ids,
                                              self.decode_len)]
        return self.decode_groups

    def prefill_mask(self, idx: int, window: int | None) -> torch.Tensor | None:
        chunk = self.prefills[idx]
        if chunk.context_start == 0 and not window:
            return None  # plain causal
        key = (idx, window)
        mask = self.masks.get(key)
        if mask is None:
            keys = chunk.context_start + (chunk.end - chunk.start) - chunk.key_offset
            j = torch.arange(chunk.key_offset, chunk.key_offset + keys, device=self.slot_mapping.device)[None, :]
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

    for grp in ctx.groups():
        ids, length, mask = grp.view(window)
        s, n = grp.start, grp.count
        keys = kv.gather(layer, ids, "k").view(kv_heads, n, length, dim)
        vals = kv.gather(layer, ids, "v").view(kv_heads, n, length, dim)
        qd = q[:, s : s + n].reshape(kv_heads, group, n, dim).transpose(1, 2)  # [kv_heads, seqs, group, dim]
        o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=mask, scale=scaling)
        out[s : s + n] = o.permute(1, 0, 2, 3).reshape(n, heads, dim)

    for idx, chunk in enumerate(ctx.prefills):
        s, e = chunk.start, chunk.end
        if chunk.context_start:
            n_keys = chunk.context_start + e - s - chunk.key_offset
            keys = kv.gather(layer, chunk.block_ids, "k")[:, :n_keys]
            vals = kv.gather(layer, chunk.block_ids, "v")[:, :n_keys]
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
