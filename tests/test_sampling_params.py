"""Penalties, filters and parallel sampling in the paged engine, on the embedded model in fp32.

Logit processors against transformers' own (RepetitionPenalty, MinP, MinNewTokens, NoBadWords) and OpenAI's
formulas on the same logits; greedy with repetition_penalty against model.generate token for token; n / best_of:
seeded samples equal alone and in other batches (and across preemption), the prompt's blocks held once by
reference count, cancel and finish free every fork.
"""

from __future__ import annotations

import pytest
import torch
from engine_support import (
    assert_no_leaks,
    check_parity,
    drive,
    native,
    one_thread,  # noqa: F401  (module fixture)
    params,
    reference_greedy,
    tokens_of,
)

from services.common.sampling import InvalidRequest, SamplingParams
from services.worker.engine.layers import kernels
from services.worker.engine.sampler import PenaltyState, Sampler, greedy, process_logits
from services.worker.engine.sequence import Sequence
from services.worker.engine.types import FINISH_CANCELLED, Request

pytestmark = pytest.mark.usefixtures("one_thread")

STORY = "Write a short story for children about a brave owl who learns to share."


@pytest.fixture(scope="module")
def model(loaded):
    return native(loaded.model)


def make_engine(loaded, model, **kw):
    from services.worker.engine.paged_engine import PagedEngine

    kw.setdefault("num_blocks", 512)
    return PagedEngine(model, loaded.tokenizer, block_size=kw.pop("block_size", 16), **kw)


def chat_ids(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


def seq_of(tokens: list[int], prompt_len: int, **kw) -> Sequence:
    s = Sequence("x", list(tokens), prompt_len, SamplingParams(**kw), 0, 0, 0.0, stop_ids=frozenset({2, 7}))
    s.penalties = PenaltyState(sorted(set(tokens[:prompt_len])) if s.params.repetition_penalty != 1 else [],
                               bad_words=kw.get("_bad", []))
    return s


# ---- logit processors against transformers' and OpenAI's definitions ----------------------------------
def test_greedy_argmax_kernel_equals_torch_argmax():
    """Greedy rows' C++ argmax: torch.argmax's index on ties (the first), NaN, infinities, any row length."""
    if kernels.load() is None:
        pytest.skip(f"no C++ kernels here ({kernels.cpu_capability()})")
    torch.manual_seed(0)
    for n in (49152, 49157, 7, 40):
        x = torch.randn(5, n)
        x[0, n // 3] = x[0, n // 2] = 100.0
        x[1, n - 1], x[2, 5], x[3] = float("inf"), float("nan"), float("-inf")
        x[4, n // 2] = x[4, 1] = float("nan")
        assert torch.equal(kernels.load().argmax_rows(x), x.argmax(dim=-1)), n
        assert torch.equal(greedy(x), x.argmax(dim=-1)), n


def test_processors_equal_transformers_and_openai_formulas():
    from transformers import (
        MinNewTokensLengthLogitsProcessor,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
    )

    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(4, vocab) * 3
    prompt = [3, 4, 5, 5, 9]
    outs = [[], [9, 11, 11, 12], [1, 1, 1, 30], [40, 41]]
    seqs = [seq_of(prompt + outs[0], 5, repetition_penalty=1.3, min_tokens=2),
            seq_of(prompt + outs[1], 5, repetition_penalty=0.7),
            seq_of(prompt + outs[2], 5, presence_penalty=0.5, frequency_penalty=0.8, logit_bias={3: 5.0, 49: -100.0}),
            seq_of(prompt + outs[3], 5, max_tokens=8, min_tokens=1)]
    seqs[3].params.bad_words = ("x",)
    seqs[3].penalties.bad_words = [[41, 42], [13], [40, 44]]
    got = logits.clone()
    process_logits(got, list(enumerate(seqs)))

    ids = [torch.tensor([prompt + o]) for o in outs]
    want0 = RepetitionPenaltyLogitsProcessor(1.3)(ids[0], logits[0:1].clone())
    want0 = MinNewTokensLengthLogitsProcessor(5, 2, [2, 7])(ids[0], want0)  # 0 of 2 generated: stops masked
    want1 = RepetitionPenaltyLogitsProcessor(0.7)(ids[1], logits[1:2].clone())
    assert torch.allclose(got[0:1], want0) and torch.allclose(got[1:2], want1)
    assert torch.equal(got[0].isinf(), torch.isin(torch.arange(vocab), torch.tensor([2, 7])))
    # OpenAI: logit - count * frequency - (count > 0) * presence, over generated tokens only; then the bias
    want2 = logits[2].clone()
    want2[3] += 5.0
    want2[49] -= 100.0
    for t, c in {1: 3, 30: 1}.items():
        want2[t] -= c * 0.8 + 0.5
    assert torch.allclose(got[2], want2)
    # bad words: [41, 42] masks 42 after 41; [13] always; [40, 44] not (the output ends with 41)
    want3 = logits[3].clone()
    want3[[42, 13]] = float("-inf")
    assert torch.equal(got[3], want3)  # min_tokens 1 already reached: stops free

    # min_p after temperature, as transformers' warpers do it (the kept set; top-k / top-p off)
    flat = torch.randn(1, vocab)
    for min_p, temp in ((0.1, 1.0), (0.3, 0.7), (0.05, 1.5)):
        s = seq_of([1, 2], 1, min_p=min_p, temperature=temp)
        probs = Sampler(0).distribution(flat, [s])
        want = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(temp)(None, flat.clone()))
        assert torch.equal(probs > 0, want.isfinite())
        assert 1 < int((probs > 0).sum()) < vocab


def test_top_k_top_p_keep_what_transformers_warpers_keep_and_the_race_samples_p():
    """Top-k / top-p look among each row's 256 likeliest tokens, then 4,096, and sort a row whole only where
    top-p's head is longer still: each way they keep what TopK -> TopP keep, with the same probabilities; the race
    picks token i with probability p_i."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    vocab = 8192
    peaked, flat = torch.randn(vocab) * 8, torch.randn(vocab) * 0.5  # heads of a few / of thousands of tokens
    # a batch whose heads fit 256 tokens, 4,096, or only the whole row; one whose top-k asks for 1,000
    for cases in ([(peaked, dict(temperature=0.8, top_p=0.9)), (flat, dict(temperature=1.0, top_p=0.3)),
                   (flat, dict(temperature=1.0, top_p=0.9)), (peaked, dict(temperature=1.3, top_k=20)),
                   (flat, dict(temperature=1.0))],
                  [(flat, dict(temperature=0.7, top_k=1000, top_p=0.95)), (flat, dict(temperature=1.0, top_p=0.9))]):
        seqs = [seq_of([1, 2], 1, **kw) for _, kw in cases]
        probs = Sampler(0).distribution(torch.stack([x for x, _ in cases]), seqs)
        for row, (x, kw) in zip(probs, cases, strict=True):
            want = TemperatureLogitsWarper(kw["temperature"])(None, x[None].clone())
            if "top_k" in kw:
                want = TopKLogitsWarper(kw["top_k"])(None, want)
            if "top_p" in kw:
                want = TopPLogitsWarper(kw["top_p"])(None, want)
            assert torch.equal(row > 0, want[0].isfinite()), kw
            assert torch.allclose(row / row.sum(), want[0].softmax(-1), atol=1e-6)

    p = torch.zeros(vocab)
    p[[5, 17, 300]] = torch.tensor([0.5, 0.3, 0.2])
    s = seq_of([1, 2], 1, temperature=1.0)
    s.generator = torch.Generator().manual_seed(1)
    picks = torch.stack([Sampler(0).race(p, s) for _ in range(4000)])
    assert torch.allclose(torch.bincount(picks, minlength=vocab)[[5, 17, 300]] / 4000.0,
                          torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


@pytest.mark.parametrize("field, value, fragment", [
    ("presence_penalty", 2.5, "presence_penalty must be in -2..2"),
    ("frequency_penalty", float("nan"), "frequency_penalty"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("min_p", 1.5, "min_p must be in [0, 1]"),
    ("logit_bias", {5: 101.0}, "logit_bias of token 5 must be in -100..100"),
    ("logit_bias", {-1: 1.0}, "non-negative"),
    ("min_tokens", 300, "must not exceed max_tokens"),
    ("bad_words", ("  ",), "bad_words"),
    ("n", 0, "n must be in 1..64"),
    ("best_of", 1, "best_of must be in n..64"),
])
def test_bad_values_are_refused_by_name(field, value, fragment):
    kw = {field: value}
    if field == "best_of":
        kw["n"] = 2
    with pytest.raises(InvalidRequest, match=None) as err:
        SamplingParams(**kw).validate()
    assert fragment in str(err.value)


# ---- through the engine --------------------------------------------------------------------------------
def test_greedy_repetition_penalty_equals_generate_in_any_batch(loaded, model):
    tok = loaded.tokenizer
    prompts = [chat_ids(tok, STORY), tok.encode("1, 2, 3, 4, 5, 6,"), chat_ids(tok, "List three colours.")]
    loaded.model.set_attn_implementation("sdpa")
    refs = {str(i): r for i, r in enumerate(reference_greedy(loaded.model, prompts, 16, repetition_penalty=1.3))}
    plain = reference_greedy(loaded.model, prompts[:1], 16)[0]
    engine = make_engine(loaded, model, enable_prefix_caching=False)
    reqs = [Request(str(i), p, params(16, repetition_penalty=1.3)) for i, p in enumerate(prompts)]
    events = drive(engine, {0: [*reqs[:2], Request("plain", prompts[0], params(16))], 3: reqs[2:]})
    check_parity("repetition_penalty", {k: tokens_of(v) for k, v in events.items() if k != "plain"}, refs)
    check_parity("beside penalties", {"plain": tokens_of(events["plain"])}, {"plain": plain})
    assert tokens_of(events["0"]) != tokens_of(events["plain"])  # the penalty changed the story
    assert_no_leaks(engine)


def test_min_tokens_logit_bias_bad_words(loaded, model):
    tok = loaded.tokenizer
    prompt = chat_ids(tok, "Say hello.")
    engine = make_engine(loaded, model)
    free = tokens_of(drive(engine, {0: [Request("free", prompt, params(60))]})["free"])
    assert len(free) < 60 and free[-1] == 2  # ends early with EOS
    word = tok.decode(free[:2]).strip().split()[0]
    bias_token = tok.encode(" owl", add_special_tokens=False)[0]
    least = len(free) + 10
    got = drive(engine, {0: [Request("min", prompt, params(least + 10, min_tokens=least)),
                             Request("bias", prompt, params(5, logit_bias={bias_token: 100.0})),
                             Request("bad", prompt, params(len(free), bad_words=(word,)))]})
    assert len(tokens_of(got["min"])) >= least and 2 not in tokens_of(got["min"])[:least]
    assert tokens_of(got["bias"]) == [bias_token] * 5
    bad_text = "".join(e.text for e in got["bad"])
    assert word not in bad_text and bad_text, (word, bad_text)
    assert_no_leaks(engine)


def _samples(events) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in events:
        out.setdefault(e.index, []).extend(e.token_ids)
    return out


def sampled(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, ignore_eos=True, **kw)


def test_n_seeded_samples_same_alone_in_batches_and_across_preemption(loaded, model):
    tok = loaded.tokenizer
    prompt = chat_ids(tok, STORY)  # 40-odd tokens: a partial last block, copied on write
    assert len(prompt) % 16
    req = lambda rid="n": Request(rid, prompt, sampled(12, n=4, seed=11))  # noqa: E731
    alone = _samples(drive(make_engine(loaded, model), {0: [req()]})["n"])
    assert sorted(alone) == [0, 1, 2, 3] and all(len(v) == 12 for v in alone.values())
    assert len({tuple(v) for v in alone.values()}) >= 3  # samples differ
    one = tokens_of(drive(make_engine(loaded, model), {0: [Request("1", prompt, sampled(12, seed=11))]})["1"])
    assert one == alone[0]  # sample i is seeded seed + i: sample 0 is the n = 1 output

    others = [Request(f"o{i}", chat_ids(tok, f"Tell me about the number {i}."), sampled(10, seed=i, n=2))
              for i in range(5)]
    engine = make_engine(loaded, model, max_num_batched_tokens=64)  # chunked prefill beside decodes
    batched = drive(engine, {0: others[:3], 2: [req()], 4: others[3:]})
    assert _samples(batched["n"]) == alone
    assert_no_leaks(engine)

    tiny = make_engine(loaded, model, num_blocks=12, max_num_batched_tokens=64)  # forces preemption of forks
    squeezed = drive(tiny, {0: [req(), Request("b", prompt[:30], sampled(12, seed=3, n=2))]})
    assert tiny.stats().num_preemptions > 0
    assert _samples(squeezed["n"]) == alone
    assert_no_leaks(tiny)


def test_n8_holds_the_prompt_blocks_once_and_cancel_frees_every_fork(loaded, model):
    tok = loaded.tokenizer
    text = " ".join(f"Sentence {i} of a long document about owls and foxes in the forest." for i in range(70))
    prompt = tok.encode(text)[:1000]
    engine = make_engine(loaded, model, max_num_batched_tokens=1024, enable_prefix_caching=True)
    bm = engine.block_manager
    engine.add_request(Request("n8", prompt, sampled(64, n=8, seed=1)))
    group = engine.seqs["n8"].group
    while not group.forked:  # the prompt's prefill: then the samples fork
        engine.step()
    for _ in range(3):  # their first decodes: the partial last block copied on write
        engine.step()
    assert group.forked and len(group.seqs) == 8
    full = len(prompt) // 16
    shared = group.seqs[0].block_table[:full]
    assert all(s.block_table[:full] == shared for s in group.seqs)  # the prompt's full blocks, once
    assert all(bm.blocks[b].ref_count == 8 for b in shared)
    own = [b for s in group.seqs for b in s.block_table[full:]]
    assert len(own) == len(set(own)) and all(bm.blocks[b].ref_count == 1 for b in own)  # each sample's own
    held = bm.num_blocks - bm.num_free_blocks
    assert held == full + len(own) <= full + 8 * 2  # vs 8 * 63 blocks for 8 separate prompts
    engine.abort_request("n8")
    assert_no_leaks(engine)

    finished: dict[str, int] = {}
    for i in range(100):  # 100 more such requests (full blocks from the prefix cache, tails of every length, one
        # or two tokens: finished at the fork or after a copy on write), some cancelled: nothing leaks
        engine.add_request(Request(f"r{i}", prompt[: len(prompt) - i % 16], sampled(1 + i % 2, n=8, seed=i)))
        if i % 3 == 0:
            for e in engine.step():
                finished[e.request_id] = finished.get(e.request_id, 0) + bool(e.finish_reason)
            engine.abort_request(f"r{i}")  # a one-token request may have finished in that step
    for e in (e for v in drive(engine, {}).values() for e in v):
        finished[e.request_id] = finished.get(e.request_id, 0) + bool(e.finish_reason)
    assert all(finished.get(f"r{i}", 0) == 8 for i in range(100) if i % 3), finished
    assert all(finished.get(f"r{i}", 0) in (0, 8) for i in range(0, 100, 3)), finished
    assert_no_leaks(engine)


def test_best_of_returns_the_n_highest_cumulative_logprob(loaded, model):
    prompt = chat_ids(loaded.tokenizer, STORY)
    engine = make_engine(loaded, model)
    every = drive(engine, {0: [Request("all", prompt, sampled(8, n=4, seed=5, logprobs=True))]})["all"]
    score = {}
    for e in every:
        score[e.index] = score.get(e.index, 0.0) + sum(lp.logprob for lp in e.logprobs)
    samples = _samples(every)
    ranked = sorted(score, key=lambda i: -score[i])[:2]
    best = drive(engine, {0: [Request("best", prompt, sampled(8, n=2, best_of=4, seed=5))]})["best"]
    assert [e.index for e in best] == [0, 1] and all(e.finish_reason for e in best)
    assert [e.token_ids for e in best] == [samples[i] for i in ranked]
    assert best[-1].completion_tokens == 4 * 8  # usage counts every sample
    assert_no_leaks(engine)


def test_cancelled_group_ends_once(loaded, model):
    """AsyncEngine: a cancelled n = 3 request ends with one cancelled event, its forks freed."""
    import asyncio

    from services.worker.engine.async_engine import AsyncEngine

    engine = make_engine(loaded, model)
    front = AsyncEngine(engine)

    async def run():
        got = []
        async for ev in front.generate([Request("c", chat_ids(loaded.tokenizer, STORY), sampled(200, n=3, seed=1))]):
            got.append(ev)
            if len(got) == 6:
                front.cancel(["c"])
        return got

    try:
        got = asyncio.run(run())
    finally:
        front.shutdown()
    assert got[-1].finish_reason == FINISH_CANCELLED and sum(1 for e in got if e.finish_reason) == 1
    assert {e.index for e in got[:-1]} == {0, 1, 2}
    assert_no_leaks(engine)
