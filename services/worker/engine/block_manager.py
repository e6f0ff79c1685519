"""Fixed-size KV blocks: ref counts, an LRU free list, and prefix caching by chained block hashes.

A full block is immutable and identified by hash(parent block's hash, its tokens),
so equal hashes mean equal prefixes up to and including that block. Freed blocks
keep their hash and stay findable until the free list hands them out again
(least recently freed first; a sequence's tail blocks are freed first).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.common.prefix_hash import NO_HASH, chain_hash
from services.worker.engine.sequence import Sequence

EVICTION_LOG = 8192  # evictions kept for gateways to read (Worker.Load); one that falls further behind resyncs
FREED = -1  # block-table entry of a block released because it left the sliding window


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = ()  # kept for full hashed blocks, to rule out hash collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion order = eviction order
        self.cached: dict[int, int] = {}  # hash -> block id
        self.queries = 0  # prompt tokens looked up
        self._touched = [False] * num_blocks
        self.fresh: list[int] = []  # blocks handed out for the first time: their memory is uninitialised
        self.copies: list[tuple[int, int]] = []  # (source, destination) blocks to copy before the next forward
        self.hits = 0  # of which found cached
        self.evictions: deque[tuple[int, int]] = deque(maxlen=EVICTION_LOG)  # (serial, hash) dropped from the cache
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Cached blocks (and their hashes) covering a prefix of seq; always leaves one token to compute."""
        if not self.enable_prefix_caching:
            return [], []
        bs, ids, parent = self.block_size, seq.token_ids, NO_HASH
        hits: list[int] = []
        hashes: list[int] = []
        for i in range((seq.num_tokens - 1) // bs):
            toks = tuple(ids[i * bs : (i + 1) * bs])
            h = chain_hash(parent, toks)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != toks:
                break
            hits.append(bid)
            hashes.append(h)
            parent = h
        return hits, hashes

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that became full of computed tokens so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            toks = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else NO_HASH, toks)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached and block.hash == NO_HASH:
                block.hash, block.token_ids = h, toks
                self.cached[h] = block.block_id

    # ---- allocation -------------------------------------------------------------
    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Room for a waiting sequence: fresh blocks for num_tokens beyond the hits, plus reviving free hits."""
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_needed(num_tokens) - len(hits) + revived <= len(self.free)

    def admit(self, seq: Sequence, hits: list[int], hashes: list[int], num_tokens: int) -> None:
        """Take the cached prefix blocks, then fresh blocks up to num_tokens; counts prefix-cache stats."""
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.block_hashes = list(hashes)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.queries += seq.num_tokens
        self.hits += seq.num_computed_tokens
        self.grow(seq, num_tokens)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) + self._shared_tail(seq) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        if self._shared_tail(seq):  # copy on write: the next token lands in a block other samples still hold
            i = seq.num_computed_tokens // self.block_size
            old, new = seq.block_table[i], self._take_free()
            self.copies.append((old, new))
            self._unref(old)
            seq.block_table[i] = new
        for _ in range(self.blocks_needed(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take_free())

    def _shared_tail(self, seq: Sequence) -> bool:
        """The block the sequence writes next is partly filled and shared with a forked sample."""
        i = seq.num_computed_tokens // self.block_size
        return i < len(seq.block_table) and seq.block_table[i] != FREED and \
            self.blocks[seq.block_table[i]].ref_count > 1

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child holds every block of parent by reference (parallel sampling); a shared partial block is
        copied by whichever of them writes into it first (grow)."""
        for bid in parent.block_table:
            if bid != FREED:
                self.blocks[bid].ref_count += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_freed_blocks = parent.num_freed_blocks

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the tail blocks past num_tokens (rejected drafted tokens); they were never hashed."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            self._unref(seq.block_table.pop())

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; blocks whose count reaches zero go to the free list, tail first."""
        for bid in reversed(seq.block_table):
            if bid != FREED:
                self._unref(bid)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = seq.num_freed_blocks = 0

    def release_before(self, seq: Sequence, first_needed: int) -> None:
        """Sliding-window models: drop the leading blocks no future query can attend to (they keep their
        hash, so a later prompt with the same prefix still finds them until they are reused)."""
        for i in range(seq.num_freed_blocks, min(first_needed, len(seq.block_table))):
            self._unref(seq.block_table[i])
            seq.block_table[i] = FREED
            seq.num_freed_blocks = i + 1

    def _unref(self, bid: int) -> None:
        block = self.blocks[bid]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[bid] = None

    def _take_free(self) -> int:
        bid = next(iter(self.free))
        del self.free[bid]
        block = self.blocks[bid]
        if block.hash != NO_HASH:  # evict it from the prefix cache
            if self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
                self.num_evictions += 1
                self.evictions.append((self.num_evictions, block.hash))
            block.hash, block.token_ids = NO_HASH, ()
        block.ref_count = 1
        if not self._touched[bid]:
            self._touched[bid] = True
            self.fresh.append(bid)
        return bid
