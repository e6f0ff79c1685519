"""Owns the model and its KV pool: packs a scheduled step into one row, runs the forward, returns logits.

The model is tokenmill's DecoderModel (`--model-impl native`) or a transformers model whose attention
is our paged attention (`transformers`); both read the same StepContext and the same KV pool.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from services.worker.engine import attention
from services.worker.engine.kv_cache import KV_CACHE_DTYPES, KVCache, parse_kv_memory
from services.worker.engine.layers import gpu, kernels
from services.worker.engine.layers.linear import lm_head
from services.worker.engine.models import DecoderModel
from services.worker.engine.models.spec import ModelShape
from services.worker.engine.scheduler import SchedulerOutput
from services.worker.engine.sequence import Sequence
from services.worker.engine.step import StepContext, build_context

log = logging.getLogger("tokenmill.engine")


class ModelRunner:
    def __init__(self, model: Any, block_size: int, kv_cache_memory: str | int, num_blocks: int = 0,
                 kv_cache_dtype: str = "auto") -> None:
        self.model = model
        self.native = isinstance(model, DecoderModel)
        self.device = model.device if self.native else next(model.parameters()).device
        self.dtype = model.dtype if self.native else _compute_dtype(model)
        self.block_size = block_size
        self.shape = shape = ModelShape.from_config(model.config)
        self.prompt_rows: list[tuple[Sequence, int, int, int]] = []  # (seq, first row, rows, first position)
        self.prompt_logits: list[tuple[Sequence, int, torch.Tensor]] = []
        self.triton = gpu.applies(self.device)  # Triton kernels and their KV layout (CUDA)
        self.kv_dtype = self._kv_dtype(kv_cache_dtype)
        per_block = KVCache.bytes_per_block(shape.num_layers, shape.num_kv_heads, shape.head_dim, block_size,
                                            self.kv_dtype)
        if not num_blocks:
            budget = kv_cache_memory if isinstance(kv_cache_memory, int) else parse_kv_memory(kv_cache_memory,
                                                                                                 self.device)
            num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"--kv-cache-memory {kv_cache_memory!r} holds no {per_block}-byte KV block")
        self.graphs: Any = None  # DecodeGraphs, once enable_graphs ran
        self.graph_capture_s = 0.0
        self.kv = KVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim, num_blocks, block_size,
                          self.kv_dtype, self.device, self.triton)
        self.kv_bytes = num_blocks * per_block
        log.info("KV pool: %d blocks of %d tokens (%.1f MiB, %s); forward: %s", num_blocks, block_size,
                 self.kv_bytes / 2**20, self.kv_dtype, "native" if self.native else "transformers")
        if not self.native:
            attention.register()
            self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
            head = model.get_output_embeddings()
            # CPU: W @ h^T runs the vocabulary projection 1.3x (32 rows) to 3x (2-4 rows) faster than h @ W^T
            stationary = type(head) is torch.nn.Linear and head.bias is None and self.device.type == "cpu"
            self._head = lm_head(head.weight) if stationary else head

    def _kv_dtype(self, spec: str) -> torch.dtype:
        """--kv-cache-dtype: auto = the model's dtype; float16 / bfloat16 only where tokenmill's C++ attention
        reads the cache (it converts as it loads, or multiplies bfloat16 in bfloat16 on a CPU with avx512_bf16;
        the PyTorch and Triton paths read the model's dtype)."""
        if spec == "auto":
            return self.dtype
        if spec not in KV_CACHE_DTYPES:
            *names, last = KV_CACHE_DTYPES
            raise ValueError(f"--kv-cache-dtype {spec!r}: use {', '.join(names)} or {last}")
        shape = self.shape
        if self.triton or kernels.cpu_ops(self.device, self.dtype) is None or \
                not kernels.attention_fits(shape.head_dim, shape.num_heads, shape.num_kv_heads):
            raise ValueError(f"--kv-cache-dtype {spec} needs tokenmill's C++ attention (a CPU with its kernels, "
                             f"--dtype float32, head_dim a multiple of 16; here {self.device.type}, {self.dtype}, "
                             f"head_dim {shape.head_dim}): use --kv-cache-dtype auto")
        return getattr(torch, spec)

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    def enable_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool) -> None:
        """Decode-only steps through DecodeGraphs (tokenmill's forward on the Triton path); captured as CUDA
        graphs when `capture` and on CUDA, else run eagerly over the same padded buffers."""
        if not (self.native and self.triton):
            return
        from services.worker.engine.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.kv, max_num_seqs, -(-max_model_len // self.block_size),
                                   head=self.logits)
        if capture and self.device.type == "cuda":
            self.graph_capture_s = self.graphs.capture()

    def _lists(self, batch: SchedulerOutput) -> tuple[list[int], list[int], list[int], list[list[int]], list,
                                                      list[Sequence], list[int], int]:
        """The step as plain lists: ids, positions, each token's table row, tables, prefill chunks, the
        sequences that sample with their rows (decodes come first, longest context first; a sequence with
        drafted tokens samples 1 + len(spec_token_ids) rows, one per position to verify), and the decode count."""
        decodes = sorted(batch.seqs[: batch.num_decodes], key=lambda s: -s.num_computed_tokens)
        ids = [s.token_ids[s.num_computed_tokens] for s in decodes]
        pos = [s.num_computed_tokens for s in decodes]
        tables = [s.block_table for s in decodes]
        samplers = [s for s in decodes if s.samples_this_step]
        rows = [i for i, s in enumerate(decodes) if s.samples_this_step]
        token_seq = list(range(len(decodes)))
        prefills = []
        self.prompt_rows = []
        for seq in batch.seqs[batch.num_decodes :]:
            c, n, start = seq.num_computed_tokens, seq.num_new_tokens, len(ids)
            ids.extend(seq.step_token_ids(n))
            pos.extend(range(c, c + n))
            token_seq.extend([len(tables)] * n)
            tables.append(seq.block_table)
            prefills.append((start, start + n, c, seq.block_table))
            if seq.samples_this_step:
                samplers.append(seq)
                rows.extend(range(start + n - 1 - len(seq.spec_token_ids), start + n))
            if seq.wants_prompt_rows:  # position p's logits score prompt token p + 1 (echo / prompt logprobs)
                count = min(c + n, seq.num_prompt_tokens - 1) - c
                if count > 0:
                    self.prompt_rows.append((seq, start, count, c))
        return ids, pos, token_seq, tables, prefills, samplers, rows, len(decodes)

    def prepare(self, batch: SchedulerOutput) -> tuple[torch.Tensor, StepContext, list[Sequence], list[int]]:
        """Packed input ids, the step's attention metadata, and the sequences that sample this step with
        their rows in the packed batch."""
        ids, pos, token_seq, tables, prefills, samplers, rows, num_decodes = self._lists(batch)
        return *self._inputs(ids, pos, token_seq, tables, num_decodes, prefills), samplers, rows

    def _inputs(self, ids: list[int], pos: list[int], token_seq: list[int], tables: list[list[int]],
                num_decodes: int, prefills: list) -> tuple[torch.Tensor, StepContext]:
        ctx = build_context(self.kv, pos, token_seq, tables, num_decodes, prefills, ids)
        return ctx.input_ids, ctx

    def forward(self, input_ids: torch.Tensor, ctx: StepContext, num_layers: int | None = None) -> torch.Tensor:
        """[T] token ids -> [T, hidden] after the final norm (after the first num_layers layers: the draft)."""
        if self.native:
            return self.model(input_ids, ctx, num_layers)
        if self.model.config._attn_implementation != attention.ATTN_NAME:  # someone else may share the model
            self.model.set_attn_implementation(attention.ATTN_NAME)
        dec, ids, pos = self.decoder, input_ids[None], ctx.positions[None]
        attention.current = ctx
        try:
            if num_layers is None:
                return dec(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
            hidden = dec.embed_tokens(ids)
            rope = dec.rotary_emb(hidden, position_ids=pos)
            for layer in dec.layers[:num_layers]:
                hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=rope)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            return dec.norm(hidden)[0]
        finally:
            attention.current = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab]."""
        return self.model.compute_logits(hidden) if self.native else self._head(hidden)

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor | None]:
        """Forward one step; returns the sequences that sample now and their last-token logits (float32).
        Prefill rows of requests that asked for prompt logprobs go through the LM head too (only theirs):
        `prompt_logits` holds (sequence, first position, [count, vocab] logits) for each."""
        ids, pos, token_seq, tables, prefills, samplers, rows, num_decodes = self._lists(batch)
        graphs = self.graphs
        if graphs is not None and not prefills and graphs.bucket(num_decodes) is not None:
            logits = graphs.run(ids, pos, tables)  # forward and LM head, one graph replay
            self.prompt_logits = []
            if not rows:
                return samplers, None
            # a copy: the graph's output buffer is overwritten by the next replay
            return samplers, (logits if len(rows) == len(ids) else logits[rows]).to(torch.float32, copy=True)
        hidden = self.forward(*self._inputs(ids, pos, token_seq, tables, num_decodes, prefills))
        extra = [r for _, start, count, _ in self.prompt_rows for r in range(start, start + count)]
        self.prompt_logits = []
        if not rows and not extra:
            return samplers, None
        picked = rows + extra
        if len(picked) == hidden.shape[0] and picked == list(range(len(picked))):  # every row (pure decodes)
            logits = self.logits(hidden)
        else:
            logits = self.logits(hidden.index_select(0, torch.tensor(picked, dtype=torch.long, device=self.device)))
        if logits.dtype != torch.float32:
            logits = logits.float()
        if not extra:  # (no copy, no slice: each small torch call is 5-20 us of a decode step in cold caches)
            return samplers, logits
        at = len(rows)
        for seq, _, count, first in self.prompt_rows:
            self.prompt_logits.append((seq, first, logits[at : at + count]))
            at += count
        return samplers, logits[: len(rows)] if rows else None

    @torch.inference_mode()
    def draft(self, tokens: list[int], positions: list[int], tables: list[list[int]], num_layers: int
              ) -> torch.Tensor:
        """Self-speculative draft: one token per sequence through the first num_layers layers, the final
        norm and the LM head. Those layers' K/V are the target's own (same inputs, same weights), so the
        draft writes into the target's cache and the verifying pass rewrites the same values.
        Returns the greedy draft token of each sequence."""
        ctx = build_context(self.kv, positions, list(range(len(tokens))), tables, len(tokens), [], tokens)
        return self.logits(self.forward(ctx.input_ids, ctx, num_layers)).argmax(dim=-1)


def _compute_dtype(model: Any) -> torch.dtype:
    """The activations' dtype, read off the input embeddings: NF4 keeps packed uint8 linear weights, and
    config.dtype goes stale after model.to(dtype)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    if emb is not None and hasattr(emb, "dtype"):
        return emb.dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
