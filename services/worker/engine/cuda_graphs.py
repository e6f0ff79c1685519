"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (as vLLM captures them).

A decode-only step of n sequences runs in the smallest bucket b >= n: the step's token ids, positions, cache
slots, context lengths and block tables are copied into static buffers (one host-to-device copy each), rows
n..b are padding (token 0 at position 0, one key, writing its K/V to the cache's scratch block), and the
graph captured for b replays the whole forward and the LM head with one launch. Everything but capture and replay is
device-agnostic: on a CPU, or with `--enforce-eager`, `run` executes the same forward eagerly over the same
padded buffers, which is what the CPU tests check (bucket choice, padding, refills, stale rows).

Decode-only steps are the common case of a busy server; steps with prefill chunks, drafted tokens or
prompt logprobs run eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from services.worker.engine.kv_cache import KVCache
from services.worker.engine.layers import gpu
from services.worker.engine.step import StepContext

log = logging.getLogger("tokenmill.engine")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def buckets_for(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... 256 up to max_num_seqs, and max_num_seqs itself as the last bucket."""
    out = [b for b in BUCKETS if b < max_num_seqs]
    return [*out, max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: Any, kv: KVCache, max_num_seqs: int, max_blocks_per_seq: int,
                 head: Any = None) -> None:
        self.model, self.kv = model, kv
        self.head = head or (lambda hidden: hidden)  # hidden states -> logits (the model's LM head)
        self.buckets = buckets_for(max_num_seqs)
        size, dev = self.buckets[-1], kv.device
        self.max_blocks = max_blocks_per_seq
        self.input_ids = torch.zeros(size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(size, dtype=torch.long, device=dev)
        self.slots = torch.full((size,), kv.scratch_slot, dtype=torch.long, device=dev)
        self.lens = torch.ones(size, dtype=torch.int32, device=dev)
        self.tables = torch.full((size, max_blocks_per_seq), kv.scratch_block, dtype=torch.int32, device=dev)
        self.rows = torch.arange(size, dtype=torch.int32, device=dev)  # decode i is table row i
        pin = dev.type == "cuda"  # page-locked staging: the copies to the device are asynchronous
        self._stage = {name: torch.zeros(t.shape, dtype=t.dtype, pin_memory=pin) for name, t in (
            ("ids", self.input_ids), ("pos", self.positions), ("slots", self.slots), ("lens", self.lens),
            ("tables", self.tables))}
        self._np = {name: t.numpy() for name, t in self._stage.items()}
        self.contexts = {b: self._context(b) for b in self.buckets}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0

    def _context(self, b: int) -> StepContext:
        from services.worker.engine.layers.gpu import attention as gpu_attention

        kv = self.kv
        # token_pos is read by the prefill and CPU kernels only; the host lists serve the PyTorch path only
        return StepContext(kv, self.slots[:b], self.positions[:b], self.rows[:b], self.positions[:b], self.tables[:b],
                           [], [], [], decode_lens=self.lens[:b],
                           decode_splits=gpu_attention.decode_splits(b, kv.num_kv_heads, gpu.num_sms(kv.device)))

    def bucket(self, n: int) -> int | None:
        """The smallest bucket that holds n decodes, or None when n is larger than every bucket."""
        return next((b for b in self.buckets if b >= n), None)

    def fill(self, ids: list[int], positions: list[int], tables: list[list[int]], bucket: int | None = None) -> int:
        """Stage the step's n decodes and pad to their bucket (or `bucket`); returns the bucket."""
        n = len(ids)
        b = bucket or self.bucket(n)
        if b is None:
            raise ValueError(f"{n} decodes exceed the largest CUDA-graph bucket {self.buckets[-1]}")
        bs, kv, st = self.kv.block_size, self.kv, self._np
        width = max((len(t) for t in tables), default=1)
        if width > self.max_blocks:
            raise ValueError(f"a sequence holds {width} blocks; the graphs' tables have {self.max_blocks}")
        st["ids"][:n] = ids
        st["ids"][n:b] = 0
        st["pos"][:n] = positions
        st["pos"][n:b] = 0
        st["lens"][:n] = np.asarray(positions) + 1
        st["lens"][n:b] = 1
        for i, (t, p) in enumerate(zip(tables, positions, strict=True)):
            st["tables"][i, : len(t)] = t
            st["slots"][i] = t[p // bs] * bs + p % bs
        st["slots"][n:b] = kv.scratch_slot  # padding writes its K/V to the scratch block, reads one key there
        st["tables"][n:b, 0] = kv.scratch_block
        stage = self._stage
        for name, dst in (("ids", self.input_ids), ("pos", self.positions), ("slots", self.slots),
                          ("lens", self.lens)):
            dst[:b].copy_(stage[name][:b], non_blocking=True)
        self.tables[:b, :width].copy_(stage["tables"][:b, :width], non_blocking=True)
        return b

    def forward(self, b: int) -> torch.Tensor:
        """The bucket's step over the static buffers, eagerly: what its graph captures."""
        return self.head(self.model(self.input_ids[:b], self.contexts[b]))

    def run(self, ids: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits [n, vocab] of n decodes (one token each): a graph replay where one is captured, else the same
        forward eagerly over the padded buffers."""
        b = self.fill(ids, positions, tables)
        graph = self.graphs.get(b)
        if graph is None:
            return self.forward(b)[: len(ids)]
        graph.replay()
        self.replays += 1
        return self.outputs[b][: len(ids)]

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket's graph (largest first, sharing one memory pool); returns the seconds taken."""
        if self.kv.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for b in reversed(self.buckets):
            self.fill([], [], [], bucket=b)  # all rows padding: the capture writes only the scratch block
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the Triton kernels and settle the allocator before capturing
                    self.forward(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        log.info("captured %d CUDA graphs for decode batches %s in %.1f s", len(self.graphs), self.buckets, seconds)
        return seconds
