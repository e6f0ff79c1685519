"""tokenmill's own forward on tiny random models of each architecture it covers, built here (no download),
against transformers' model.generate in fp32, in every engine scenario:

- llama: tied embeddings, llama3 rope scaling;
- qwen2: QKV bias, sliding window on all but the first layer ("mixed": every block kept, each layer masks);
- qwen2-sliding: every layer slides (blocks that leave the window are freed while a sequence runs);
- qwen3: per-head q/k RMSNorm, explicit head_dim;
- mistral: sliding window on every layer.
Plus a model the native forward does not cover (Gemma), served by transformers' modules (`auto`).
"""

from __future__ import annotations

import pytest
import torch
from engine_support import (
    WordTokenizer,
    assert_no_leaks,
    check_parity,
    native,
    one_thread,  # noqa: F401  (module fixture)
    params,
    reference_greedy,
    tokens_of,
)
from engine_support import drive as drive_engine

from services.worker.engine.types import Request

WINDOW = 12
MAX_NEW = 24
VOCAB = 384
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, eos_token_id=None,
              bos_token_id=None, pad_token_id=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(**COMMON, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64})
        model = tf.LlamaForCausalLM(cfg)
    elif kind.startswith("qwen2"):
        full = 0 if kind == "qwen2-sliding" else 1
        cfg = tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=full,
                             tie_word_embeddings=False)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False)
        model = tf.Qwen3ForCausalLM(cfg)
    elif kind == "mistral":
        cfg = tf.MistralConfig(**COMMON, sliding_window=WINDOW, tie_word_embeddings=False)
        model = tf.MistralForCausalLM(cfg)
    else:
        cfg = tf.GemmaConfig(**COMMON, head_dim=16)
        model = tf.GemmaForCausalLM(cfg)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    lengths = [1, 3, 5, 8, 11, 12, 13, 17, 20, 25, 31, 40, 47, 55, 64, 70, 81, 90]
    out = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
    shared = torch.randint(1, VOCAB, (33,), generator=g).tolist()  # two prompts sharing full blocks
    return [*out, [*shared, 5, 6], [*shared, 7]]


ARCHS = ["llama", "qwen2", "qwen2-sliding", "qwen3", "mistral"]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, prompts):
    model = tiny(request.param)
    model.set_attn_implementation("eager")  # transformers' own sliding-window masks
    refs = {str(i): r for i, r in enumerate(reference_greedy(model, prompts, MAX_NEW))}
    return request.param, model, native(model), refs


def engine(model, **kw):
    from services.worker.engine.paged_engine import PagedEngine

    kw.setdefault("num_blocks", 400)
    return PagedEngine(model, WordTokenizer(), block_size=kw.pop("block_size", 4), **kw)


def requests(prompts):
    return [Request(str(i), p, params(MAX_NEW)) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("scenario", ["alone", "together", "staggered", "prefix-hits", "preemption"])
def test_native_parity(arch, prompts, scenario, capsys):
    kind, _, model, refs = arch
    held: list[int] = []

    def drive(eng, arrivals):  # also records the blocks each decoding sequence holds
        def on_step(_step, _events):
            held.extend(len(s.block_table) - s.num_freed_blocks for s in eng.scheduler.running
                        if s.num_computed_tokens >= s.num_prompt_tokens)
        return drive_engine(eng, arrivals, on_step=on_step)

    if scenario == "alone":
        eng = engine(model, enable_prefix_caching=False)
        events = {}
        for req in requests(prompts):
            events.update(drive(eng, {0: [req]}))
    elif scenario == "together":
        eng = engine(model, enable_prefix_caching=False)
        events = drive(eng, {0: requests(prompts)})
    elif scenario == "staggered":
        eng = engine(model, enable_prefix_caching=False, max_num_batched_tokens=20)
        events = drive(eng, {i: [r] for i, r in enumerate(requests(prompts))})
    elif scenario == "prefix-hits":
        eng = engine(model, num_blocks=512)
        drive(eng, {0: requests(prompts)})
        events = drive(eng, {i: [r] for i, r in enumerate(requests(prompts))})
        assert sum(evs[-1].cached_tokens for evs in events.values()) > 500
    else:
        eng = engine(model, num_blocks=40, max_num_batched_tokens=64)
        events = drive(eng, {0: requests(prompts)})
        assert eng.stats().num_preemptions > 0
    assert eng.runner.native
    assert_no_leaks(eng)
    if kind in ("qwen2-sliding", "mistral"):  # a decoding sequence holds the window's blocks, however long it grew
        assert max(held) <= -(-WINDOW // 4) + 2
    ties = check_parity(f"{kind}/{scenario}", {k: tokens_of(v) for k, v in events.items()}, refs)
    with capsys.disabled():
        print(f"\n[parity] native {kind}, {scenario}: {len(refs)} prompts, {ties} near tie(s)")


def test_window_matters(prompts):
    """The references really depend on the window: the same weights with full attention give other tokens."""
    model = tiny("qwen2-sliding")
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    cfg.use_sliding_window, cfg.sliding_window = False, None
    full = type(model)(cfg).eval()
    full.load_state_dict(model.state_dict())
    full.generation_config.eos_token_id, full.generation_config.pad_token_id = None, 0
    model.set_attn_implementation("eager")
    full.set_attn_implementation("eager")
    a, b = reference_greedy(model, prompts[-4:-2], MAX_NEW), reference_greedy(full, prompts[-4:-2], MAX_NEW)
    assert any(x.tokens != y.tokens for x, y in zip(a, b, strict=True))


def test_uncovered_architecture_runs_transformers_modules(prompts, capsys):
    from services.worker.engine.models import DecoderSpec, Unsupported

    model = tiny("gemma")
    with pytest.raises(Unsupported, match="gemma"):
        DecoderSpec.from_config(model.config)
    model.set_attn_implementation("sdpa")
    refs = {str(i): r for i, r in enumerate(reference_greedy(model, prompts, MAX_NEW))}
    eng = engine(model, max_num_batched_tokens=64)
    assert not eng.runner.native
    events = drive_engine(eng, {i: [r] for i, r in enumerate(requests(prompts))})
    assert_no_leaks(eng)
    ties = check_parity("gemma/transformers", {k: tokens_of(v) for k, v in events.items()}, refs)
    with capsys.disabled():
        print(f"\n[parity] transformers modules, gemma, staggered: {len(refs)} prompts, {ties} near tie(s)")


@pytest.mark.parametrize("kind", ARCHS)
def test_cpp_layer_loop_equals_the_python_loop(kind, prompts):
    """On a CPU in fp32 the decoder runs as one C++ call; the Python loop is its reference: same kernels, same
    order, so the same bits, for prefill chunks and decodes in one step."""
    from services.worker.engine.layers import kernels

    if kernels.load() is None:
        pytest.skip("no compiler here: only the Python loop exists")
    model = native(tiny(kind))
    eng = engine(model, max_num_batched_tokens=64)
    for i, p in enumerate(prompts[:3] + prompts[-5:]):
        eng.add_request(Request(str(i), p, params(8)))
    for _ in range(2):  # short prompts decoding, long ones still in (chunked) prefill
        eng.step()
    batch = eng.scheduler.schedule()
    assert batch.num_decodes and len(batch.seqs) > batch.num_decodes
    ids, ctx, _, _ = eng.runner.prepare(batch)
    with torch.inference_mode():
        fused = model(ids, ctx)
        model.use_fused = False
        python = model(ids, ctx)
    assert model._fused and torch.equal(fused, python)
