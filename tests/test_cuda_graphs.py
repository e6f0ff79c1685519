"""The decode-graph runner and the engine's Triton path, on the CPU: bucket choice, padding, refills and stale
rows of DecodeGraphs (run eagerly over its static buffers, as a replay would), and greedy parity of the engine
on the Triton path under the interpreter. Capture and replay themselves run only on CUDA (bench.gpu)."""

from __future__ import annotations

import random

import pytest
import torch

from services.worker.engine import step
from services.worker.engine.cuda_graphs import buckets_for
from services.worker.engine.layers import gpu
from services.worker.engine.model_runner import ModelRunner
from services.worker.engine.models.builders import native_from_hf
from services.worker.engine.paged_engine import PagedEngine
from services.worker.engine.types import Request
from tests.engine_support import WordTokenizer, drive, params, reference_greedy, tokens_of

BLOCK = 16


def tiny_qwen(layers: int = 1):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def test_buckets():
    assert buckets_for(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets_for(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert buckets_for(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert buckets_for(1) == [1]


@pytest.fixture(scope="module")
def runner():
    with gpu.on_cpu():
        r = ModelRunner(native_from_hf(tiny_qwen()), BLOCK, 0, num_blocks=64)
        r.enable_graphs(max_num_seqs=16, max_model_len=256, capture=False)
        yield r


@torch.inference_mode()
def test_padded_buckets_match_unpadded_forward_and_leave_stale_rows_alone(runner):
    """Batches of 8, 5 (same bucket: rows 5..7 were real a step ago), 9 (crosses up to 16), 2 (down to 2):
    each equals the plain forward of the same decodes, and no padded row writes outside the scratch block."""
    with gpu.on_cpu():
        graphs, kv = runner.graphs, runner.kv
        assert kv.triton and graphs is not None
        rng = random.Random(0)
        seqs = []  # (table, position) of 9 sequences with distinct blocks
        for i in range(9):
            pos = rng.randrange(1, 60)
            seqs.append((list(range(i * 4, i * 4 + pos // BLOCK + 1)), pos))
        for layer in range(len(kv.k)):  # a filled cache: every block holds something to protect
            kv.k[layer].normal_()
            kv.v[layer].normal_()
        for n in (8, 5, 9, 2):
            tables, positions = [t for t, _ in seqs[:n]], [p for _, p in seqs[:n]]
            ids = [rng.randrange(256) for _ in range(n)]
            others = [b for t, _ in seqs[n:] for b in t]
            before = [kv.k[0][others].clone(), kv.v[0][others].clone()]
            got = graphs.run(ids, positions, tables)
            assert graphs.bucket(n) == next(b for b in graphs.buckets if b >= n)
            ctx = step.build_context(kv, positions, list(range(n)), tables, n, [])
            want = runner.logits(runner.forward(torch.tensor(ids), ctx))  # a replay gives logits
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert torch.equal(kv.k[0][others], before[0]) and torch.equal(kv.v[0][others], before[1]), (
                f"a padded row of the batch of {n} wrote into another sequence's blocks")
            b = graphs.bucket(n)
            assert (graphs.slots[n:b] == kv.scratch_slot).all() and (graphs.lens[n:b] == 1).all()
            assert (graphs.tables[n:b, 0] == kv.scratch_block).all()
        with pytest.raises(ValueError, match="exceed the largest"):
            graphs.fill([0] * 17, [0] * 17, [[0]] * 17)


def test_engine_on_triton_path_matches_generate():
    """fp32 greedy through the Triton kernels (interpreted) and the decode-graph buffers, prompts arriving
    while others decode (mixed prefill + decode steps, chunked prefill), vs model.generate alone."""
    model = tiny_qwen(layers=2)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (1, 7, 18, 40)]
    refs = reference_greedy(model, prompts, 6)
    with gpu.on_cpu():
        engine = PagedEngine(native_from_hf(model), WordTokenizer(), kv_cache_memory=2**20, max_num_batched_tokens=24,
                             max_num_seqs=4)
        assert engine.runner.kv.triton and engine.runner.graphs is not None
        events = drive(engine, {i: [Request(str(i), p, params(6, ignore_eos=True))] for i, p in enumerate(prompts)})
    for i, ref in enumerate(refs):
        assert tokens_of(events[str(i)]) == ref.tokens, f"prompt {i}"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
