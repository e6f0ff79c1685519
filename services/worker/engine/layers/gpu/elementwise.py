"""The decoder's small ops in Triton, fused where a step would otherwise pass the data through memory twice:
RMSNorm with the residual add, rotary on q and k with the KV-cache write, SiLU * up. Math in fp32, rounded
to the activations' dtype where transformers' modules round (so bf16 results track theirs)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, RES, W, OUT, N, stride_x, stride_r, stride_o, eps, HAS_RES: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    ok = c < N
    x = tl.load(X + row * stride_x + c, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(RES + row * stride_r + c, mask=ok, other=0.0).to(tl.float32)
        x = x.to(OUT.dtype.element_ty).to(tl.float32)  # the residual stream is kept in the activations' dtype
        tl.store(RES + row * stride_r + c, x.to(RES.dtype.element_ty), mask=ok)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    y = (x * rstd).to(OUT.dtype.element_ty).to(tl.float32)
    w = tl.load(W + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + c, (w * y).to(OUT.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """ops.rms_norm's contract: weight * normalised(x); with `residual`, residual += x first (in place)."""
    t, n = x.shape
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t:
        res = residual if residual is not None else x
        _rms_norm_kernel[(t,)](x, res, weight, out, n, x.stride(0), res.stride(0), out.stride(0), eps,
                               HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
                               num_warps=4 if n <= 4096 else 8)
    return out


@triton.jit
def _rotate(X, row, heads, c, s, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate-half rotary of `heads` heads of 2 * HALF dims at X + row: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    ok = (h < heads)[:, None] & (i < HALF)[None, :]
    at = X + row + h[:, None] * (2 * HALF) + i[None, :]
    x1 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(at + HALF, mask=ok, other=0.0).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s, h, i, ok


@triton.jit
def _rotary_kv_kernel(Q, K, V, POS, SLOTS, COS, SIN, K_CACHE, V_CACHE, stride_q, stride_k, stride_v, stride_cos,
                      stride_cb, stride_ch, stride_ct, num_heads, num_kv_heads, HALF: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr,
                      BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(POS + t)
    i = tl.arange(0, BLOCK_HALF)
    c = tl.load(COS + pos * stride_cos + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + pos * stride_cos + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    q1, q2, h, i2, ok = _rotate(Q, t * stride_q, num_heads, c, s, HALF, BLOCK_H, BLOCK_HALF)
    at = Q + t * stride_q + h[:, None] * (2 * HALF) + i2[None, :]
    tl.store(at, q1.to(Q.dtype.element_ty), mask=ok)
    tl.store(at + HALF, q2.to(Q.dtype.element_ty), mask=ok)
    k1, k2, h, i2, ok = _rotate(K, t * stride_k, num_kv_heads, c, s, HALF, BLOCK_KV, BLOCK_HALF)
    slot = tl.load(SLOTS + t).to(tl.int64)
    cache = (slot // BLOCK_SIZE) * stride_cb + h[:, None] * stride_ch + (slot % BLOCK_SIZE) * stride_ct + i2[None, :]
    tl.store(K_CACHE + cache, k1.to(K_CACHE.dtype.element_ty), mask=ok)
    tl.store(K_CACHE + cache + HALF, k2.to(K_CACHE.dtype.element_ty), mask=ok)
    v_at = V + t * stride_v + h[:, None] * (2 * HALF) + i2[None, :]
    tl.store(V_CACHE + cache, tl.load(v_at, mask=ok, other=0.0), mask=ok)
    tl.store(V_CACHE + cache + HALF, tl.load(v_at + HALF, mask=ok, other=0.0), mask=ok)


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    num_heads: int) -> None:
    """Rotate q [T, heads * D] in place and k [T, kv_heads * D] into the cache at `slots`, with v beside it
    (cache layout: attention.py's [blocks, kv_heads, block_size, D])."""
    t = q.shape[0]
    if not t:
        return
    _, kv_heads, block_size, head_dim = k_cache.shape
    half = head_dim // 2
    _rotary_kv_kernel[(t,)](q, k, v, positions, slots, cos, sin, k_cache, v_cache, q.stride(0), k.stride(0),
                            v.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                            num_heads, kv_heads, HALF=half, BLOCK_SIZE=block_size,
                            BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KV=triton.next_power_of_2(kv_heads),
                            BLOCK_HALF=triton.next_power_of_2(half), num_warps=4)


@triton.jit
def _silu_mul_kernel(X, OUT, N, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < N
    gate = tl.load(X + row * stride_x + c, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + N + c, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * stride_o + c, (act * up).to(OUT.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] -> silu(gate) * up, [T, I]."""
    t, width = gate_up.shape
    n = width // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0), BLOCK=block,
                                                     num_warps=4)
    return out
