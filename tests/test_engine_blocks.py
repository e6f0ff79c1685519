"""Block manager, scheduler and KV sizing on their own (no model): ref counts, prefix hashes, budgets."""

from __future__ import annotations

import pytest
import torch

from services.common.sampling import SamplingParams
from services.worker.engine.block_manager import BlockManager
from services.worker.engine.kv_cache import KVCache, parse_kv_memory
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.sequence import SeqStatus, Sequence


def seq(i: int, tokens: list[int], priority: int = 0) -> Sequence:
    return Sequence(f"s{i}", list(tokens), len(tokens), SamplingParams(), priority, i, 0.0)


def test_prefix_blocks_are_shared_ref_counted_and_evicted_lru():
    bm = BlockManager(8, 4)
    a = seq(1, list(range(10)))
    bm.admit(a, [], [], 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    a.num_computed_tokens = 10
    bm.register_full_blocks(a)
    assert len(a.block_hashes) == 2 and len(bm.cached) == 2
    b = seq(2, [*range(8), 99, 98, 97])  # shares the first two blocks
    hits, hashes = bm.match_prefix(b)
    assert hits == a.block_table[:2] and hashes == a.block_hashes
    bm.admit(b, hits, hashes, 11)
    assert b.num_computed_tokens == 8 and [bm.blocks[i].ref_count for i in hits] == [2, 2]
    assert bm.queries == 21 and bm.hits == 8
    bm.release(a)
    assert [bm.blocks[i].ref_count for i in hits] == [1, 1] and bm.num_free_blocks == 5 - 1 + 1
    bm.release(b)
    assert bm.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in bm.blocks)
    c = seq(3, list(range(9)))  # still cached after release (both blocks)
    assert bm.match_prefix(c)[0] == hits
    for i in range(4):  # taking fresh blocks evicts the least recently freed first
        d = seq(10 + i, [1000 + i] * 8)
        bm.admit(d, [], [], 8)
    assert bm.match_prefix(c)[0] == [] and len(bm.cached) < 2


def test_prefix_match_leaves_a_token_to_compute_and_checks_tokens():
    bm = BlockManager(8, 4)
    a = seq(1, list(range(8)))
    bm.admit(a, [], [], 8)
    a.num_computed_tokens = 8
    bm.register_full_blocks(a)
    assert len(bm.match_prefix(seq(2, list(range(8))))[0]) == 1  # the last token must be computed
    assert len(bm.match_prefix(seq(3, list(range(9))))[0]) == 2
    off = BlockManager(8, 4, enable_prefix_caching=False)
    assert off.match_prefix(seq(4, list(range(9)))) == ([], [])


def test_scheduler_budget_chunks_prefill_and_mixes_decodes():
    bm = BlockManager(64, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq(1, list(range(3))), seq(2, list(range(100, 125)))
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    assert [s.num_new_tokens for s in out.seqs] == [3, 7] and out.num_tokens == 10
    for s in out.seqs:
        s.num_computed_tokens += s.num_new_tokens
    a.token_ids.append(7)  # a sampled a token; b is mid-prefill
    out = sch.schedule()
    assert out.num_decodes == 1 and out.seqs[0] is a and out.seqs[1].num_new_tokens == 9


def test_scheduler_holds_new_prompts_while_others_decode():
    """max_waiting_steps: a prompt arriving while a sequence decodes waits that many steps (an idle scheduler
    admits at once; prompts that fill the step's budget go at once)."""
    bm = BlockManager(64, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16, max_waiting_steps=2)
    first = seq(1, list(range(3)))
    sch.add(first)
    assert sch.schedule().seqs == [first]  # nothing running: admitted at once

    def step(out):
        for s in out.seqs:
            s.num_computed_tokens += s.num_new_tokens
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(9)
        return out

    step(sch.schedule())
    late = seq(2, list(range(10, 14)))
    sch.add(late)
    held = [step(sch.schedule()).seqs for _ in range(3)]
    assert held[0] == [first] and held[1] == [first] and late in held[2]  # two steps held, then admitted
    big = seq(3, list(range(20, 40)))  # 20 prompt tokens: more than the step's budget left
    sch.add(big)
    assert big in step(sch.schedule()).seqs


def test_scheduler_preempts_newest_and_honours_priority():
    bm = BlockManager(4, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = seq(1, list(range(8))), seq(2, list(range(20, 27)))
    for s in (old, new):
        sch.add(s)
    out = sch.schedule()
    assert out.seqs == [old, new] or set(out.seqs) == {old, new}
    for s in out.seqs:
        s.num_computed_tokens += s.num_new_tokens
        s.token_ids.append(1)
    out = sch.schedule()  # old needs a third block: none free -> the newest is preempted
    assert out.preempted == [new] and new.status == SeqStatus.WAITING and new.num_computed_tokens == 0
    assert sch.num_preemptions == 1 and out.seqs == [old]
    urgent = seq(3, [5, 6], priority=-1)
    sch.add(urgent)
    assert sch.waiting[0] is urgent


def test_kv_memory_parsing_and_block_bytes():
    cpu = torch.device("cpu")
    assert parse_kv_memory("2GiB", cpu) == 2 * 2**30
    assert parse_kv_memory("512MB", cpu) == 512 * 10**6
    assert parse_kv_memory("123456", cpu) == 123456
    assert 0 < parse_kv_memory("0.01", cpu) < parse_kv_memory("0.02", cpu)
    with pytest.raises(ValueError):
        parse_kv_memory("lots", cpu)
    assert KVCache.bytes_per_block(30, 3, 64, 16, torch.float32) == 2 * 30 * 3 * 64 * 16 * 4
    kv = KVCache(2, 3, 8, 5, 4, torch.float32, cpu)
    # K blocks stored transposed; one scratch block past the pool (padded rows of captured decode steps)
    assert kv.k[0].shape == (3, 6, 8, 4) and kv.v[0].shape == (3, 6, 4, 8) and kv.scratch_block == 5
    assert torch.all(kv.k[1][:, 0] == 0) and torch.all(kv.v[1][:, 0] == 0)  # block 0 (padding) is zeroed
    triton = KVCache(2, 3, 8, 5, 4, torch.float32, cpu, triton=True)  # the Triton kernels' layout
    assert triton.k[0].shape == triton.v[0].shape == (6, 3, 4, 8)
    k, v = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    for cache in (kv, triton):  # one contract, either layout: write two tokens, read their blocks back
        cache.write(0, torch.tensor([5, 18]), k, v)
        keys = cache.gather(0, torch.tensor([1, 4]), "k")  # [kv_heads, 2 blocks * 4, head_dim]
        vals = cache.gather(0, torch.tensor([1, 4]), "v")
        assert torch.equal(keys[:, 1], k[0]) and torch.equal(keys[:, 6], k[1])
        assert torch.equal(vals[:, 1], v[0]) and torch.equal(vals[:, 6], v[1])
