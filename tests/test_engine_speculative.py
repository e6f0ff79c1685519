"""Speculative decoding in the paged engine.

Greedy parity with model.generate for the ngram and the self-speculative draft modes: every prompt alone,
all together (speculation forced on for the whole batch), with prefix-cache hits and across preemptions;
drafts must actually be proposed and accepted. Sampled mode: rejection sampling keeps the target's
distribution (two-sample chi-square tests, spec off vs on, on a tiny random model). No KV block leaks.
"""

from __future__ import annotations

import pytest
import torch
from engine_support import (
    WordTokenizer,
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

from services.common.sampling import SamplingParams
from services.worker.engine.speculative import SpecConfig, ngram_draft
from services.worker.engine.types import Request

MAX_NEW = 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(loaded):
    tok = loaded.tokenizer
    echo = tok.apply_chat_template([{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over "
                                     "the lazy dog, and the lazy dog sleeps in the sun."}],
                                   add_generation_prompt=True, tokenize=True, return_dict=False)
    return [*parity_prompts(tok), echo]


@pytest.fixture(scope="module")
def refs(loaded, prompts):
    loaded.model.set_attn_implementation("sdpa")
    return {str(i): r for i, r in enumerate(reference_greedy(loaded.model, prompts, MAX_NEW))}


_NATIVE: dict = {}


def make(loaded, mode, *, max_batch=4, **kw):
    """The engine over tokenmill's own forward (fp32, the embedded model's weights)."""
    from services.worker.engine.paged_engine import PagedEngine

    kw.setdefault("num_blocks", 512)
    if id(loaded) not in _NATIVE:
        _NATIVE.clear()
        _NATIVE[id(loaded)] = native(loaded.model)
    spec = SpecConfig(mode, num_tokens=4, draft_layers=8, max_batch=max_batch, min_acceptance=0.0,
                      token_cost=0.0)  # always draft
    return PagedEngine(_NATIVE[id(loaded)], loaded.tokenizer, block_size=kw.pop("block_size", 16), speculative=spec,
                       **kw)


def requests(prompts):
    return [Request(str(i), p, params(MAX_NEW)) for i, p in enumerate(prompts)]


def check(name, engine, got, refs, capsys):
    ties = check_parity(name, got, refs)
    s = engine.stats()
    assert s.spec_draft_tokens > 0 and s.spec_accepted_tokens > 0, (s.spec_draft_tokens, s.spec_accepted_tokens)
    assert_no_leaks(engine)
    with capsys.disabled():
        print(f"\n[spec] {name}: {len(got)} prompts, {ties} near tie(s), accepted {s.spec_accepted_tokens}/"
              f"{s.spec_draft_tokens} drafted")


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_greedy_parity_each_prompt_alone(loaded, prompts, refs, mode, capsys):
    engine = make(loaded, mode, enable_prefix_caching=False)
    got = {}
    for req in requests(prompts):
        got[req.request_id] = tokens_of(drive(engine, {0: [req]})[req.request_id])
    check(f"{mode}/alone", engine, got, refs, capsys)


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_greedy_parity_mixed_batch_staggered(loaded, prompts, refs, mode, capsys):
    engine = make(loaded, mode, max_batch=64, enable_prefix_caching=False, max_num_batched_tokens=256)
    events = drive(engine, {i: [r] for i, r in enumerate(requests(prompts))})
    check(f"{mode}/mixed", engine, {k: tokens_of(v) for k, v in events.items()}, refs, capsys)


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_greedy_parity_with_prefix_hits_and_preemption(loaded, prompts, refs, mode, capsys):
    engine = make(loaded, mode, max_batch=64)
    drive(engine, {0: requests(prompts[:12])})  # warm the prefix cache
    events = drive(engine, {i: [r] for i, r in enumerate(requests(prompts))})
    assert sum(1 for evs in events.values() if evs[-1].cached_tokens > 0) >= 9
    check(f"{mode}/prefix-hits", engine, {k: tokens_of(v) for k, v in events.items()}, refs, capsys)

    longest = max(len(p) for p in prompts) + MAX_NEW
    engine = make(loaded, mode, max_batch=64, num_blocks=-(-longest // 8) + 6, block_size=8,
                  max_num_batched_tokens=256)
    events = drive(engine, {0: requests(prompts)})
    assert engine.stats().num_preemptions > 0
    check(f"{mode}/preemption", engine, {k: tokens_of(v) for k, v in events.items()}, refs, capsys)


def test_speculation_is_off_while_the_batch_is_large(loaded, prompts):
    engine = make(loaded, "ngram", max_batch=2, enable_prefix_caching=False)
    drafted_while_large = []

    def watch(step, evs):
        if engine.stats().running > 2:
            drafted_while_large.append(engine.stats().spec_draft_tokens)

    lengths = [6, 8, 10, 12, 40, 40]  # two long ones are left decoding on their own at the end
    reqs = [Request(str(i), p, params(n, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts[:6], lengths, strict=True))]
    drive(engine, {0: reqs}, on_step=watch)
    assert drafted_while_large and len(set(drafted_while_large)) == 1  # no drafts while > 2 decode
    assert engine.stats().spec_draft_tokens > drafted_while_large[-1]  # ... and drafts once few are left
    assert_no_leaks(engine)


def test_a_sequence_whose_drafts_fail_stops_drafting_and_probes_again():
    from types import SimpleNamespace

    from services.worker.engine.sequence import Sequence
    from services.worker.engine.speculative import PROBE_EVERY, Speculator

    spec = Speculator(SpecConfig("ngram", num_tokens=4, token_cost=0.06), SimpleNamespace(num_layers=4),
                      max_model_len=1000)  # the cost the comments below compute with
    seq = Sequence("r", [1, 2, 3, 1, 2, 3, 1, 2], 8, params(100), 0, 1, 0.0)
    seq.num_computed_tokens = 7  # decoding: the last token is not in the cache yet
    spec.propose([seq])
    assert seq.spec_token_ids == [3, 1, 2]  # a fresh sequence drafts
    seq.spec_drafted, seq.spec_accepted = 30, 0  # then 1 / 32 = 0.03 < 0.06 (the floor with one decoding)
    proposals = []
    for _ in range(PROBE_EVERY):
        spec.propose([seq])
        proposals.append(bool(seq.spec_token_ids))
    assert proposals == [False] * (PROBE_EVERY - 1) + [True]  # idle, then one probe ...
    assert seq.spec_token_ids == [3]  # ... of a single token
    seq.spec_accepted = 6  # 7 / 32 = 0.22: drafting pays again with one decoding ...
    spec.propose([seq])
    assert seq.spec_token_ids
    crowd = []  # ... but not with 31 others decoding too (floor 0.06 * 32 / (1 + 0.06 * 32) = 0.66)
    for i in range(31):
        other = Sequence(str(i), [1, 2, 3, 1, 2, 3, 1, 2], 8, params(100), 0, 2 + i, 0.0)
        other.num_computed_tokens = 7
        crowd.append(other)
    spec.propose([seq, *crowd])
    assert not seq.spec_token_ids and not any(o.spec_token_ids for o in crowd)  # fresh ones start at 0.5 too
    seq.spec_accepted = 26  # 27 / 32 = 0.84: worth it even in a crowd
    spec.propose([seq, *crowd])
    assert seq.spec_token_ids == [3, 1, 2] and not any(o.spec_token_ids for o in crowd)


def test_ngram_draft_takes_the_latest_longest_match():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2, 3) == [7, 8]
    assert ngram_draft([5, 6, 7, 5], 3, 3) == [6, 7, 5]
    assert ngram_draft([1, 2, 3], 4, 3) == []
    assert ngram_draft([4, 4], 4, 3) == [4]


# ---- sampled: rejection sampling keeps the distribution ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=24, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.3, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def _sample_runs(model, mode: str, n: int, tokens: int) -> tuple[list[list[int]], object]:
    from services.worker.engine.paged_engine import PagedEngine

    spec = SpecConfig(mode, num_tokens=3, draft_layers=1, max_batch=10_000, min_acceptance=0.0, token_cost=0.0)
    engine = PagedEngine(native(model), WordTokenizer(), block_size=4, num_blocks=4096, max_num_seqs=256,
                         max_num_batched_tokens=4096, speculative=spec)
    prompt = [3, 7, 3, 7, 1, 3, 7, 3]
    reqs = [Request(f"s{i}", prompt, SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True))
            for i in range(n)]
    events = drive(engine, {0: reqs})
    assert_no_leaks(engine)
    return [tokens_of(events[r.request_id]) for r in reqs], engine.stats()


def _chi2_two_sample(a: list, b: list) -> tuple[float, int]:
    """Two-sample chi-square on categorical samples (bins with fewer than 10 in total pooled)."""
    keys = set(a) | set(b)
    ca, cb = {k: a.count(k) for k in keys}, {k: b.count(k) for k in keys}
    bins = [(ca[k], cb[k]) for k in keys if ca[k] + cb[k] >= 10]
    rest = (sum(ca[k] for k in keys if ca[k] + cb[k] < 10), sum(cb[k] for k in keys if ca[k] + cb[k] < 10))
    if sum(rest) >= 10:
        bins.append(rest)
    na, nb = len(a), len(b)
    stat = sum((x * (nb / na) ** 0.5 - y * (na / nb) ** 0.5) ** 2 / (x + y) for x, y in bins if x + y)
    return stat, len(bins) - 1


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_rejection_sampling_keeps_the_target_distribution(tiny, mode):
    """Over 3000 seeds each, the first four sampled tokens (and the joint of the first two) are distributed
    the same with speculation as without: every two-sample chi-square p-value > 0.001 (seeds are fixed, so
    the test is deterministic; at this tolerance a correct sampler fails one such check in a thousand)."""
    n, k = 3000, 4
    off, _ = _sample_runs(tiny, "off", n, k)
    on, stats = _sample_runs(tiny, mode, n, k)
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # both accept and reject paths ran
    columns = [[s[i] for s in off] for i in range(k)], [[s[i] for s in on] for i in range(k)]
    samples = [*zip(*columns, strict=True), ([tuple(s[:2]) for s in off], [tuple(s[:2]) for s in on])]
    for i, (a, b) in enumerate(samples):
        stat, df = _chi2_two_sample(a, b)
        p = float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))
        assert p > 1e-3, f"position {i}: chi2={stat:.1f} on {df} df, p={p:.2g}"
    assert any(a != b for a, b in zip(off, on, strict=True))  # speculation consumed randomness differently
