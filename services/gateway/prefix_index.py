"""The gateway's picture of each worker's prefix cache: block hashes it was sent, least recently used first.

Hashes are the worker's own (services.common.prefix_hash, at the worker's block size), so a hash here names a
block the worker computed. The picture is approximate in one direction only: what the gateway sent is added at
dispatch (prompt) and at finish (prompt + output); what the worker drops is removed when its Load reports the
eviction, or by this LRU once a worker's share passes its bound (the smaller of --routing-index-blocks and the
worker's KV pool: a worker cannot cache more blocks than it has).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from services.gateway import metrics


class PrefixIndex:
    def __init__(self, max_blocks_per_worker: int) -> None:
        if max_blocks_per_worker < 1:
            raise ValueError("--routing-index-blocks must be at least 1")
        self.max_blocks = max_blocks_per_worker
        self._blocks: dict[str, OrderedDict[int, None]] = {}
        self._bounds: dict[str, int] = {}

    def __len__(self) -> int:
        return sum(len(b) for b in self._blocks.values())

    def size(self, worker: str) -> int:
        return len(self._blocks.get(worker, ()))

    def set_pool_size(self, worker: str, kv_blocks: int) -> None:
        """The worker's KV pool size in blocks (from its Load): its share of the index never exceeds it."""
        self._bounds[worker] = min(self.max_blocks, kv_blocks) if kv_blocks > 0 else self.max_blocks

    def match(self, worker: str, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` the worker holds (a chain breaks at its first missing block)."""
        blocks = self._blocks.get(worker)
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def add(self, worker: str, hashes: Sequence[int]) -> None:
        """The worker computed (or reused) these blocks now. They are touched last block first, so the chain's
        head ends most recent and is evicted last, as the worker frees a sequence's tail blocks first."""
        blocks = self._blocks.setdefault(worker, OrderedDict())
        for h in reversed(hashes):
            blocks[h] = None
            blocks.move_to_end(h)
        bound = self._bounds.get(worker, self.max_blocks)
        evicted = 0
        while len(blocks) > bound:
            blocks.popitem(last=False)
            evicted += 1
        if evicted:
            metrics.index_evictions.labels("lru").inc(evicted)
        metrics.index_blocks.labels(worker).set(len(blocks))

    def forget(self, worker: str, hashes: Iterable[int]) -> None:
        """The worker reported these blocks evicted from its cache."""
        blocks = self._blocks.get(worker)
        if not blocks:
            return
        before = len(blocks)
        for h in hashes:
            blocks.pop(h, None)
        metrics.index_evictions.labels("worker").inc(before - len(blocks))
        metrics.index_blocks.labels(worker).set(len(blocks))

    def drop(self, worker: str, cause: str = "down") -> None:
        """Forget everything about a worker (it died, restarted, or its eviction log outran us)."""
        blocks = self._blocks.pop(worker, None)
        if blocks:
            metrics.index_evictions.labels(cause).inc(len(blocks))
        metrics.index_blocks.labels(worker).set(0)
