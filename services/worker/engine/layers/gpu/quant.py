"""Dequantising matrix products in Triton over the packed weight formats (layers/quant.py), as stored.

The CPU's panel layout suits the GPU as it is: output rows in panels of 16, and for each input column
(8-bit) or pair of columns (4-bit) the 16 rows' codes side by side, so one panel's share of a K tile is one
contiguous run of bytes. A program takes BLOCK_P panels (16 * BLOCK_P output rows) and a K range, dequantises
each code in registers (scale * code + min, scale * NF4[code], or scale * int8) and
- one row (batch-1 decode): multiplies by the activations with fp32 FMAs, accumulating in registers: no
  tensor-core padding, a pure stream of weight bytes; small programs, split over K, so that many are in
  flight on every multiprocessor even for a 1536-row matrix;
- more rows on CUDA (`DEQUANT_MIN_ROWS`): dequantise the whole matrix into the activations' dtype, then
  cuBLAS (measured faster than the fused tile kernel from 16 rows on, and far faster for prefill);
- more rows elsewhere (the interpreter): tl.dot on tiles of BLOCK_M rows, weights cast to the activations'
  dtype (what a dequantise + F.linear computes), split over K when the tile grid is small.
Split-K partial sums go to an fp32 workspace and one reduce kernel adds them in order: deterministic, so a
CUDA-graph replay and an eager call of the same shape give the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from services.worker.engine.layers import gpu
from services.worker.engine.layers.quant import PANEL, PackedWeight

LANES = tl.constexpr(PANEL)  # output rows per panel
# From this many rows, dequantise + cuBLAS; one row takes the fused GEMV. Measured on the H200 (bench.gpu,
# 2026-12-04, each call timed inside a CUDA graph, Qwen2.5-1.5B int4): at one row the GEMV beats both others
# (gate-up 21 us vs 39 dequantise + cuBLAS; the q8_0 LM head 104 us, 2.4 TB/s, vs 114 for bf16 cuBLAS); at
# 16 rows dequantise + cuBLAS is ahead on every matrix (a layer 76 vs 114 us, the LM head 315 vs 376), and
# far ahead from 64 rows on. The tl.dot kernel stays for other devices and as the CPU-checked reference.
DEQUANT_MIN_ROWS = 2


@triton.jit
def _codes(CODES, SCALES, MINS, TABLE, p, lane, k0, K, N_PANELS, BITS: tl.constexpr, GROUP: tl.constexpr,
           HAS_MIN: tl.constexpr, HAS_TABLE: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr):
    """Weights of BLOCK_P panels for the K tile at k0, fp32 [P, NG, GW, 16]: NG groups of GW code slots (a slot
    is a column pair for 4 bits, a column for 8). Returns (even columns, odd columns) for 4 bits, (w, w) for 8."""
    g = tl.arange(0, NG)
    w = tl.arange(0, GW)
    slot = (k0 * BITS // 8) + g[:, None] * GW + w[None, :]  # [NG, GW] byte column within the panel
    col = slot * 8 // BITS  # first input column of the slot
    ok = (p < N_PANELS)[:, None, None, None] & (col < K)[None, :, :, None]
    slots = K * BITS // 8
    ptr = CODES + p.to(tl.int64)[:, None, None, None] * (slots * 16) + slot[None, :, :, None] * 16 + lane
    c = tl.load(ptr, mask=ok, other=0)
    groups = tl.cdiv(K, GROUP)
    grp = k0 // GROUP + g  # NG == 1 when a group spans the whole tile
    sp = p.to(tl.int64)[:, None, None] * (groups * 16) + grp[None, :, None] * 16 + lane[None, None, :]
    s_ok = (p < N_PANELS)[:, None, None] & (grp < groups)[None, :, None]
    scale = tl.load(SCALES + sp, mask=s_ok, other=0.0).to(tl.float32)[:, :, None, :]
    if HAS_MIN:
        low = tl.load(MINS + sp, mask=s_ok, other=0.0).to(tl.float32)[:, :, None, :]
    if BITS == 8:
        v = c.to(tl.int8, bitcast=True).to(tl.float32) * scale
        return v, v
    lo = (c & 15).to(tl.int32)
    hi = (c >> 4).to(tl.int32)
    if HAS_TABLE:
        even = tl.load(TABLE + lo) * scale
        odd = tl.load(TABLE + hi) * scale
    else:
        even = lo.to(tl.float32) * scale
        odd = hi.to(tl.float32) * scale
    if HAS_MIN:
        even += low
        odd += low
    return even, odd


@triton.jit
def _store(OUT, BIAS, m, n, M, N, stride_om, split, acc, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One split: the result itself (+ bias, in OUT's dtype); several: fp32 partial sums for the reduce."""
    ok = (m[:, None] < M) & (n[None, :] < N)
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(BIAS + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + m[:, None] * stride_om + n[None, :], acc.to(OUT.dtype.element_ty), mask=ok)
    else:
        tl.store(OUT + (split * M + m[:, None]) * N + n[None, :], acc, mask=ok)


@triton.jit
def _gemv_kernel(X, CODES, SCALES, MINS, TABLE, BIAS, OUT, N, K, N_PANELS, k_per_split, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_TABLE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                 NG: tl.constexpr, GW: tl.constexpr):
    """One row: sum over this split's K range of x[k] * W[n, k]. Products accumulate elementwise in registers
    (fp32 FMAs); the sum across the tile happens once, after the loop."""
    pid_p = tl.program_id(0)
    split = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    lane = tl.arange(0, LANES)
    g = tl.arange(0, NG)
    w = tl.arange(0, GW)
    acc = tl.zeros([BLOCK_P, NG, GW, LANES], tl.float32)
    lo = split * k_per_split
    hi = tl.minimum(lo + k_per_split, K)
    for k0 in range(lo, hi, BLOCK_K):
        even, odd = _codes(CODES, SCALES, MINS, TABLE, p, lane, k0, K, N_PANELS, BITS, GROUP, HAS_MIN, HAS_TABLE,
                           NG, GW)
        slot = (k0 * BITS // 8) + g[:, None] * GW + w[None, :]
        col = slot * 8 // BITS
        x0 = tl.load(X + col, mask=col < K, other=0.0).to(tl.float32)[None, :, :, None]
        acc += even * x0
        if BITS == 4:
            x1 = tl.load(X + col + 1, mask=col + 1 < K, other=0.0).to(tl.float32)[None, :, :, None]
            acc += odd * x1
    total = tl.sum(tl.sum(acc, 2), 1)
    n = tl.reshape(p[:, None] * LANES + lane[None, :], (BLOCK_P * LANES,))
    _store(OUT, BIAS, tl.zeros([1], tl.int32), n, 1, N, stride_om, split, tl.reshape(total, (1, BLOCK_P * LANES)),
           DIRECT, HAS_BIAS)


@triton.jit
def _gemm_kernel(X, CODES, SCALES, MINS, TABLE, BIAS, OUT, M, N, K, N_PANELS, k_per_split, stride_xm, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_MIN: tl.constexpr, HAS_TABLE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_K: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr, PRECISION: tl.constexpr):
    """Tiles of BLOCK_M rows: x[m, K range] @ W[n, K range]^T with fp32 accumulators."""
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    split = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    lane = tl.arange(0, LANES)
    j = tl.arange(0, NG * GW)
    acc = tl.zeros([BLOCK_M, BLOCK_P * LANES], tl.float32)
    lo = split * k_per_split
    hi = tl.minimum(lo + k_per_split, K)
    for k0 in range(lo, hi, BLOCK_K):
        even, odd = _codes(CODES, SCALES, MINS, TABLE, p, lane, k0, K, N_PANELS, BITS, GROUP, HAS_MIN, HAS_TABLE,
                           NG, GW)
        col = (k0 * BITS // 8 + j) * 8 // BITS  # [NG * GW]
        x0 = tl.load(X + m[:, None] * stride_xm + col[None, :], mask=(m[:, None] < M) & (col[None, :] < K), other=0.0)
        w0 = tl.reshape(tl.permute(tl.reshape(even, (BLOCK_P, NG * GW, LANES)), (1, 0, 2)), (NG * GW, BLOCK_P * LANES))
        acc += tl.dot(x0, w0.to(x0.dtype), input_precision=PRECISION)
        if BITS == 4:
            x1 = tl.load(X + m[:, None] * stride_xm + col[None, :] + 1, mask=(m[:, None] < M) & (col[None, :] + 1 < K),
                         other=0.0)
            w1 = tl.reshape(tl.permute(tl.reshape(odd, (BLOCK_P, NG * GW, LANES)), (1, 0, 2)),
                            (NG * GW, BLOCK_P * LANES))
            acc += tl.dot(x1, w1.to(x1.dtype), input_precision=PRECISION)
    n = pid_p * BLOCK_P * LANES + tl.arange(0, BLOCK_P * LANES)
    _store(OUT, BIAS, m, n, M, N, stride_om, split, acc, DIRECT, HAS_BIAS)


@triton.jit
def _reduce_kernel(PART, BIAS, Y, M, N, stride_ym, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(PART + (s * M + row) * N + n, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_ym + n, acc.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_kernel(CODES, SCALES, MINS, TABLE, W, N, K, N_PANELS, BITS: tl.constexpr, GROUP: tl.constexpr,
                    HAS_MIN: tl.constexpr, HAS_TABLE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                    NG: tl.constexpr, GW: tl.constexpr):
    """W [N, K] in W's dtype (the large-batch path: cuBLAS multiplies it). The tile is turned from the codes'
    order (the 16 rows of a panel side by side) to W's (columns side by side) before the store, so the
    writes, which are 4x the bytes read, go out coalesced."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    k0 = tl.program_id(1) * BLOCK_K
    lane = tl.arange(0, LANES)
    even, odd = _codes(CODES, SCALES, MINS, TABLE, p, lane, k0, K, N_PANELS, BITS, GROUP, HAS_MIN, HAS_TABLE, NG, GW)
    if BITS == 4:  # columns 2s and 2s + 1 of slot s
        w = tl.reshape(tl.permute(tl.join(even, odd), (0, 3, 1, 2, 4)), (BLOCK_P * LANES, BLOCK_K))
    else:
        w = tl.reshape(tl.permute(even, (0, 3, 1, 2)), (BLOCK_P * LANES, BLOCK_K))
    rows = tl.reshape(p[:, None] * LANES + lane[None, :], (BLOCK_P * LANES,))
    cols = k0 + tl.arange(0, BLOCK_K)
    ptr = W + rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(ptr, w.to(W.dtype.element_ty), mask=(rows < N)[:, None] & (cols < K)[None, :])


def _tile_k(p: PackedWeight, block_k: int) -> tuple[int, int, int]:
    """(BLOCK_K, NG, GW): the K tile, its groups and code slots per group. A tile holds whole groups, or lies
    inside one (groups larger than the tile, per-channel scales)."""
    k, group = p.in_features, p.group
    block_k = min(block_k, triton.next_power_of_2(k))
    slots_per_col = p.bits / 8
    if group < block_k:
        if block_k % group:
            raise ValueError(f"group size {group} does not tile a K block of {block_k}")
        ng = block_k // group
    else:
        if group % block_k and group < k:
            raise ValueError(f"group size {group} is not a multiple of the K block {block_k}")
        ng = 1
    return block_k, ng, int(block_k * slots_per_col) // ng


def _splits(programs: int, k: int, block_k: int, target: int) -> int:
    """Split K until there are `target` programs (each keeping at least one K tile)."""
    splits = 1
    while programs * splits < target and splits * 2 * block_k <= k:
        splits *= 2
    return splits


def _args(p: PackedWeight) -> tuple:
    table = p.table if p.table is not None else p.scales
    mins = p.mins if p.mins is not None else p.scales
    return p.panel_codes(), p.scales, mins, table


def _flags(p: PackedWeight) -> dict:
    return dict(BITS=p.bits, GROUP=p.group, HAS_MIN=p.mins is not None, HAS_TABLE=p.table is not None)


def matmul(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N] in x's dtype; W packed (its tensors on x's device)."""
    m, k = x.shape
    n = p.out_features
    rows = m
    if rows >= DEQUANT_MIN_ROWS and x.device.type == "cuda":
        return F.linear(x, dequantize(p, x.dtype), None if bias is None else bias.to(x.dtype))
    x = x.contiguous()
    sms = gpu.num_sms(x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if rows == 1:  # memory-bound: about eight programs of two warps per multiprocessor
        block_p, warps = 2, 2
        block_k, ng, gw = _tile_k(p, 128 if p.bits == 4 else 64)
        grid = (triton.cdiv(p.panels, block_p),)
        splits = _splits(grid[0], k, block_k, 8 * sms)
    else:
        block_m, warps = min(64, triton.next_power_of_2(max(rows, 16))), 4
        block_p = 4 if block_m <= 32 else 8
        block_k, ng, gw = _tile_k(p, 64)
        grid = (triton.cdiv(m, block_m), triton.cdiv(p.panels, block_p))
        splits = _splits(triton.cdiv(rows, block_m) * grid[1], k, block_k, 2 * sms)
    k_per = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    out = y if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    common = dict(**_flags(p), HAS_BIAS=bias is not None, DIRECT=splits == 1, BLOCK_P=block_p, BLOCK_K=block_k,
                  NG=ng, GW=gw, num_warps=warps)
    b = bias if bias is not None else out
    if rows == 1:
        _gemv_kernel[(*grid, splits)](x, *_args(p), b, out, n, k, p.panels, k_per, y.stride(0), **common)
    else:
        _gemm_kernel[(*grid, splits)](x, *_args(p), b, out, m, n, k, p.panels, k_per, x.stride(0), y.stride(0),
                                      BLOCK_M=block_m, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                                      num_stages=3, **common)
    if splits > 1:
        block = 256
        _reduce_kernel[(m, triton.cdiv(n, block))](out, b, y, m, n, y.stride(0), SPLITS=splits,
                                                   HAS_BIAS=bias is not None, BLOCK=block, num_warps=2)
    return y


def dequantize(p: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight [N, K] in `dtype`, on the packed tensors' device."""
    n, k = p.out_features, p.in_features
    w = torch.empty((n, k), dtype=dtype, device=p.codes.device)
    block_p = 4
    block_k, ng, gw = _tile_k(p, 128)
    _dequant_kernel[(triton.cdiv(p.panels, block_p), triton.cdiv(k, block_k))](
        *_args(p), w, n, k, p.panels, **_flags(p), BLOCK_P=block_p, BLOCK_K=block_k, NG=ng, GW=gw, num_warps=4)
    return w
