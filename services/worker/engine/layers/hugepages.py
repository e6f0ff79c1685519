"""Weights in 2 MiB pages. A CPU decode step streams every weight once; in 4 KiB pages
each 4 KiB of the stream costs a TLB miss that neither the hardware prefetcher nor the kernels' software
prefetch hides (README, "Weights in huge pages", has the measurements). Linux transparent huge pages in
`madvise` mode (the usual default) give them to memory that asks; where THP is off or the OS has no madvise,
the arena is ordinary memory.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (always / madvise / never), or 'unavailable'."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()


def arena(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes], 2 MiB aligned, in private anonymous memory advised for huge pages."""
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(buf, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def split(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Uninitialised CPU tensors of these (shape, dtype), side by side in one arena, each on a cache line; like
    torch.empty's, their memory is only touched (and counted) once written."""
    nbytes = [math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for shape, dtype in specs]
    memory, offset, out = arena(sum(-(-n // ALIGN) * ALIGN for n in nbytes)), 0, []
    for (shape, dtype), n in zip(specs, nbytes, strict=True):
        out.append(memory[offset : offset + n].view(dtype).view(shape))
        offset += -(-n // ALIGN) * ALIGN
    return out


def _slots(model: nn.Module) -> list[tuple[object, str]]:
    """(owner, attribute) of every CPU tensor a step reads, in module order (the order a step reads them)."""
    from services.worker.engine.layers.linear import Linear, _Packed

    slots: list[tuple[object, str]] = []
    for module in model.modules():
        slots += [(p, "data") for p in module.parameters(recurse=False)]
        if isinstance(module, Linear) and module.kernel_bias is not None:
            slots.append((module, "kernel_bias"))
        if isinstance(module, _Packed) and module.packed is not None:
            slots += [(module.packed, n) for n in ("codes", "scales", "mins", "table")
                      if getattr(module.packed, n) is not None]
    return [(o, n) for o, n in slots if getattr(o, n).device.type == "cpu"]


def move_weights(model: nn.Module) -> int:
    """Copy the model's weights into one huge-page arena and point the model at the copies (tied weights stay
    tied: a tensor met twice is copied once). Returns the bytes moved."""
    slots = _slots(model)

    def key(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t.dtype, tuple(t.shape), t.stride()

    keys = [key(getattr(o, n)) for o, n in slots]  # before any is replaced: a tied tensor is met twice
    unique = {k: getattr(o, n) for k, (o, n) in zip(keys, slots, strict=True)}
    copies = dict(zip(unique, split([(tuple(t.shape), t.dtype) for t in unique.values()]), strict=True))
    for k, t in unique.items():
        copies[k].copy_(t)
    for k, (owner, name) in zip(keys, slots, strict=True):
        setattr(owner, name, copies[k])
    return sum(t.numel() * t.element_size() for t in unique.values())
