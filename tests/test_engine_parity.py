"""Greedy parity of the paged engine with model.generate(do_sample=False) on the embedded model in fp32.

22 prompts of 1..~230 tokens: each alone, all together, staggered while others decode
(small token budget: chunked prefill mixed with decodes), with prefix-cache hits, and
across forced preemptions (tiny pool). The engine runs tokenmill's own forward (the default);
transformers' modules (`--model-impl transformers`) run the "together" scenario too.
Divergences are allowed only at near ties.
"""

from __future__ import annotations

import pytest
from engine_support import (
    assert_no_leaks,
    check_parity,
    drive,
    native,
    one_thread,  # noqa: F401  (module fixture)
    params,
    parity_prompts,
    reference_greedy,
    tokens_of,
)

from services.worker.engine.types import Request

MAX_NEW = 10
TIES: dict[str, int] = {}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(loaded) -> list[list[int]]:
    return parity_prompts(loaded.tokenizer)


@pytest.fixture(scope="module")
def refs(loaded, prompts):
    model = loaded.model
    model.set_attn_implementation("sdpa")
    got = reference_greedy(model, prompts, MAX_NEW)
    return {str(i): r for i, r in enumerate(got)}


@pytest.fixture(scope="module")
def model(loaded):
    return native(loaded.model)


def make_engine(loaded, model=None, **kw):
    from services.worker.engine.paged_engine import PagedEngine

    kw.setdefault("num_blocks", 512)
    return PagedEngine(model if model is not None else loaded.model, loaded.tokenizer,
                       block_size=kw.pop("block_size", 16), **kw)


def requests(prompts):
    return [Request(str(i), p, params(MAX_NEW)) for i, p in enumerate(prompts)]


def record(name, capsys, got, refs):
    ties = check_parity(name, got, refs)
    TIES[name] = ties
    with capsys.disabled():
        print(f"\n[parity] {name}: {len(refs)} prompts, {ties} near-tie divergence(s)")


def test_each_prompt_alone(loaded, model, prompts, refs, capsys):
    engine = make_engine(loaded, model, enable_prefix_caching=False)
    got = {}
    for req in requests(prompts):
        got[req.request_id] = tokens_of(drive(engine, {0: [req]})[req.request_id])
    assert_no_leaks(engine)
    record("alone", capsys, got, refs)


def test_all_together(loaded, model, prompts, refs, capsys):
    engine = make_engine(loaded, model, enable_prefix_caching=False, max_num_batched_tokens=4096)
    events = drive(engine, {0: requests(prompts)})
    assert max(ev.batch_size for evs in events.values() for ev in evs) == len(prompts)
    assert_no_leaks(engine)
    record("together", capsys, {k: tokens_of(v) for k, v in events.items()}, refs)


def test_staggered_with_chunked_prefill(loaded, model, prompts, refs, capsys):
    engine = make_engine(loaded, model, enable_prefix_caching=False, max_num_batched_tokens=48, block_size=8)
    reqs = requests(prompts)
    mixed = []
    events = drive(engine, {2 * i: [r] for i, r in enumerate(reqs)},
                   on_step=lambda step, evs: mixed.append(len(evs)))
    assert max(mixed) > 1
    assert_no_leaks(engine)
    record("staggered", capsys, {k: tokens_of(v) for k, v in events.items()}, refs)


def test_prefix_cache_hits(loaded, model, prompts, refs, capsys):
    engine = make_engine(loaded, model)
    first = drive(engine, {0: requests(prompts[:12])})  # warms the cache (chat prompts share a system prompt)
    reqs = requests(prompts)
    events = drive(engine, {i: [r] for i, r in enumerate(reqs)})
    cached = {rid: evs[-1].cached_tokens for rid, evs in events.items()}
    assert sum(1 for c in cached.values() if c > 0) >= 9, cached
    assert all(c % engine.block_size == 0 and c < len(prompts[int(rid)]) for rid, c in cached.items())
    s = engine.stats()
    assert s.prefix_cache_hits > 0 and s.prefix_cache_hit_rate > 0.2
    assert_no_leaks(engine)
    got = {k: tokens_of(v) for k, v in first.items()}
    record("prefix-warmup", capsys, got, {k: refs[k] for k in got})
    record("prefix-hits", capsys, {k: tokens_of(v) for k, v in events.items()}, refs)


def test_forced_preemption(loaded, model, prompts, refs, capsys):
    longest = max(len(p) for p in prompts) + MAX_NEW
    engine = make_engine(loaded, model, num_blocks=-(-longest // 8) + 4, block_size=8, max_num_batched_tokens=256)
    events = drive(engine, {0: requests(prompts)})
    assert engine.stats().num_preemptions > 0
    assert_no_leaks(engine)
    record("preemption", capsys, {k: tokens_of(v) for k, v in events.items()}, refs)


def test_transformers_modules_together(loaded, prompts, refs, capsys):
    engine = make_engine(loaded, enable_prefix_caching=False, max_num_batched_tokens=4096)
    assert not engine.runner.native
    events = drive(engine, {0: requests(prompts)})
    assert_no_leaks(engine)
    record("transformers-together", capsys, {k: tokens_of(v) for k, v in events.items()}, refs)


def test_tie_summary(capsys):
    with capsys.disabled():
        print(f"\n[parity] near ties per scenario: {TIES} (total {sum(TIES.values())})")
