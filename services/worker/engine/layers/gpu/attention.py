"""Paged attention in Triton, reading K/V where they lie through each sequence's block table.

CUDA KV layout (one tensor per layer for K and one for V): [num_blocks, kv_heads, block_size, head_dim].
A block's keys for one head are one contiguous block_size x head_dim tile, so a tile of keys is a few
contiguous loads; a token's new K/V are written head by head (elementwise.rotary_kv_write). The CPU keeps
K transposed inside a block instead (kv_cache.py): its kernel wants one dimension of W keys per load.

- decode: one query row per sequence; the program for (sequence, KV head, split) takes all query heads of
  that KV head as the rows of one tl.dot (GQA shares every K/V load), runs an online softmax over its
  share of the context (a sliding window starts it later) and writes a partial (acc, max, sum); a reduce
  step merges the splits. Long contexts and small batches get more splits, so the GPU stays busy.
- prefill chunks: a program per (tile of up to BLOCK_M consecutive query tokens of one sequence, query
  head); the chunk's own K/V are in the cache already, so every query attends causally to its sequence's
  keys [pos - window + 1, pos]: the cached prefix and the chunk alike.
Softmax in base 2 (scale * log2(e) folded into the scores); fp32 dots at full precision (`ieee`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _load_kv(K, V, TABLES, seq, stride_tab, kvh, stride_kb, stride_kh, stride_kt, n, valid, d, d_ok,
             BLOCK_SIZE: tl.constexpr):
    """Keys and values at positions n of sequence `seq` (its row of the block tables), [len(n), BLOCK_D] each."""
    block = tl.load(TABLES + seq * stride_tab + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    row = block * stride_kb + kvh * stride_kh + (n % BLOCK_SIZE) * stride_kt
    mask = valid[:, None] & d_ok[None, :]
    return (tl.load(K + row[:, None] + d[None, :], mask=mask, other=0.0),
            tl.load(V + row[:, None] + d[None, :], mask=mask, other=0.0))


@triton.jit
def _online_softmax(q, k, v, keep, m, denom, acc, qk_scale, PRECISION: tl.constexpr):
    """One tile of keys into each query row's running max, sum and weighted values (base 2, masked by `keep`);
    a row that has seen no key yet keeps max -inf and adds nothing."""
    s = tl.where(keep, tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, denom, acc


@triton.jit
def _decode_kernel(Q, K, V, TABLES, LENS, OUT, PART_O, PART_ML, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_tab, stride_ot, qk_scale, window, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(LENS + seq)
    start = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(length - start, NUM_SPLITS), TILE_N) * TILE_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kvh * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(Q + seq * stride_qt + head[:, None] * HEAD_DIM + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, TILE_N):
        n = n0 + tl.arange(0, TILE_N)
        valid = n < hi
        k, v = _load_kv(K, V, TABLES, seq, stride_tab, kvh, stride_kb, stride_kh, stride_kt, n, valid, d, d_ok,
                        BLOCK_SIZE)
        m, denom, acc = _online_softmax(q, k, v, valid[None, :], m, denom, acc, qk_scale, PRECISION)
    if NUM_SPLITS == 1:
        out = acc / denom[:, None]
        tl.store(OUT + seq * stride_ot + head[:, None] * HEAD_DIM + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])
    else:
        at = (seq * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(PART_O + at[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
        tl.store(PART_ML + at * 2, m, mask=g_ok)
        tl.store(PART_ML + at * 2 + 1, denom, mask=g_ok)


@triton.jit
def _reduce_kernel(OUT, PART_O, PART_ML, stride_ot, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    at = (seq * NUM_HEADS + head) * NUM_SPLITS + s
    m = tl.load(PART_ML + at * 2)
    denom = tl.load(PART_ML + at * 2 + 1)
    top = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp2(m - top), 0.0)  # an empty split (past the context) weighs 0
    acc = tl.load(PART_O + at[:, None] * BLOCK_D + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(denom * w, 0)
    tl.store(OUT + seq * stride_ot + head * HEAD_DIM + d, out.to(OUT.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(Q, K, V, TABLES, POS, TILES, OUT, stride_qt, stride_kb, stride_kh, stride_kt, stride_tab,
                    stride_ot, qk_scale, window, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
                    PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // GROUP
    first = tl.load(TILES + tile * 3)
    count = tl.load(TILES + tile * 3 + 1)
    seq = tl.load(TILES + tile * 3 + 2)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    r_ok = r < count
    d_ok = d < HEAD_DIM
    tok = first + r
    qpos = tl.load(POS + tok, mask=r_ok, other=0)
    q = tl.load(Q + tok[:, None] * stride_qt + head * HEAD_DIM + d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                other=0.0)
    p0 = tl.load(POS + first)
    hi = p0 + count  # one past the last query's position
    lo = tl.where(window > 0, tl.maximum(p0 - window + 1, 0), 0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, TILE_N):
        n = n0 + tl.arange(0, TILE_N)
        valid = n < hi
        k, v = _load_kv(K, V, TABLES, seq, stride_tab, kvh, stride_kb, stride_kh, stride_kt, n, valid, d, d_ok,
                        BLOCK_SIZE)
        keep = valid[None, :] & (n[None, :] <= qpos[:, None])  # causal; padded rows (past count) see nothing
        if window > 0:
            keep = keep & (n[None, :] > qpos[:, None] - window)
        m, denom, acc = _online_softmax(q, k, v, keep, m, denom, acc, qk_scale, PRECISION)
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(OUT + tok[:, None] * stride_ot + head * HEAD_DIM + d[None, :], out.to(OUT.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


def _pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_splits(batch: int, num_kv_heads: int, sms: int) -> int:
    """Context splits per (sequence, KV head): enough programs for about two waves of the GPU. A function of
    the batch size the caller gives (the CUDA-graph bucket), so a captured and an eager step split alike."""
    programs = batch * num_kv_heads
    if not programs:
        return 1
    return min(16, _pow2(-(-2 * sms // programs))) if programs < 2 * sms else 1


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
           num_heads: int, window: int | None, scale: float, splits: int, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """q [B, heads * D] (one token per sequence; row i's blocks in tables[i], lens[i] keys including its own)
    -> [B, heads * D] (into `out` when given)."""
    if splits & (splits - 1):
        raise ValueError(f"context splits must be a power of two, not {splits}")
    b = q.shape[0]
    _, kv_heads, block_size, head_dim = k_cache.shape
    group = num_heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    if b == 0:
        return out
    block_d = _pow2(head_dim, 16)
    part_o = part_ml = out  # unused when one split writes the output itself
    if splits > 1:
        part_o = torch.empty((b, num_heads, splits, block_d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((b, num_heads, splits, 2), dtype=torch.float32, device=q.device)
    _decode_kernel[(b, kv_heads, splits)](
        q, k_cache, v_cache, tables, lens, out, part_o, part_ml, q.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), tables.stride(0), out.stride(0), scale * LOG2E, window or 0, NUM_HEADS=num_heads,
        GROUP=group, BLOCK_G=_pow2(group, 16), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        TILE_N=max(block_size, 32), NUM_SPLITS=splits, PRECISION=_precision(q.dtype), num_warps=4)
    if splits > 1:
        _reduce_kernel[(b, num_heads)](out, part_o, part_ml, out.stride(0), NUM_HEADS=num_heads, HEAD_DIM=head_dim,
                                       BLOCK_D=block_d, NUM_SPLITS=splits, num_warps=1)
    return out


PREFILL_BLOCK_M = 64


def prefill_tiles(chunks: list[tuple[int, int, int]], block_m: int = PREFILL_BLOCK_M) -> list[tuple[int, int, int]]:
    """(first token, count, sequence row) per tile of up to block_m query tokens, from each chunk's
    (start, end, sequence row) in the packed batch."""
    return [(t, min(block_m, end - t), row) for start, end, row in chunks for t in range(start, end, block_m)]


def prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
            positions: torch.Tensor, tiles: torch.Tensor, num_heads: int, window: int | None, scale: float,
            out: torch.Tensor) -> torch.Tensor:
    """Attention of the prefill tokens listed by `tiles` ([n, 3] int32 from prefill_tiles) into `out`
    ([T, heads * D]); q [T, heads * D], positions [T] int32."""
    if tiles.shape[0] == 0:
        return out
    _, kv_heads, block_size, head_dim = k_cache.shape
    block_d = _pow2(head_dim, 16)
    _prefill_kernel[(tiles.shape[0], num_heads)](
        q, k_cache, v_cache, tables, positions, tiles, out, q.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), tables.stride(0), out.stride(0), scale * LOG2E, window or 0,
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_M=PREFILL_BLOCK_M, TILE_N=max(block_size, 32), PRECISION=_precision(q.dtype),
        num_warps=4)
    return out
