"""The C++ kernels' parallel loop (layers/csrc/parallel.cpp): every index exactly once at any thread count
(more threads than this machine's cores included: helpers then wait for the OS while the others take over
their share), nested loops serial, a chunk's error raised in the caller; and the kernels' results the same bits
at 1 and 3 threads, whichever thread ran which chunk."""

import pytest
import torch

from services.worker.engine.kv_cache import to_cpu_layout
from services.worker.engine.layers import kernels, quant
from services.worker.engine.layers.linear import Linear, set_activations
from tests.test_cpu_attention import paged_cache

OPS = kernels.load()
pytestmark = pytest.mark.skipif(OPS is None, reason="no C++ kernels on this machine")


@pytest.fixture
def set_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("n,grain", [(1, 1), (7, 1), (100, 3), (1000, 1), (3 * 4096 + 5, 4096)])
def test_every_index_once_at_any_thread_count(set_threads, n, grain):
    for threads in (1, 2, 3, 5, 2):
        set_threads(threads)
        for _ in range(3):
            assert OPS.parallel_cover(n, grain, -1).tolist() == [1] * n, f"{threads} threads"


def test_a_chunks_error_reaches_the_caller_and_the_loop_goes_on(set_threads):
    set_threads(3)
    with pytest.raises(RuntimeError, match="failing at index 500"):
        OPS.parallel_cover(1000, 1, 500)
    assert OPS.parallel_cover(1000, 1, -1).tolist() == [1] * 1000


def test_kernels_give_the_same_bits_at_any_thread_count(set_threads):
    torch.manual_seed(0)
    x = torch.randn(37, 256)
    layers = {}
    for fmt in ("q4_1", "q8_0"):
        for acts in ("fp32", "int8"):
            if acts == "int8" and kernels.matrix_unit() == "fp32":
                continue
            layers[fmt, acts] = layer = Linear(quant.quantize(torch.randn(200, 256) * 0.05, fmt), torch.randn(200))
            set_activations(layer, acts)
    lengths, kv_heads, heads, d, bs = [150, 23, 64], 3, 9, 64, 16
    k, v, tables = paged_cache([torch.randn(2, n, kv_heads, d) for n in lengths], kv_heads, d, bs)
    seq = torch.tensor([0] * 100 + [1, 2], dtype=torch.int32)
    pos = torch.tensor([*range(50, 150), 22, 63], dtype=torch.int32)
    q = torch.randn(len(seq), heads * d)
    gate_up = torch.randn(5, 2 * 4104)  # chunks of 4096 elements end inside rows
    norm = torch.rand(256)

    def run() -> dict:
        out = {key: layer(x) for key, layer in layers.items()}
        out["attention"] = OPS.paged_attention(q, k, v, tables, seq, pos, heads, 0, d ** -0.5)
        out["attention bfloat16"] = OPS.paged_attention(q, *to_cpu_layout(k, v, torch.bfloat16), tables, seq, pos,
                                                        heads, 0, d ** -0.5)
        out["silu_mul"] = OPS.silu_mul(gate_up)
        out["rms_norm"] = OPS.rms_norm(x, norm, 1e-6, None)
        return out

    set_threads(1)
    one = run()
    set_threads(3)
    for _ in range(3):
        for key, y in run().items():
            assert torch.equal(y, one[key]), key


def test_two_engines_over_one_model_decode_at_once_as_each_alone():
    """The C++ decoder reuses its activation buffers step to step; a forward that starts while another holds them
    (two engines over one model, stepping in two threads: the forward releases the GIL) takes buffers of its own,
    so each engine's tokens are those it makes alone."""
    import threading

    from engine_support import WordTokenizer, drive, native, tokens_of
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.common.sampling import SamplingParams
    from services.worker.engine.paged_engine import PagedEngine
    from services.worker.engine.types import Request

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
                      tie_word_embeddings=False, eos_token_id=None, bos_token_id=None)
    model = native(LlamaForCausalLM(cfg).eval())
    assert model._fused_decoder() is not None  # the C++ layer loop runs this model
    prompts = {"one": [[1, 2, 3]], "three": [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15]]}  # 1 and 3 rows a step

    def run(name: str) -> list[list[int]]:
        engine = PagedEngine(model, WordTokenizer(), block_size=16, num_blocks=64, enable_prefix_caching=False)
        reqs = [Request(f"{name}{i}", p, SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True))
                for i, p in enumerate(prompts[name])]
        events = drive(engine, {0: reqs})
        return [tokens_of(events[r.request_id]) for r in reqs]

    alone = {name: run(name) for name in prompts}
    together: dict[str, list[list[int]]] = {}
    threads = [threading.Thread(target=lambda n=name: together.__setitem__(n, run(n))) for name in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
