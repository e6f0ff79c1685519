"""tokenmill's CUDA kernels, written in Triton: paged attention (attention.py), dequantising GEMV/GEMM over
the packed weight formats (quant.py) and the decoder's fused small ops (elementwise.py).

They run on a CUDA device, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, numpy), which
is how the tests and `python -m bench.gpu --dry-run` check them without a GPU: inside `on_cpu()` the engine
takes the Triton path on the CPU too (`applies`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_on_cpu = False
_disabled = False


def interpret() -> None:
    """Run Triton kernels with the interpreter (numpy, on the CPU). Must precede the first import of a kernel
    module: `triton.jit` reads TRITON_INTERPRET when it wraps a kernel."""
    os.environ["TRITON_INTERPRET"] = "1"
    _patch_interpreter()


@contextmanager
def on_cpu() -> Iterator[None]:
    """Inside: the engine built and run on a CPU takes the Triton path (KV layout, attention, GEMM, fused ops)
    through the interpreter."""
    global _on_cpu
    interpret()
    _on_cpu = True
    try:
        yield
    finally:
        _on_cpu = False
_disabled = False


@contextmanager
def disabled() -> Iterator[None]:
    """Inside: the PyTorch versions of the small ops and linear layers, whatever the device (references)."""
    global _disabled
    before, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = before


def applies(device: torch.device) -> bool:
    """The Triton kernels serve this device: CUDA with Triton installed, or the CPU inside on_cpu()."""
    if _disabled:
        return False
    if device.type == "cuda":
        return available()
    return _on_cpu and device.type == "cpu"


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; under the interpreter a few, so that grids stay small (it runs
    programs one by one) yet split-K and split-context paths still run."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.cache
def _patch_interpreter() -> None:
    """Three gaps of Triton 3.6's interpreter, filled here (the GPU compiler has neither):
    - a scalar becomes an int through int(one-element array), which numpy >= 2.4 refuses ("only
      0-dimensional arrays can be converted"): loops with run-time bounds fail;
    - bfloat16 lives in numpy as its raw uint16 bits and tl.dot multiplies those bits: bf16 operands are
      widened to float32 first (exact), as the tensor cores do. The kernels keep other bf16 math in fp32;
    - float32 -> bfloat16 truncates; the GPU (and torch) round to nearest even, as it does here now."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            bits = x.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
            rounded = np.where(np.isnan(src.data), np.uint32(0x7FC0), rounded)
            return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl
