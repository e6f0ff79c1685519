"""Paged attention: each layer stores its new K/V in their slots, then every token attends over its
own sequence's cache (its cached prefix, the step's earlier tokens and itself; a sliding window when
the layer has one). Two implementations of that one contract:

- kernel (CPU, float32): tokenmill's C++ op reads each sequence's blocks where they lie, decodes and
  prefill chunks alike (layers/csrc/attention.cpp);
- triton (CUDA; the CPU under Triton's interpreter): tokenmill's Triton kernels over the Triton KV layout,
  a decode kernel for the step's decodes and a prefill kernel for its chunks (layers/gpu/attention.py);
- torch (CPU with other dtypes or no compiler): decodes in groups of similar context length, gathered into
  one padded batch for a masked SDPA; each prefill chunk attends causally over its prefix plus itself.

The model runner builds one StepContext per step (step.py); the native model calls `attend` per layer, and
transformers' modules reach the same function through the registered attention interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.engine.layers import kernels
from services.worker.engine.step import StepContext

ATTN_NAME = "tokenmill_paged"


def attend(ctx: StepContext, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
           num_heads: int, window: int | None, scale: float) -> torch.Tensor:
    """Store k, v [T, kv_heads * D] in the cache (None: written already, by the fused rotary), then attend:
    q [T, heads * D] -> [T, heads * D]."""
    kv = ctx.kv
    if kv.triton:
        return _attend_triton(ctx, layer, q, k, v, num_heads, window, scale)
    ops = kernels.cpu_ops(q.device, q.dtype)
    if ops is not None and kernels.attention_fits(kv.head_dim, num_heads, kv.num_kv_heads):
        ops.write_kv(k, v, kv.k[layer], kv.v[layer], ctx.slot_mapping)
        return ops.paged_attention(q, kv.k[layer], kv.v[layer], ctx.block_tables, ctx.token_seq, ctx.token_pos,
                                   num_heads, window or 0, scale)
    return _attend_torch(ctx, layer, q, k, v, num_heads, window, scale)


def _attend_triton(ctx: StepContext, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                   num_heads: int, window: int | None, scale: float) -> torch.Tensor:
    from services.worker.engine.layers.gpu import attention as gpu_attention

    kv, total, nd = ctx.kv, q.shape[0], ctx.decode_lens.shape[0]
    if k is not None:
        kv.write(layer, ctx.slot_mapping, k.reshape(total, kv.num_kv_heads, -1), v.reshape(total, kv.num_kv_heads, -1))
    out = torch.empty((total, q.shape[1]), dtype=q.dtype, device=q.device)
    if nd:
        gpu_attention.decode(q[:nd], kv.k[layer], kv.v[layer], ctx.block_tables, ctx.decode_lens, num_heads, window,
                             scale, ctx.decode_splits, out=out[:nd])
    if ctx.prefill_tiles is not None:
        gpu_attention.prefill(q, kv.k[layer], kv.v[layer], ctx.block_tables, ctx.token_pos, ctx.prefill_tiles,
                              num_heads, window, scale, out)
    return out


def _attend_torch(ctx: StepContext, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                  window: int | None, scale: float) -> torch.Tensor:
    kv = ctx.kv
    total, dim = q.shape[0], kv.head_dim
    kv_heads = kv.num_kv_heads
    group = num_heads // kv_heads
    kt, vt = k.reshape(total, kv_heads, dim), v.reshape(total, kv_heads, dim)
    kv.write(layer, ctx.slot_mapping, kt, vt)
    qh = q.reshape(total, num_heads, dim).transpose(0, 1)  # [heads, T, D]
    out = torch.empty(total, num_heads, dim, dtype=q.dtype, device=q.device)
    for grp in ctx.groups():
        ids, length, mask = grp.view(window)
        s, n = grp.start, grp.count
        keys = kv.gather(layer, ids, "k").view(kv_heads, n, length, dim)
        vals = kv.gather(layer, ids, "v").view(kv_heads, n, length, dim)
        qd = qh[:, s : s + n].reshape(kv_heads, group, n, dim).transpose(1, 2)  # [kv_heads, seqs, group, dim]
        o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=mask, scale=scale)
        out[s : s + n] = o.permute(1, 0, 2, 3).reshape(n, num_heads, dim)
    for idx, chunk in enumerate(ctx.prefills(window)):
        s, e = chunk.start, chunk.end
        if chunk.context_start:
            n_keys = chunk.context_start + e - s - chunk.key_offset
            keys = kv.gather(layer, chunk.block_ids, "k")[:, :n_keys]
            vals = kv.gather(layer, chunk.block_ids, "v")[:, :n_keys]
        else:
            keys, vals = kt[s:e].transpose(0, 1), vt[s:e].transpose(0, 1)
        mask = ctx.prefill_mask(idx, window)
        o = F.scaled_dot_product_attention(qh[None, :, s:e], keys[None], vals[None], attn_mask=mask,
                                           is_causal=mask is None, scale=scale, enable_gqa=group > 1)
        out[s:e] = o[0].transpose(0, 1)
    return out.view(total, num_heads * dim)


current: StepContext | None = None  # the step in flight, for transformers' modules


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [1, heads, T, dim], key/value [1, kv_heads, T, dim]
    -> ([1, T, heads, dim], None)."""
    ctx = current
    if ctx is None:
        raise RuntimeError(f"{ATTN_NAME} attention runs only inside the paged engine's model runner")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    _, heads, total, dim = query.shape
    q = query[0].transpose(0, 1).reshape(total, heads * dim)
    k = key[0].transpose(0, 1).reshape(total, -1)
    v = value[0].transpose(0, 1).reshape(total, -1)
    scale = scaling if scaling is not None else dim**-0.5
    return attend(ctx, module.layer_idx, q, k, v, heads, window, scale).view(1, total, heads, dim), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention)
