"""Linear and embedding layers over float or packed quantized weights; one module for every path.

The engine's own model and the transformers reference model in the tests call the same modules, so a
quantized format is compared with itself. Which kernel runs:
- packed weights, fp32 activations on a CPU with AVX2/AVX-512: tokenmill's C++ kernel (kernels.py);
  it dequantises in registers and accumulates in fp32, row by row, so a row's result does not depend
  on what else is in the batch;
- with `set_activations(model, "int8")` (the worker's --activations int8), integer-coded weights (q4_1,
  int4, q8_0, int8 in groups of 32s) on a CPU with tokenmill's kernels: activations quantized per row in
  blocks of 32 (llama.cpp's Q8), exact integer block sums on AMX tiles, VNNI or AVX2 (kernels.matrix_unit), so a row's
  result is bitwise the same whatever the unit, the batch or the chunking; it costs quality (README);
- packed weights on CUDA (and on the CPU under Triton's interpreter): tokenmill's Triton kernels
  (gpu/quant.py), reading the same packed tensors;
- packed weights elsewhere (no compiler, bf16 activations on a CPU): dequantise, then F.linear;
- float weights: F.linear, except the LM head on a CPU (`weight_stationary`): W @ x^T reads the large
  vocabulary matrix once for all rows (1.3x at 32 rows to 3x at 2-4 rows, measured on the AVX2 machine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.engine.layers import gpu, kernels
from services.worker.engine.layers.quant import PackedWeight


class _Packed(nn.Module):
    """A module holding a PackedWeight: model.to(device) moves its tensors, and never casts them (fp16 scales,
    uint8 codes stay what they are whatever dtype the model is cast to)."""

    packed: PackedWeight | None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.packed is not None:
            device = fn(torch.empty(0)).device
            if device != self.packed.codes.device:
                self.packed = self.packed.to(device)
        return self


class Linear(_Packed):
    def __init__(self, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None,
                 weight_stationary: bool = False) -> None:
        super().__init__()
        packed = isinstance(weight, PackedWeight)
        self.packed = weight if packed else None
        self.weight = None if packed else nn.Parameter(weight, requires_grad=False)
        self.out_features, self.in_features = ((weight.out_features, weight.in_features) if packed
                                               else tuple(weight.shape))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.weight_stationary = weight_stationary
        self.int8_activations = False  # set_activations: multiply on the CPU's integer unit
        self.kernel_bias = None  # the C++ kernels write whole panels of 16 rows: their bias is padded to match
        if packed and bias is not None:
            self.kernel_bias = torch.zeros(weight.panels * 16, dtype=torch.float32)
            self.kernel_bias[: self.out_features] = bias.float()

    def int8_capable(self) -> bool:
        """Integer codes in blocks of 32 (q4_1, int4, q8_0, int8): what the int8-activation kernel reads."""
        p = self.packed
        return p is not None and p.table is None and p.in_features % 32 == 0 and p.group % 32 == 0

    def uses_q8(self) -> bool:
        """Whether this layer multiplies with int8 activations on the CPU's integer unit. Fixed per layer,
        never per batch, so a row's numerics never depend on the rows beside it."""
        return self.int8_activations and kernels.matrix_unit() != "fp32"

    def extra_repr(self) -> str:
        fmt = self.packed.fmt if self.packed is not None else str(self.weight.dtype).removeprefix("torch.")
        fmt += ", activations=int8" if self.int8_activations else ""
        return f"in={self.in_features}, out={self.out_features}, weight={fmt}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.packed
        if p is None:
            if self.weight_stationary and x.device.type == "cpu" and self.bias is None:
                return torch.mm(self.weight, x.reshape(-1, self.in_features).t()).t().reshape(*x.shape[:-1], -1)
            return F.linear(x, self.weight, self.bias)
        if x.dim() == 2 and gpu.applies(x.device):
            from services.worker.engine.layers.gpu import quant as gpu_quant

            return gpu_quant.matmul(x, p, self.bias)
        if x.dim() == 2:  # the engine's hot path
            ops = kernels.cpu_ops(x.device, x.dtype)
            if ops is not None:
                if self.uses_q8():
                    y = ops.q8_linear(x.contiguous(), p.codes, p.scales, p.mins, self.kernel_bias, p.bits, p.group,
                                      kernels.q8_unit())
                else:
                    y = ops.quant_linear(x.contiguous(), p.codes, p.scales, p.mins, p.table,
                                         self.kernel_bias, p.bits, p.group)
                return y if y.shape[1] == self.out_features else y[:, : self.out_features]
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        w = p.dequantize().to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def lm_head(weight: torch.Tensor | PackedWeight) -> Linear:
    """The vocabulary projection of every model the engines run (tokenmill's forward, transformers' over
    tokenmill's layers, transformers' own float head on a CPU: model_runner.py): weight-stationary, so on a CPU
    W @ h^T reads the large vocabulary matrix once for all rows."""
    return Linear(weight, weight_stationary=True)


class Embedding(_Packed):
    """Token embeddings; a packed table dequantises only the rows looked up."""

    def __init__(self, weight: torch.Tensor | PackedWeight) -> None:
        super().__init__()
        packed = isinstance(weight, PackedWeight)
        self.packed = weight if packed else None
        self.weight = None if packed else nn.Parameter(weight, requires_grad=False)
        self.num_embeddings = weight.out_features if packed else weight.shape[0]
        self.embedding_dim = weight.in_features if packed else weight.shape[1]
        self.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.embedding(ids, self.weight)
        p = self.packed
        ops = kernels.cpu_ops(p.codes.device, torch.float32)
        if ops is not None and ids.device.type == "cpu":  # the same values, without ~10 small torch ops a step
            rows = ops.packed_rows(ids, p.codes, p.scales, p.mins, p.table, p.bits, p.group, p.out_features,
                                   p.layout == "quad")  # float32 [ids.numel(), dim] on the CPU
            if self.dtype != torch.float32:  # builders.py: a transformers model in its dtype takes rows as they come
                rows = rows.to(self.dtype)
            return rows if ids.dim() == 1 else rows.reshape(*ids.shape, self.embedding_dim)
        rows = p.dequantize(ids.reshape(-1).to(p.codes.device))
        return rows.to(device=ids.device, dtype=self.dtype).reshape(*ids.shape, self.embedding_dim)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights (packed or float), each stored tensor once (a tied head is the embedding)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        packed = getattr(mod, "packed", None)
        if packed is not None:
            seen[id(packed.codes)] = packed.nbytes
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


ACTIVATIONS = ("fp32", "int8")


def set_activations(model: nn.Module, activations: str) -> int:
    """Choose the activation precision of `model`'s quantized layers before its first forward: "fp32" (the
    default) or "int8" (llama.cpp's Q8 activations on the CPU's integer unit; codes move to its quad layout).
    Returns how many layers multiply in int8; raises where "int8" cannot apply to any."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}: use one of {', '.join(ACTIVATIONS)}")
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    capable = [m for m in layers if m.int8_capable()]
    if activations == "fp32":
        for layer in capable:
            layer.packed.use_panels()
            layer.int8_activations = False
        return 0
    if not capable:
        raise ValueError("--activations int8 needs integer-coded weights (--quantization gguf, int8, int4)")
    if capable[0].packed.codes.device.type != "cpu":
        raise ValueError("--activations int8 runs on a CPU's integer units (AMX, VNNI, AVX2) only")
    if kernels.load() is None or kernels.matrix_unit() == "fp32":
        raise ValueError("--activations int8 needs tokenmill's C++ kernels (a CPU with AVX2, FMA and F16C, and a "
                         f"compiler; this one: {kernels.cpu_capability()}); use --activations fp32")
    for layer in capable:
        layer.packed.use_quads()
        layer.int8_activations = True
    return len(capable)
