"""The decoder's small ops: the C++ kernel for fp32 on a CPU, the Triton kernel on CUDA (gpu/elementwise.py),
else the same math in PyTorch (written op for op as transformers' Llama modules, so a float model matches
them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.engine.layers import gpu, kernels


def _ops(x: torch.Tensor):
    return kernels.cpu_ops(x.device, x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """weight * normalised(x), x [T, N]; with `residual`, first residual += x (in place) and normalise that."""
    if x.dim() == 2 and x.stride(-1) == 1 and gpu.applies(x.device):
        from services.worker.engine.layers.gpu import elementwise

        return elementwise.rms_norm(x, weight, eps, residual)
    ops = _ops(x)
    if ops is not None and x.stride(-1) == 1 and x.dim() == 2:
        return ops.rms_norm(x, weight, eps, residual)
    if residual is not None:
        residual.add_(x)
        x = residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def head_rms_norm(x: torch.Tensor, heads: int, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's per-head q/k norm: x [T, heads * D] -> same shape."""
    t = x.shape[0]
    return rms_norm(x.reshape(t * heads, -1).contiguous(), weight, eps).reshape(t, -1)


def rotary(x: torch.Tensor, heads: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x [T, heads * D] at positions [T]; cos / sin [max_pos, D / 2].
    In place where the kernel runs; returns the result either way."""
    ops = _ops(x)
    if ops is not None and x.stride(-1) == 1:
        ops.rotary(x, heads, positions, cos, sin)
        return x
    t, half = x.shape[0], cos.shape[1]
    xv = x.reshape(t, heads, 2 * half)
    c = torch.cat((cos[positions], cos[positions]), -1)[:, None].to(x.dtype)
    s = torch.cat((sin[positions], sin[positions]), -1)[:, None].to(x.dtype)
    rotated = torch.cat((-xv[..., half:], xv[..., :half]), -1)
    return (xv * c + rotated * s).reshape(t, -1)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] -> silu(gate) * up, [T, I]."""
    if gate_up.dim() == 2 and gate_up.stride(-1) == 1 and gpu.applies(gate_up.device):
        from services.worker.engine.layers.gpu import elementwise

        return elementwise.silu_mul(gate_up)
    ops = _ops(gate_up)
    if ops is not None and gate_up.is_contiguous():
        return ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
