"""Paged attention: each layer stores its new K/V in their slots, then every token attends over its
own sequence's cache (its cached prefix, the step's earlier tokens and itself; a sliding window when
the layer has one). Two implementations of that one contract:

- kernel (CPU, float32): tokenmill's C++ op reads each sequence's blocks where they lie, decodes and
  prefill chunks alike (layers/csrc/attention.cpp);
- triton (CUDA; the CPU under Triton's interpreter): tokenmill's Triton kernels over the Triton KV layout,
  a decode kernel for the step's decodes and a prefill kernel for its chunks (layers/gpu/attention.py);
- torch (CPU with other dtypes or no compiler): decodes in groups of similar context length, gathered into
  one padded batch for a masked SDPA; each prefill chunk attends causally over its prefix plus itself.

The model runner builds one StepContext per step; the native model calls `attend` per layer, and
transformers' modules reach the same function through the registered attention interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from services.worker.engine.kv_cache import KVCache
from services.worker.engine.layers import gpu, kernels

ATTN_NAME = "tokenmill_paged"
MAX_DECODE_GROUPS = 6


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
    """Decodes [start, start + count) of the packed row, padded to the group's longest context."""

    start: int
    count: int
    context_lens: list[int]  # including the new token
    tables: list[list[int]]  # each sequence's blocks in use
    block_size: int
    device: torch.device
    views: dict = field(default_factory=dict)  # window -> (block ids, key length, mask)

    def view(self, window: int | None) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Blocks to gather and the [1, count, 1, len] mask; a sliding window gathers only its own blocks."""
        v = self.views.get(window)
        if v is None:
            v = self.views[window] = self._build(window)
        return v

    def _build(self, window: int | None):
        bs, lens, dev = self.block_size, self.context_lens, self.device
        first = [max(0, n - window) // bs for n in lens] if window else [0] * self.count
        nblk = max(-(-n // bs) - f for n, f in zip(lens, first, strict=True))
        flat: list[int] = []
        for table, n, f in zip(self.tables, lens, first, strict=True):
            used = table[f : -(-n // bs)]
            flat += used + [0] * (nblk - len(used))
        ids, length = torch.tensor(flat, dtype=torch.long, device=dev), nblk * bs
        pos = torch.tensor(first, device=dev)[:, None] * bs + torch.arange(length, device=dev)[None, :]
        n = torch.tensor(lens, device=dev)[:, None]
        mask = pos < n
        if window:
            mask &= pos >= n - window
        return ids, length, mask[None, :, None, :]


@dataclass(slots=True)
class StepContext:
    """One step's attention metadata, built once by the model runner and shared by every layer."""

    kv: KVCache
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each packed token
    positions: torch.Tensor  # [T] int64
    token_seq: torch.Tensor  # [T] int32: the token's row in block_tables
    token_pos: torch.Tensor  # [T] int32
    block_tables: torch.Tensor  # [sequences, max blocks] int32
    decode_positions: list[int]
    decode_tables: list[list[int]]
    prefill_specs: list[tuple[int, int, int, list[int]]]  # (start, end, context_start, block table)
    # the Triton path's: keys per decode (its position + 1; one per decode, which come first), (first token,
    # count, table row) per prefill tile, and the decode kernel's context splits
    decode_lens: torch.Tensor | None = None
    prefill_tiles: torch.Tensor | None = None
    decode_splits: int = 1
    _groups: list[DecodeGroup] | None = None
    _prefills: dict = field(default_factory=dict)  # window -> [PrefillChunk]
    _masks: dict = field(default_factory=dict)  # (index, window) -> prefill mask

    def groups(self) -> list[DecodeGroup]:
        """Decodes split where padding to the group's longest would waste a quarter (torch path)."""
        if self._groups is None:
            bs, pos, tables, groups, start = self.kv.block_size, self.decode_positions, self.decode_tables, [], 0
            for i in range(1, len(pos) + 1):
                if i < len(pos) and (len(groups) == MAX_DECODE_GROUPS - 1 or
                                     (pos[i] // bs + 1) * 4 >= (pos[start] // bs + 1) * 3):
                    continue
                groups.append(DecodeGroup(start, i - start, [p + 1 for p in pos[start:i]], tables[start:i], bs,
                                          self.slot_mapping.device))
                start = i
            self._groups = groups
        return self._groups

    def prefills(self, window: int | None) -> list[PrefillChunk]:
        chunks = self._prefills.get(window)
        if chunks is None:
            bs, dev, chunks = self.kv.block_size, self.slot_mapping.device, []
            for start, end, c, table in self.prefill_specs:
                first = max(0, c - window + 1) // bs if window else 0  # earlier blocks may be freed
                ids = torch.tensor(table[first : -(-(c + end - start) // bs)], dtype=torch.long, device=dev)
                chunks.append(PrefillChunk(start, end, c, ids if c else None, torch.arange(c, c + end - start,
                                                                                         device=dev), first * bs))
            self._prefills[window] = chunks
        return chunks

    def prefill_mask(self, idx: int, window: int | None) -> torch.Tensor | None:
        chunk = self.prefills(window)[idx]
        if chunk.context_start == 0 and not window:
            return None  # plain causal
        mask = self._masks.get((idx, window))
        if mask is None:
            keys = chunk.context_start + (chunk.end - chunk.start) - chunk.key_offset
            j = torch.arange(chunk.key_offset, chunk.key_offset + keys, device=self.slot_mapping.device)[None, :]
            q = chunk.positions[:, None]
            mask = j <= q
            if window:
                mask &= j > q - window
            self._masks[(idx, window)] = mask
        return mask


def build_context(kv: KVCache, pos: list[int], token_seq: list[int], tables: list[list[int]], num_decodes: int,
                  prefills: list[tuple[int, int, int, list[int]]]) -> StepContext:
    """A step's metadata from plain lists: each packed token's position and sequence (an index into
    `tables`), the first num_decodes tokens being decodes, and the prefill chunks' (start, end, context
    start, table)."""
    bs, dev = kv.block_size, kv.device
    slots = [tables[s][p // bs] * bs + p % bs for s, p in zip(token_seq, pos, strict=True)]
    width = max(len(t) for t in tables)
    positions = torch.tensor(pos, dtype=torch.long, device=dev)
    ctx = StepContext(
        kv, torch.tensor(slots, dtype=torch.long, device=dev), positions,
        torch.tensor(token_seq, dtype=torch.int32, device=dev), positions.to(torch.int32),
        torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
        pos[:num_decodes], tables[:num_decodes], prefills)
    if kv.triton:
        from services.worker.engine.layers.gpu import attention as gpu_attention

        ctx.decode_lens = torch.tensor([p + 1 for p in pos[:num_decodes]], dtype=torch.int32, device=dev)
        ctx.decode_splits = gpu_attention.decode_splits(num_decodes, kv.num_kv_heads, gpu.num_sms(dev))
        if prefills:
            tiles = gpu_attention.prefill_tiles([(start, end, token_seq[start]) for start, end, _, _ in prefills])
            ctx.prefill_tiles = torch.tensor(tiles, dtype=torch.int32, device=dev)
    return ctx


def attend(ctx: StepContext, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
           num_heads: int, window: int | None, scale: float) -> torch.Tensor:
    """Store k, v [T, kv_heads * D] in the cache (None: written already, by the fused rotary), then attend:
    q [T, heads * D] -> [T, heads * D]."""
    kv = ctx.kv
    if kv.triton:
        return _attend_triton(ctx, layer, q, k, v, num_heads, window, scale)
    ops = kernels.cpu_ops(q.device, q.dtype)
    if ops is not None and kernels.attention_fits(kv.head_dim, num_heads, kv.num_kv_heads):
        ops.write_kv(k, v, kv.k[layer], kv.v[layer], ctx.slot_mapping)
        return ops.paged_attention(q, kv.k[layer], kv.v[layer], ctx.block_tables, ctx.token_seq, ctx.token_pos,
                                   num_heads, window or 0, scale)
    return _attend_torch(ctx, layer, q, k, v, num_heads, window, scale)


def _attend_triton(ctx: StepContext, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                   num_heads: int, window: int | None, scale: float) -> torch.Tensor:
    from services.worker.engine.layers.gpu import attention as gpu_attention

    kv, total, nd = ctx.kv, q.shape[0], ctx.decode_lens.shape[0]
    if k is not None:
        kv.write(layer, ctx.slot_mapping, k.reshape(total, kv.num_kv_heads, -1), v.reshape(total, kv.num_kv_heads, -1))
    out = torch.empty((total, q.shape[1]), dtype=q.dtype, device=q.device)
    if nd:
        gpu_attention.decode(q[:nd], kv.k[layer], kv.v[layer], ctx.block_tables, ctx.decode_lens, num_heads, window,
                             scale, ctx.decode_splits, out=out[:nd])
    if ctx.prefill_tiles is not None:
        gpu_attention.prefill(q, kv.k[layer], kv.v[layer], ctx.block_tables, ctx.token_pos, ctx.prefill_tiles,
                              num_heads, window, scale, out)
    return out


def _attend_torch(ctx: StepContext, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                  window: int | None, scale: float) -> torch.Tensor:
    kv = ctx.kv
    total, dim = q.shape[0], kv.head_dim
    kv_heads = kv.num_kv_heads
    group = num_heads // kv_heads
    kt, vt = k.reshape(total, kv_heads, dim), v.reshape(total, kv_heads, dim)
    kv.write(layer, ctx.slot_mapping, kt, vt)
    qh = q.reshape(total, num_heads, dim).transpose(0, 1)  # [heads, T, D]
    out = torch.empty(total, num_heads, dim, dtype=q.dtype, device=q.device)
    for grp in ctx.groups():
        ids, length, mask = grp.view(window)
        s, n = grp.start, grp.count
        keys = kv.gather(layer, ids, "k").view(kv_heads, n, length, dim)
        vals = kv.gather(layer, ids, "v").view(kv_heads, n, length, dim)
        qd = qh[:, s : s + n].reshape(kv_heads, group, n, dim).transpose(1, 2)  # [kv_heads, seqs, group, dim]
        o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=mask, scale=scale)
        out[s : s + n] = o.permute(1, 0, 2, 3).reshape(n, num_heads, dim)
    for idx, chunk in enumerate(ctx.prefills(window)):
        s, e = chunk.start, chunk.end
        if chunk.context_start:
            n_keys = chunk.context_start + e - s - chunk.key_offset
            keys = kv.gather(layer, chunk.block_ids, "k")[:, :n_keys]
            vals = kv.gather(layer, chunk.block_ids, "v")[:, :n_keys]
        else:
            keys, vals = kt[s:e].transpose(0, 1), vt[s:e].transpose(0, 1)
        mask = ctx.prefill_mask(idx, window)
        o = F.scaled_dot_product_attention(qh[None, :, s:e], keys[None], vals[None], attn_mask=mask,
                                           is_causal=mask is None, scale=scale, enable_gqa=group > 1)
        out[s:e] = o[0].transpose(0, 1)
    return out.view(total, num_heads * dim)


current: StepContext | None = None  # the step in flight, for transformers' modules


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [1, heads, T, dim], key/value [1, kv_heads, T, dim]
    -> ([1, T, heads, dim], None)."""
    ctx = current
    if ctx is None:
        raise RuntimeError(f"{ATTN_NAME} attention runs only inside the paged engine's model runner")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    _, heads, total, dim = query.shape
    q = query[0].transpose(0, 1).reshape(total, heads * dim)
    k = key[0].transpose(0, 1).reshape(total, -1)
    v = value[0].transpose(0, 1).reshape(total, -1)
    scale = scaling if scaling is not None else dim**-0.5
    return attend(ctx, module.layer_idx, q, k, v, heads, window, scale).view(1, total, heads, dim), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention)
