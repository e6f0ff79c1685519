"""tokenmill's own CPU kernels (csrc/): compiled once per CPU and torch version, cached on disk, loaded lazily.

The build uses -march=native, so the cache key includes the CPU's flags: a machine with AVX-512 and
one with only AVX2 each get their own build. Without a compiler, or on a CPU without AVX2/FMA/F16C,
`load()` returns None and callers use their pure-PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("tokenmill.kernels")
CSRC = Path(__file__).parent / "csrc"
SOURCES = ("bindings.cpp", "quant_gemm.cpp", "attention.cpp", "elementwise.cpp", "decoder.cpp")
HEADERS = ("simd.h", "ops.h", "decoder.h")
NEEDED_FLAGS = {"avx2", "fma", "f16c"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_capability() -> str:
    """The widest vector ISA the kernels use here: avx512_bf16, avx512, avx2 or none."""
    flags = cpu_flags()
    if "avx512f" in flags and "avx512bw" in flags:
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2" if flags >= NEEDED_FLAGS else "none"


def _build_key() -> str:
    import torch

    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(sorted(cpu_flags())).encode())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {platform.machine()}".encode())
    return h.hexdigest()[:16]


@functools.cache
def load() -> Any | None:
    """The compiled extension module, or None (kernels disabled, unsupported CPU, or no compiler)."""
    if os.environ.get("TOKENMILL_KERNELS", "on") == "off":
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not cpu_flags() >= NEEDED_FLAGS:
        log.info("no AVX2/FMA/F16C: quantized layers use the PyTorch path")
        return None
    from services.common.model_loader import cache_dir

    key = _build_key()
    build_dir = cache_dir() / "kernels" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # pip's ninja
    try:
        from torch.utils.cpp_extension import load as load_extension

        # -ffp-contract=off: no FMA the source did not ask for (the fp32 ops round as transformers' do)
        flags = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
        module = load_extension(name=f"tokenmill_kernels_{key}", sources=[str(CSRC / s) for s in SOURCES],
                                extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(build_dir))
    except Exception as exc:  # no compiler, no headers: fall back, loudly
        log.warning("could not build tokenmill's CPU kernels (%s); using the slower PyTorch path", exc)
        return None
    log.info("CPU kernels: %s build %s", module.isa(), key)
    return module


def cpu_ops(device: torch.device, dtype: torch.dtype) -> Any | None:
    """The compiled ops where they apply (float32 on a CPU), else None: the PyTorch path."""
    return load() if device.type == "cpu" and dtype == torch.float32 else None


def attention_fits(head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """Shapes the C++ paged attention takes: head_dim in whole AVX-512 vectors, at most 8 query heads per KV head."""
    return head_dim % 16 == 0 and num_heads // num_kv_heads <= 8
