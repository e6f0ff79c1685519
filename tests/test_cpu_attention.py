"""The C++ paged attention (layers/csrc/attention.cpp) against plain softmax attention, and each token's
output bit for bit the same whatever tile, chunk or batch it is computed in."""

import pytest
import torch

from services.worker.engine.kv_cache import to_cpu_layout
from services.worker.engine.layers import kernels
from tests.engine_support import reference_attention

OPS = kernels.load()
pytestmark = pytest.mark.skipif(OPS is None, reason="no C++ kernels on this machine")


def paged_cache(contexts: list[torch.Tensor], kv_heads: int, head_dim: int, block_size: int):
    """K [kv_heads, blocks, D, BS] and V [kv_heads, blocks, BS, D] holding each sequence's K/V
    (contexts[s]: [2, L, kv_heads, D]) in shuffled blocks; every unused slot holds NaN."""
    need = [-(-c.shape[1] // block_size) for c in contexts]
    total = sum(need) + 3
    order = torch.randperm(total, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    k = torch.full((kv_heads, total, head_dim, block_size), float("nan"))
    v = torch.full((kv_heads, total, block_size, head_dim), float("nan"))
    tables = torch.zeros((len(contexts), max(need)), dtype=torch.int32)
    used = 0
    for s, c in enumerate(contexts):
        tables[s, : need[s]] = order[used : used + need[s]]
        used += need[s]
        for p in range(c.shape[1]):
            b, off = int(tables[s, p // block_size]), p % block_size
            k[:, b, :, off] = c[0, p]
            v[:, b, off, :] = c[1, p]
    return k, v, tables


BF16_DOT = OPS is not None and OPS.isa() == "avx512_bf16"  # a bfloat16 cache multiplies in bfloat16 here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim,window", [
    (16, 9, 3, 64, 0), (8, 8, 1, 48, 0), (4, 4, 4, 32, 5), (16, 14, 2, 64, 37)])
def test_matches_softmax_attention_and_is_tile_invariant(block_size, heads, kv_heads, head_dim, window, dtype):
    """float32: within float32 rounding of float64 softmax attention. bfloat16 (--kv-cache-dtype bfloat16): the
    same over the rounded K/V (and, where the CPU multiplies in bfloat16, a bfloat16 q), within p's rounding."""
    torch.manual_seed(0)
    lengths = [150, 23, 64]  # a prefill chunk of 100 tokens over a cached prefix of 50, two decodes
    contexts = [torch.randn(2, n, kv_heads, head_dim) for n in lengths]
    k32, v32, tables = paged_cache(contexts, kv_heads, head_dim, block_size)
    k, v = to_cpu_layout(k32, v32, dtype)
    seq = torch.tensor([0] * 100 + [1, 2], dtype=torch.int32)
    pos = torch.tensor([*range(50, 150), 22, 63], dtype=torch.int32)
    q = torch.randn(len(seq), heads * head_dim)
    scale = head_dim ** -0.5

    def attend(rows: slice) -> torch.Tensor:
        return OPS.paged_attention(q[rows], k, v, tables, seq[rows].contiguous(), pos[rows].contiguous(), heads,
                                   window, scale)

    together = attend(slice(None))
    assert not together.isnan().any()  # the NaN in unused slots never reaches a result
    # the reference reads the same cache through the Triton layout [blocks, kv_heads, block_size, D]
    kt, vt = k32.to(dtype).permute(1, 0, 3, 2).float(), v32.to(dtype).permute(1, 0, 2, 3).float()
    qr = q.bfloat16().float() if dtype == torch.bfloat16 and BF16_DOT else q
    ref = torch.cat([reference_attention(qr[t : t + 1], kt, vt, tables[int(seq[t])].tolist(), [int(pos[t])], heads,
                                         window, scale) for t in range(len(seq))])
    tol = 2e-5 if dtype == torch.float32 or not BF16_DOT else 4e-3  # p in bfloat16: 2^-9 relative each
    torch.testing.assert_close(together, ref.float(), rtol=tol, atol=tol)
    # the same tokens in other tiles: chunks of 7, one at a time, the decodes alone
    chunked = torch.cat([attend(slice(i, min(i + 7, 100))) for i in range(0, 100, 7)])
    assert torch.equal(chunked, together[:100])
    for t in (0, 1, 57, 99, 100, 101):
        assert torch.equal(attend(slice(t, t + 1)), together[t : t + 1]), t


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (8, 48)])
def test_half_cache_reads_as_its_float32_values(block_size, head_dim, dtype):
    """--kv-cache-dtype float16 / bfloat16: write_kv rounds each K/V value once (to nearest even) and the
    attention converts as it loads, so the cache gives bitwise the result of a float32 cache holding the
    rounded values (a block shorter than a vector included); except a bfloat16 cache where the CPU multiplies
    in bfloat16 (q and p rounded as well: the test above bounds that)."""
    torch.manual_seed(0)
    heads, kv_heads, n = 6, 2, 37
    k32 = torch.zeros(kv_heads, 6, head_dim, block_size)
    v32 = torch.zeros(kv_heads, 6, block_size, head_dim)
    k16, v16 = to_cpu_layout(k32, v32, dtype)
    kn, vn = torch.randn(n, kv_heads * head_dim) * 3, torch.randn(n, kv_heads * head_dim) * 3
    slots = torch.arange(n, dtype=torch.long) + block_size  # from block 1 on
    OPS.write_kv(kn.to(dtype).float(), vn.to(dtype).float(), k32, v32, slots)
    OPS.write_kv(kn, vn, k16, v16, slots)
    k_laid, v_laid = to_cpu_layout(k32, v32, dtype)  # exact: k32, v32 hold dtype's values
    assert torch.equal(k16, k_laid) and torch.equal(v16, v_laid)
    tables = torch.arange(1, 6, dtype=torch.int32).reshape(1, 5)
    seq, pos = torch.zeros(n, dtype=torch.int32), torch.arange(n, dtype=torch.int32)
    q = torch.randn(n, heads * head_dim)
    a16 = OPS.paged_attention(q, k16, v16, tables, seq, pos, heads, 0, head_dim ** -0.5)
    a32 = OPS.paged_attention(q, k32, v32, tables, seq, pos, heads, 0, head_dim ** -0.5)
    if dtype == torch.bfloat16 and BF16_DOT:  # q and p rounded too: close, not equal
        torch.testing.assert_close(a16, a32, rtol=0.05, atol=0.05)
        assert not torch.equal(a16, a32)
    else:
        assert torch.equal(a16, a32)


def test_step_tensors_are_build_contexts_tensors(monkeypatch):
    """build_context's one C++ call (step_tensors) gives the tensors its Python path builds: same values, dtypes
    and shapes, a mixed step of decodes and a prefill chunk; a position past its table is refused, not read."""
    from services.worker.engine import step
    from services.worker.engine.kv_cache import KVCache

    kv = KVCache(1, 1, 16, 12, 4, torch.float32, torch.device("cpu"))
    tables = [[3, 7, 1], [5], [2, 9, 4, 11]]
    pos, seq = [9, 2, 8, 9, 10, 11], [0, 1, 2, 2, 2, 2]
    ids = [101, 102, 103, 104, 105, 106]
    prefills = [(2, 6, 8, tables[2])]
    fields = ("input_ids", "positions", "slot_mapping", "token_seq", "token_pos", "block_tables")
    native = step.build_context(kv, pos, seq, tables, 2, prefills, ids)
    monkeypatch.setattr(step.kernels, "cpu_ops", lambda *_: None)
    python = step.build_context(kv, pos, seq, tables, 2, prefills, ids)
    for name in fields:
        a, b = getattr(native, name), getattr(python, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert native.slot_mapping.tolist() == [1 * 4 + 1, 5 * 4 + 2, 4 * 4, 4 * 4 + 1, 4 * 4 + 2, 4 * 4 + 3]
    assert step.build_context(kv, pos, seq, tables, 2, prefills).input_ids is None
    with pytest.raises(RuntimeError, match="has no block in its table"):
        OPS.step_tensors([1], [12], [0], [tables[0]], 4)
