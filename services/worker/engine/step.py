"""A step's attention metadata: where each packed token's K/V goes and which cached blocks each sequence
attends over, built once per step by the model runner (build_context) and read by every layer's attention
(attention.py), the C++ decoder loop (layers/csrc/decoder.h's Step) and the CUDA graphs (cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.worker.engine.kv_cache import KVCache
from services.worker.engine.layers import gpu, kernels

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
    input_ids: torch.Tensor | None = None  # [T] int64, when build_context was given the ids
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
                  prefills: list[tuple[int, int, int, list[int]]], ids: list[int] | None = None) -> StepContext:
    """A step's metadata from plain lists: each packed token's position and sequence (an index into
    `tables`), the first num_decodes tokens being decodes, and the prefill chunks' (start, end, context
    start, table); with `ids`, the packed token ids as ctx.input_ids too."""
    bs, dev = kv.block_size, kv.device
    ops = kernels.cpu_ops(dev, torch.float32)
    if ops is not None:  # one C++ call: the same tensors from Python cost ~2x as much in a decode step
        input_ids, positions, slots, seq, token_pos, block_tables = ops.step_tensors(
            pos if ids is None else ids, pos, token_seq, tables, bs)  # (positions stand in for absent ids)
    else:
        slots = [tables[s][p // bs] * bs + p % bs for s, p in zip(token_seq, pos, strict=True)]
        width = max(len(t) for t in tables)
        input_ids = None if ids is None else torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        slots = torch.tensor(slots, dtype=torch.long, device=dev)
        seq, token_pos = (torch.tensor(x, dtype=torch.int32, device=dev) for x in (token_seq, pos))
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
    ctx = StepContext(kv, slots, positions, seq, token_pos, block_tables, pos[:num_decodes], tables[:num_decodes],
                      prefills, input_ids if ids is not None else None)
    if kv.triton:
        from services.worker.engine.layers.gpu import attention as gpu_attention

        ctx.decode_lens = torch.tensor([p + 1 for p in pos[:num_decodes]], dtype=torch.int32, device=dev)
        ctx.decode_splits = gpu_attention.decode_splits(num_decodes, kv.num_kv_heads, gpu.num_sms(dev))
        if prefills:
            tiles = gpu_attention.prefill_tiles([(start, end, token_seq[start]) for start, end, _, _ in prefills])
            ctx.prefill_tiles = torch.tensor(tiles, dtype=torch.int32, device=dev)
    return ctx
