"""Paged engine behaviour on the embedded model as served by default (native forward, GGUF blocks): sampling
and seeds, batch-independent seeded sampling, stops, limits, leaks, rejection, priority."""

from __future__ import annotations

import asyncio

import pytest
from engine_support import (
    assert_no_leaks,
    drive,
    one_thread,  # noqa: F401  (module fixture)
    tokens_of,
)

from services.common.sampling import InvalidRequest, SamplingParams
from services.worker.engine.types import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Request

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chats(served):
    from services.judge.stories import sample_prompts

    tok = served.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for p in sample_prompts(8, seed=11)]


def make(served, **kw):
    from services.worker.engine.paged_engine import PagedEngine

    kw.setdefault("num_blocks", 256)
    return PagedEngine(served.model, served.tokenizer, **kw)


def sampled(n=12, **kw):
    return SamplingParams(max_tokens=n, temperature=kw.pop("temperature", 0.9), **kw)


def test_same_seed_same_output_different_seeds_differ(served, chats):
    engine = make(served)
    p = chats[0]
    alone = tokens_of(drive(engine, {0: [Request("a", p, sampled(seed=7, top_p=0.95, top_k=50))]})["a"])
    # the same seed again, now in a batch with other (seeded and unseeded) requests
    crowd = [Request("b", p, sampled(seed=7, top_p=0.95, top_k=50)), Request("c", p, sampled(seed=8))]
    crowd += [Request(f"x{i}", c, sampled()) for i, c in enumerate(chats[1:4])]
    events = drive(engine, {0: crowd})
    assert tokens_of(events["b"]) == alone
    others = [tokens_of(drive(engine, {0: [Request(f"s{s}", p, sampled(seed=s, top_p=0.95, top_k=50))]})[f"s{s}"])
              for s in (1, 2, 3)]
    assert sum(o != alone for o in others) >= 2, "different seeds should give different samples"
    assert_no_leaks(engine)


def test_seeded_sampling_does_not_depend_on_the_batch(served):
    """50 seeded prompts (temperature 0.8) alone, then inside batches of 8 and of 32: the same tokens."""
    from services.judge.stories import sample_prompts

    tok = served.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for p in sample_prompts(50, seed=5)]

    def reqs(tag):
        return [Request(f"{tag}{i}", p, sampled(8, temperature=0.8, seed=1000 + i)) for i, p in enumerate(prompts)]

    engine = make(served, max_num_seqs=64)
    alone = [tokens_of(drive(engine, {0: [r]})[r.request_id]) for r in reqs("a")]
    for size in (8, 32):
        batch = reqs(f"b{size}-")
        events = drive(engine, {k: batch[i : i + size] for k, i in enumerate(range(0, len(batch), size))})
        assert [tokens_of(events[r.request_id]) for r in batch] == alone, f"batches of {size}"
    assert len({tuple(a) for a in alone}) > 40  # really sampled, not one fixed answer
    assert_no_leaks(engine)


def test_top_k_one_is_greedy_and_text_matches_tokens(served, chats):
    engine = make(served)
    reqs = [Request("g", chats[1], SamplingParams(max_tokens=16, temperature=0.0)),
            Request("k", chats[1], SamplingParams(max_tokens=16, temperature=1.3, top_k=1, seed=3))]
    events = drive(engine, {0: reqs})
    assert tokens_of(events["g"]) == tokens_of(events["k"])
    text = "".join(ev.text for ev in events["g"])
    assert text == served.tokenizer.decode(tokens_of(events["g"]), skip_special_tokens=True)
    last = events["g"][-1]
    assert last.finish_reason == FINISH_LENGTH and last.completion_tokens == 16 == len(tokens_of(events["g"]))
    assert last.prompt_tokens == len(chats[1])


def test_stop_string_stop_token_and_eos(served, chats):
    engine = make(served)
    req = Request("r", chats[2], SamplingParams(max_tokens=20, temperature=0.0))
    greedy = tokens_of(drive(engine, {0: [req]})["r"])
    text = served.tokenizer.decode(greedy, skip_special_tokens=True)
    word = text.split()[3]
    events = drive(engine, {0: [
        Request("s", chats[2], SamplingParams(max_tokens=20, temperature=0.0, stop=(word,))),
        Request("t", chats[2], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(greedy[5],))),
        Request("e", chats[2], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(greedy[5],),
                                              ignore_eos=True)),
    ]})
    s_text = "".join(ev.text for ev in events["s"])
    assert events["s"][-1].finish_reason == FINISH_STOP and s_text == text[: text.index(word)]
    t = events["t"]
    assert t[-1].finish_reason == FINISH_STOP and tokens_of(t) == greedy[: greedy.index(greedy[5]) + 1]
    assert tokens_of(events["e"]) == tokens_of(t)  # ignore_eos does not ignore explicit stop tokens
    # the model's EOS ends a request (finish "stop", EOS kept in token_ids, not in text) unless ignore_eos
    tok = served.tokenizer
    q = tok.apply_chat_template([{"role": "user", "content": "What is 2+2? Answer with a number only."}],
                                add_generation_prompt=True, tokenize=True, return_dict=False)
    events = drive(engine, {0: [Request("eos", q, SamplingParams(max_tokens=24, temperature=0.0)),
                                Request("ign", q, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))]})
    eos_run = tokens_of(events["eos"])
    assert events["eos"][-1].finish_reason == FINISH_STOP and eos_run[-1] == tok.eos_token_id
    assert "4" in "".join(ev.text for ev in events["eos"]) and len(eos_run) < 24
    assert len(tokens_of(events["ign"])) == 24 and events["ign"][-1].finish_reason == FINISH_LENGTH
    assert_no_leaks(engine)


def test_requests_that_cannot_fit_are_rejected(served):
    engine = make(served, num_blocks=8, block_size=16)  # 128 tokens in the whole pool
    with pytest.raises(InvalidRequest, match="KV cache"):
        engine.add_request(Request("big", [5] * 200, SamplingParams(max_tokens=4)))
    with pytest.raises(InvalidRequest, match="max_tokens"):
        engine.add_request(Request("long", [5] * 100, SamplingParams(max_tokens=64)))
    with pytest.raises(InvalidRequest, match="vocabulary"):
        engine.add_request(Request("vocab", [10**7], SamplingParams(max_tokens=4)))
    with pytest.raises(InvalidRequest, match="context"):
        engine.add_request(Request("ctx", [5] * 8, SamplingParams(max_tokens=10**6)))
    engine.add_request(Request("ok", [5] * 100, SamplingParams(max_tokens=29, temperature=0.0)))
    with pytest.raises(InvalidRequest, match="already"):
        engine.add_request(Request("ok", [5] * 10, SamplingParams(max_tokens=4)))
    assert drive(engine, {})["ok"][-1].finish_reason is not None
    assert_no_leaks(engine)


def test_no_block_leaks_after_finish_cancel_and_preemption_mix(served, chats):
    engine = make(served, num_blocks=20, block_size=8, max_num_batched_tokens=40)  # tiny: forces preemption
    reqs = [Request(f"r{i}", c, SamplingParams(max_tokens=10 + 3 * i, temperature=0.0 if i % 2 else 0.8, seed=i))
            for i, c in enumerate(chats)]
    cancels = {4: "r7", 5: "r1", 9: "r3"}  # waiting, mid-prefill/decode, after preemptions

    def on_step(step, _):
        if step in cancels:
            assert engine.abort_request(cancels[step])
        s = engine.stats()
        assert 0 <= s.free_kv_blocks <= s.total_kv_blocks
        held = sum(len(q.block_table) for q in engine.scheduler.running)
        assert s.total_kv_blocks - s.free_kv_blocks <= held  # every used block belongs to a running sequence

    events = drive(engine, {0: reqs[:4], 3: reqs[4:]}, on_step=on_step)
    assert engine.stats().num_preemptions > 0
    assert not engine.abort_request("r7") and not engine.abort_request("nope")
    finished = {rid for rid, evs in events.items() if evs and evs[-1].finish_reason}
    assert finished == {f"r{i}" for i in range(8)} - set(cancels.values())
    assert_no_leaks(engine)


def test_priority_runs_first(served, chats):
    engine = make(served, max_num_seqs=1)
    order = []
    reqs = [Request("low", chats[0], SamplingParams(max_tokens=2, temperature=0.0), priority=5),
            Request("high", chats[1], SamplingParams(max_tokens=2, temperature=0.0), priority=-1),
            Request("mid", chats[2], SamplingParams(max_tokens=2, temperature=0.0))]
    drive(engine, {0: reqs}, on_step=lambda _, evs: order.extend(e.request_id for e in evs if e.finish_reason))
    assert order == ["high", "mid", "low"]


def test_async_engine_streams_and_cancels(served, chats):
    from services.worker.engine.async_engine import AsyncEngine

    engine = make(served)
    front = AsyncEngine(engine)

    async def main():
        got = {}
        reqs = [Request("a", chats[0], SamplingParams(max_tokens=6, temperature=0.0)),
                Request("b", chats[1], SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)),
                Request("c", [1] * 5000, SamplingParams(max_tokens=4))]
        async for ev in front.generate(reqs):
            got.setdefault(ev.request_id, []).append(ev)
            if ev.request_id == "a" and ev.finish_reason:
                assert front.cancel(["b"]) == 1
        return got

    try:
        got = asyncio.run(main())
    finally:
        front.shutdown()
    assert got["a"][-1].finish_reason == FINISH_LENGTH and len(tokens_of(got["a"])) == 6
    assert got["b"][-1].finish_reason == FINISH_CANCELLED and len(tokens_of(got["b"])) < 500
    assert got["c"][-1].error_code == "INVALID_ARGUMENT"
    assert_no_leaks(engine)
