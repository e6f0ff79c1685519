"""Owns the model and its KV pool: packs a scheduled step into one row, runs the forward, returns logits."""

from __future__ import annotations

import logging
from typing import Any

import torch

from services.worker.engine import attention
from services.worker.engine.attention import DecodeGroup, PrefillChunk, StepContext
from services.worker.engine.kv_cache import KVCache, kv_shape, model_window, parse_kv_memory
from services.worker.engine.scheduler import SchedulerOutput
from services.worker.engine.sequence import Sequence

log = logging.getLogger("tokenmill.engine")
MAX_DECODE_GROUPS = 6


class ModelRunner:
    def __init__(self, model: Any, block_size: int, kv_cache_memory: str | int, num_blocks: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self.dtype = _compute_dtype(model)
        self.num_layers, self.num_kv_heads, self.head_dim = kv_shape(model.config)
        self.window = model_window(model.config)  # set: blocks behind the window are freed
        per_block = KVCache.bytes_per_block(self.num_layers, self.num_kv_heads, self.head_dim, block_size, self.dtype)
        if not num_blocks:
            budget = kv_cache_memory if isinstance(kv_cache_memory, int) else parse_kv_memory(kv_cache_memory,
                                                                                                 self.device)
            num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"--kv-cache-memory {kv_cache_memory!r} holds no {per_block}-byte KV block")
        self.kv = KVCache(self.num_layers, self.num_kv_heads, self.head_dim, num_blocks, block_size, self.dtype,
                          self.device)
        self.kv_bytes = num_blocks * per_block
        log.info("KV pool: %d blocks of %d tokens (%.1f MiB, %s)", num_blocks, block_size, self.kv_bytes / 2**20,
                 self.dtype)
        attention.register()
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.lm_head = model.get_output_embeddings()
        head = self.lm_head
        # CPU: W @ h^T runs the vocabulary projection 1.3x (32 rows) to 3x (2-4 rows) faster than h @ W^T
        self._head_weight = head.weight if (type(head) is torch.nn.Linear and head.bias is None and
                                            self.device.type == "cpu") else None

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    def prepare(self, batch: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, StepContext, list[Sequence],
                                                       list[int]]:
        """Packed input ids and positions, the shared attention metadata, and the sequences that sample
        this step with their rows in the packed batch (decodes come first, longest context first; a
        sequence with drafted tokens samples 1 + len(spec_token_ids) rows, one per position to verify)."""
        bs, dev = self.block_size, self.device
        decodes = sorted(batch.seqs[: batch.num_decodes], key=lambda s: -s.num_computed_tokens)
        ids = [s.token_ids[s.num_computed_tokens] for s in decodes]
        pos = [s.num_computed_tokens for s in decodes]
        tables = [s.block_table for s in decodes]
        slots = self._slots(pos, tables)
        samplers = [s for s in decodes if s.samples_this_step]
        rows = [i for i, s in enumerate(decodes) if s.samples_this_step]
        groups = self._group_decodes(pos, tables)
        prefills: list[PrefillChunk] = []
        for seq in batch.seqs[batch.num_decodes :]:
            c, n = seq.num_computed_tokens, seq.num_new_tokens
            start = len(ids)
            ids.extend(seq.step_token_ids(n))
            positions = torch.arange(c, c + n)
            first = max(0, c - self.window + 1) // bs if self.window else 0  # earlier blocks may be freed
            table = torch.tensor(seq.block_table[first : -(-(c + n) // bs)], dtype=torch.long)
            slots.extend((table[positions // bs - first] * bs + positions % bs).tolist())
            pos.extend(range(c, c + n))
            prefills.append(PrefillChunk(start, start + n, c, table.to(dev) if c else None, positions.to(dev),
                                         first * bs))
            if seq.samples_this_step:
                samplers.append(seq)
                rows.extend(range(start + n - 1 - len(seq.spec_token_ids), start + n))
        ctx = StepContext(self.kv, torch.tensor(slots, dtype=torch.long, device=dev), num_decodes=len(decodes),
                          prefills=prefills, decode_groups=groups)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)[None]
        positions = torch.tensor(pos, dtype=torch.long, device=dev)[None]
        return input_ids, positions, ctx, samplers, rows

    def _slots(self, positions: list[int], tables: list[list[int]]) -> list[int]:
        """KV slot of one token per sequence, at `positions`."""
        bs = self.block_size
        return [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]

    def _group_decodes(self, positions: list[int], tables: list[list[int]]) -> list[DecodeGroup]:
        """Split decodes (one token each at `positions`, longest first) where padding to the group's
        longest would waste a quarter."""
        bs, groups = self.block_size, []
        start = 0
        for i in range(1, len(positions) + 1):
            if i < len(positions) and (len(groups) == MAX_DECODE_GROUPS - 1 or
                                       (positions[i] // bs + 1) * 4 >= (positions[start] // bs + 1) * 3):
                continue
            lens = [p + 1 for p in positions[start:i]]
            groups.append(DecodeGroup(start, i - start, lens, tables[start:i], bs, self.device))
            start = i
        return groups

    @torch.inference_mode()
    def draft(self, tokens: list[int], positions: list[int], tables: list[list[int]], num_layers: int
              ) -> torch.Tensor:
        """Self-speculative draft: one token per sequence through the first num_layers layers, the final
        norm and the LM head. Those layers' K/V are the target's own (same inputs, same weights), so the
        draft writes into the target's cache and the verifying pass rewrites the same values.
        Positions sorted longest first pad least. Returns the greedy draft token of each sequence."""
        dev = self.device
        ctx = StepContext(self.kv, torch.tensor(self._slots(positions, tables), dtype=torch.long, device=dev),
                          num_decodes=len(tokens), decode_groups=self._group_decodes(positions, tables))
        ids = torch.tensor([tokens], dtype=torch.long, device=dev)
        pos = torch.tensor([positions], dtype=torch.long, device=dev)
        self._use_paged_attention()
        dec = self.decoder
        attention.current = ctx
        try:
            hidden = dec.embed_tokens(ids)
            rope = dec.rotary_emb(hidden, position_ids=pos)
            for layer in dec.layers[:num_layers]:
                hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=rope)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        finally:
            attention.current = None
        return self.logits(dec.norm(hidden)[0]).argmax(dim=-1)

    def _use_paged_attention(self) -> None:
        if self.model.config._attn_implementation != attention.ATTN_NAME:  # someone else may share the model
            self.model.set_attn_implementation(attention.ATTN_NAME)

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor | None]:
        """Forward one step; returns the sequences that sample now and their last-token logits (float32)."""
        input_ids, positions, ctx, samplers, rows = self.prepare(batch)
        self._use_paged_attention()
        attention.current = ctx
        try:
            hidden = self.decoder(input_ids=input_ids, position_ids=positions, use_cache=False).last_hidden_state
        finally:
            attention.current = None
        if not rows:
            return samplers, None
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return samplers, self.logits(hidden[0].index_select(0, index)).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab]."""
        if self._head_weight is not None:
            return torch.mm(self._head_weight, hidden.t()).t()
        return self.lm_head(hidden)


def _compute_dtype(model: Any) -> torch.dtype:
    """The activations' dtype, read off the input embeddings: NF4 keeps packed uint8 linear weights, and
    config.dtype goes stale after model.to(dtype)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
