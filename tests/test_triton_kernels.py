"""tokenmill's Triton kernels under Triton's interpreter, against PyTorch references (float64 where the
kernel is fp32). Nothing here needs a GPU; the same kernels are measured on one by `python -m bench.gpu`."""

from __future__ import annotations

import random

import pytest
import torch

from services.worker.engine.layers import gpu, ops
from services.worker.engine.layers.quant import quantize
from tests.engine_support import reference_attention

gpu.interpret()  # before the kernel modules are imported: triton.jit reads the switch when it wraps them

from services.worker.engine.layers.gpu import attention as A  # noqa: E402
from services.worker.engine.layers.gpu import elementwise as E  # noqa: E402
from services.worker.engine.layers.gpu import quant as Q  # noqa: E402

FP32_TOL = 1e-5
BF16_TOL = 3e-2  # relative to the output's scale: a few bf16 roundings of the inputs and the result


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not got.isnan().any(), "NaN in the kernel's output"
    err = (got.double() - ref).abs().max().item()
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL * max(1.0, ref.abs().max().item())
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


def paged_cache(num_blocks, kv_heads, block_size, head_dim, dtype):
    k = torch.randn(num_blocks, kv_heads, block_size, head_dim).to(dtype)
    return k, torch.randn_like(k)


def tables_for(lengths, block_size, num_blocks, rng):
    """A ragged table per sequence, blocks drawn without replacement from the pool, padded to one width."""
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables, at = [], 0
    for n in lengths:
        need = -(-n // block_size)
        tables.append(pool[at : at + need])
        at += need
    width = max(len(t) for t in tables)
    return tables, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


# block size, GQA ratio (query heads per KV head), head dim, sliding window, dtype, context splits
DECODE_CASES = [
    (16, 1, 64, None, torch.float32, 1),
    (16, 2, 128, None, torch.float32, 4),
    (32, 4, 64, 20, torch.float32, 2),
    (16, 7, 64, None, torch.float32, 8),
    (32, 2, 128, 40, torch.bfloat16, 4),
    (16, 4, 64, None, torch.bfloat16, 1),
]


@pytest.mark.parametrize(("block_size", "group", "head_dim", "window", "dtype", "splits"), DECODE_CASES)
def test_decode_attention_matches_reference(block_size, group, head_dim, window, dtype, splits):
    torch.manual_seed(block_size + group + head_dim)
    rng = random.Random(group)
    kv_heads, num_blocks = 2, 48
    heads = kv_heads * group
    k_cache, v_cache = paged_cache(num_blocks, kv_heads, block_size, head_dim, dtype)
    # one key, a block exactly full, one past it, several blocks, ragged
    lengths = [1, block_size, block_size + 1, 3 * block_size, 2 * block_size + 7]
    tables, tab = tables_for(lengths, block_size, num_blocks, rng)
    q = torch.randn(len(lengths), heads * head_dim).to(dtype)
    out = torch.full_like(q, float("nan"))
    A.decode(q, k_cache, v_cache, tab, torch.tensor(lengths, dtype=torch.int32), heads, window, head_dim**-0.5,
             splits, out=out)
    ref = torch.cat([reference_attention(q[i : i + 1], k_cache, v_cache, tables[i], [n - 1], heads, window,
                                         head_dim**-0.5) for i, n in enumerate(lengths)])
    close(out, ref, dtype)


@pytest.mark.parametrize(("block_size", "group", "head_dim", "window", "dtype"), [
    (16, 2, 64, None, torch.float32), (32, 4, 128, 24, torch.float32), (16, 1, 64, None, torch.bfloat16)])
def test_prefill_attention_matches_reference(block_size, group, head_dim, window, dtype):
    """Chunks with and without a cached prefix (their own K/V already in the cache), longer than a tile."""
    torch.manual_seed(group)
    rng = random.Random(block_size)
    kv_heads, num_blocks = 2, 64
    heads = kv_heads * group
    k_cache, v_cache = paged_cache(num_blocks, kv_heads, block_size, head_dim, dtype)
    chunks = [(0, 5, 37), (5, 75, 0), (75, 78, block_size)]  # (start, end, cached prefix) in the packed row
    tables, tab = tables_for([c + e - s for s, e, c in chunks], block_size, num_blocks, rng)
    positions = torch.cat([torch.arange(c, c + e - s) for s, e, c in chunks]).to(torch.int32)
    tiles = torch.tensor(A.prefill_tiles([(s, e, row) for row, (s, e, _) in enumerate(chunks)]), dtype=torch.int32)
    q = torch.randn(78, heads * head_dim).to(dtype)
    out = torch.full_like(q, float("nan"))
    A.prefill(q, k_cache, v_cache, tab, positions, tiles, heads, window, head_dim**-0.5, out)
    ref = torch.cat([reference_attention(q[s:e], k_cache, v_cache, tables[row], positions[s:e].tolist(), heads,
                                         window, head_dim**-0.5) for row, (s, e, _) in enumerate(chunks)])
    close(out, ref, dtype)


@pytest.mark.parametrize("fmt", ["int4", "q4_1", "nf4", "int8", "q8_0", "int4/128"])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_quantized_matmul_matches_dequantized(fmt, rows):
    """GEMV (1 row, split over K), tiled tl.dot (more rows), with a bias; vs the dequantised weight."""
    torch.manual_seed(rows)
    n, k = 72, 256  # 72 rows: the last panel of 16 is partly padding
    packed = quantize(torch.randn(n, k) * 0.1, fmt)
    w = packed.dequantize().double()
    bias = torch.randn(n)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, k).to(dtype)
        y = Q.matmul(x, packed, bias)
        assert y.dtype == dtype and y.shape == (rows, n)
        w_ref = w if dtype == torch.float32 or rows == 1 else w.to(dtype).double()  # tl.dot takes dtype weights
        close(y, x.double() @ w_ref.T + bias.double(), dtype)
    assert torch.equal(Q.dequantize(packed, torch.float32), packed.dequantize())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_match_pytorch(dtype):
    torch.manual_seed(1)
    x, res, w = torch.randn(5, 96).to(dtype), torch.randn(5, 96).to(dtype), torch.randn(96).to(dtype)
    r_kernel, r_ref = res.clone(), res.clone()
    close(E.rms_norm(x, w, 1e-6, r_kernel), ops.rms_norm(x, w, 1e-6, r_ref).double(), dtype)
    close(r_kernel, r_ref.double(), dtype)
    close(E.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6).double(), dtype)
    gate_up = torch.randn(7, 160).to(dtype)
    close(E.silu_mul(gate_up), ops.silu_mul(gate_up).double(), dtype)

    heads, kv_heads, d, t, bs = 6, 2, 64, 4, 16
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d).to(dtype)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    pos = torch.tensor([0, 5, 17, 3])
    cos, sin = torch.randn(32, d // 2), torch.randn(32, d // 2)
    q_ref, k_ref = ops.rotary(q.clone(), heads, pos, cos, sin), ops.rotary(k.clone(), kv_heads, pos, cos, sin)
    k_cache, v_cache = torch.zeros(4, kv_heads, bs, d, dtype=dtype), torch.zeros(4, kv_heads, bs, d, dtype=dtype)
    slots = torch.tensor([3, 17, 40, 63])
    E.rotary_kv_write(q, k, v, pos, slots, cos, sin, k_cache, v_cache, heads)  # q rotated in place (in qkv)
    close(q, q_ref.double(), dtype)
    close(k_cache[slots // bs, :, slots % bs].reshape(t, -1), k_ref.double(), dtype)
    assert torch.equal(v_cache[slots // bs, :, slots % bs].reshape(t, -1), v)
    untouched = torch.ones(4 * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.transpose(1, 2).reshape(4 * bs, -1)[untouched].any(), "wrote outside the given slots"
