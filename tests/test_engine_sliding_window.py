"""Paged engine on a tiny random Qwen2 (built here, no download) whose sliding window is shorter than the
sequences, against transformers' own sliding-window attention (eager) in model.generate.

Two layouts: "mixed" (first layer full attention, the rest sliding: every block is kept, each layer masks)
and "all-sliding" (every layer slides: blocks that leave the window are freed while the sequence runs)."""

from __future__ import annotations

import pytest
import torch
from engine_support import (
    assert_no_leaks,
    check_parity,
    one_thread,  # noqa: F401  (module fixture)
    params,
    reference_greedy,
    tokens_of,
)
from engine_support import (
    drive as drive_engine,
)

from services.worker.engine.types import Request

WINDOW = 12
MAX_NEW = 24

pytestmark = pytest.mark.usefixtures("one_thread")


class _Tok:
    """Just enough tokenizer for the detokenizer: ids as words."""

    eos_token_id = None

    def decode(self, ids, **_):
        return "".join(f" w{i}" for i in ids)


@pytest.fixture(scope="module", params=["mixed", "all-sliding"])
def qwen2(request):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    full_layers = 1 if request.param == "mixed" else 0
    cfg = Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_sliding_window=True, sliding_window=WINDOW, max_window_layers=full_layers,
                      initializer_range=0.3, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None,
                      pad_token_id=0)
    assert cfg.layer_types == ["full_attention"] * full_layers + ["sliding_attention"] * (3 - full_layers)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    lengths = [1, 3, 5, 8, 11, 12, 13, 17, 20, 25, 31, 40, 47, 55, 64, 70, 81, 90, 100, 120]
    return [torch.randint(1, 384, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def refs(qwen2, prompts):
    qwen2.set_attn_implementation("eager")
    return {str(i): r for i, r in enumerate(reference_greedy(qwen2, prompts, MAX_NEW))}


def engine(model, **kw):
    from services.worker.engine.engine import PagedEngine

    kw.setdefault("num_blocks", 400)
    return PagedEngine(model, _Tok(), block_size=kw.pop("block_size", 4), **kw)


def requests(prompts):
    return [Request(str(i), p, params(MAX_NEW)) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("scenario", ["alone", "together", "staggered", "prefix-hits", "preemption"])
def test_sliding_window_parity(qwen2, prompts, refs, scenario, capsys):
    assert max(len(p) for p in prompts) + MAX_NEW > 4 * WINDOW
    all_sliding = "full_attention" not in qwen2.config.layer_types
    held: list[int] = []

    def drive(eng, arrivals):  # also records the blocks each decoding sequence holds
        def on_step(_step, _events):
            held.extend(len(s.block_table) - s.num_freed_blocks for s in eng.scheduler.running
                        if s.num_computed_tokens >= s.num_prompt_tokens)
        return drive_engine(eng, arrivals, on_step=on_step)

    if scenario == "alone":
        eng = engine(qwen2, enable_prefix_caching=False)
        events = {}
        for req in requests(prompts):
            events.update(drive(eng, {0: [req]}))
    elif scenario == "together":
        eng = engine(qwen2, enable_prefix_caching=False)
        events = drive(eng, {0: requests(prompts)})
    elif scenario == "staggered":
        eng = engine(qwen2, enable_prefix_caching=False, max_num_batched_tokens=20)
        events = drive(eng, {i: [r] for i, r in enumerate(requests(prompts))})
    elif scenario == "prefix-hits":
        eng = engine(qwen2, num_blocks=512)
        drive(eng, {0: requests(prompts)})
        events = drive(eng, {i: [r] for i, r in enumerate(requests(prompts))})
        assert sum(evs[-1].cached_tokens for evs in events.values()) > 500
    else:
        eng = engine(qwen2, num_blocks=40, max_num_batched_tokens=64)
        events = drive(eng, {0: requests(prompts)})
        assert eng.stats().num_preemptions > 0
    assert_no_leaks(eng)
    bound = -(-WINDOW // 4) + 2
    if all_sliding:  # a decoding sequence holds the window's blocks, however long it grew
        assert max(held) <= bound
    else:
        assert max(held) > bound
    ties = check_parity(f"qwen2-sliding/{scenario}", {k: tokens_of(v) for k, v in events.items()}, refs)
    with capsys.disabled():
        kind = "all-sliding" if all_sliding else "mixed"
        print(f"\n[parity] qwen2 sliding window {WINDOW} ({kind}), {scenario}: {len(refs)} prompts, {ties} near tie(s)")


def test_window_matters(qwen2, prompts, refs):
    """The reference really depends on the window: full attention would give other tokens."""
    full = Qwen2ForCausalLM_full(qwen2)
    other = reference_greedy(full, prompts[-3:], MAX_NEW)
    assert any(o.tokens != refs[str(len(prompts) - 3 + i)].tokens for i, o in enumerate(other))


def Qwen2ForCausalLM_full(model):
    from transformers import Qwen2ForCausalLM

    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    cfg.use_sliding_window = False
    cfg.sliding_window = None
    full = Qwen2ForCausalLM(cfg).eval()
    full.load_state_dict(model.state_dict())
    full.generation_config.eos_token_id = None
    full.generation_config.pad_token_id = 0
    full.set_attn_implementation("eager")
    return full
