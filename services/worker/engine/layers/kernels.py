"""tokenmill's own CPU kernels (csrc/): compiled once per CPU and torch version, cached on disk, loaded lazily.

The build uses -march=native, so the cache key includes the CPU's flags: a machine with AVX-512 and
one with only AVX2 each get their own build. Without a compiler, or on a CPU without AVX2/FMA/F16C,
`load()` returns None and callers use their pure-PyTorch path.

Builds are serialised by an flock on a file beside the build directory: the OS drops it when its holder
dies, so a worker killed mid-build never wedges the next start. torch's own lock file, which a killed
build leaves behind, is removed (with a log line) by whoever holds the flock.

With int8 activations, quantized layers multiply on the best integer unit the CPU has (`matrix_unit`):
AMX tiles where the CPU lists them and a probe in a subprocess proves the OS grants them, else
AVX512-VNNI, else AVX2 (VPMADDUBSW). All compute the same exact integer sums, so the choice never
changes a result.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("tokenmill.kernels")
CSRC = Path(__file__).parent / "csrc"
SOURCES = ("bindings.cpp", "quant_gemm.cpp", "q8_gemm.cpp", "q8_avx2.cpp", "attention.cpp", "elementwise.cpp",
           "decoder.cpp", "parallel.cpp", "embedding.cpp")
HEADERS = ("simd.h", "ops.h", "decoder.h", "q8.h", "parallel.h")
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
    from services.common.config import cache_dir

    key = _build_key()
    build_dir = cache_dir() / "kernels" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # pip's ninja
    try:
        from torch.utils.cpp_extension import load as load_extension

        # -ffp-contract=off: no FMA the source did not ask for (the fp32 ops round as transformers' do)
        flags = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
        with build_lock(build_dir):
            module = load_extension(name=f"tokenmill_kernels_{key}", sources=[str(CSRC / s) for s in SOURCES],
                                    extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(build_dir))
    except Exception as exc:  # no compiler, no headers: fall back, loudly
        log.warning("could not build tokenmill's CPU kernels (%s); using the slower PyTorch path", exc)
        return None
    log.info("CPU kernels: %s build %s", module.isa(), key)
    return module


class build_lock:
    """An exclusive flock on `<build_dir>.lock` for the duration of a build or load. torch's FileBaton (a
    `lock` file inside the directory) waits forever on a file a killed build left: holding the flock
    proves no live process is building, so such a file is stale and removed."""

    def __init__(self, build_dir: Path) -> None:
        self.build_dir = build_dir
        self.fd = -1

    def __enter__(self) -> build_lock:
        self.fd = os.open(f"{self.build_dir}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building the CPU kernels in %s: waiting for it", self.build_dir)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        stale = self.build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a kernel build that was killed", stale)
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the flock


AMX_MIN_ROWS = 16  # fewer rows than one tile: VNNI is faster (bench kernels); the bits are the same


UNITS = ("amx", "vnni", "avx2")  # best first


@functools.cache
def matrix_unit() -> str:
    """The unit int8-activation layers multiply on here: "amx", "vnni", "avx2" or "fp32" (no kernels);
    TOKENMILL_MATMUL forces one."""
    ops = load()
    units = ops.q8_units().split(",") if ops is not None else []
    forced = os.environ.get("TOKENMILL_MATMUL", "auto")
    if forced not in ("auto", *UNITS, "fp32"):
        raise ValueError(f"TOKENMILL_MATMUL={forced!r}: choose auto, {', '.join(UNITS)} or fp32")
    if forced != "auto":
        if forced != "fp32" and forced not in units:
            raise ValueError(f"TOKENMILL_MATMUL={forced}: this CPU's kernel build has {units or 'no integer unit'}")
        if forced == "amx" and not ops.amx_enable():
            raise ValueError("TOKENMILL_MATMUL=amx: the OS does not grant the AMX tile state")
        unit = forced
    elif "amx" in units and amx_works() and ops.amx_enable():
        unit = "amx"
    else:
        unit = next((u for u in units if u != "amx"), "fp32")
    log.info("quantized matmul unit: %s (this build has %s)", unit, ",".join(units) or "fp32 only")
    return unit


def q8_unit(unit: str | None = None) -> int:
    """The C++ q8_linear's unit argument for `unit` (default: matrix_unit()): AMX tiles from AMX_MIN_ROWS
    rows (VNNI below), 0 for VNNI, -1 for AVX2."""
    return {"amx": AMX_MIN_ROWS, "vnni": 0, "avx2": -1}[unit or matrix_unit()]


_PROBE = """
import torch
from services.worker.engine.layers import kernels, quant
ops = kernels.load()
assert ops.amx_enable(), "tile state not granted"
torch.manual_seed(0)
w = quant.quantize(torch.randn(32, 64), "q8_0").use_quads()
x = torch.randn(20, 64)
amx = ops.q8_linear(x, w.codes, w.scales, None, None, 8, 32, 1)
vnni = ops.q8_linear(x, w.codes, w.scales, None, None, 8, 32, 0)
assert torch.equal(amx, vnni), "AMX and VNNI disagree"
"""


@functools.cache
def amx_works() -> bool:
    """Run an AMX tile product in a subprocess (a CPU can list AMX where the tile unit faults); the verdict
    is cached beside the build, per boot."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown"
    from services.common.config import cache_dir

    verdict = cache_dir() / "kernels" / f"{_build_key()}.amx-{boot}"
    if verdict.exists():
        return verdict.read_text() == "ok"
    root = Path(__file__).resolve().parents[4]
    run = subprocess.run([sys.executable, "-c", _PROBE], cwd=root, capture_output=True, text=True, timeout=300)
    ok = run.returncode == 0
    if not ok:
        log.warning("the CPU lists AMX but a tile product failed (exit %s: %s): using VNNI", run.returncode,
                    (run.stderr.strip().splitlines() or ["no output"])[-1])
    if ok or run.returncode < 0:  # a signal (SIGSEGV, SIGILL) is the machine's verdict; an error is not cached
        verdict.write_text("ok" if ok else f"failed: signal {-run.returncode}")
    return ok


def cpu_ops(device: torch.device, dtype: torch.dtype) -> Any | None:
    """The compiled ops where they apply (float32 on a CPU), else None: the PyTorch path."""
    return load() if device.type == "cpu" and dtype == torch.float32 else None


def attention_fits(head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """Shapes the C++ paged attention takes: head_dim in whole AVX-512 vectors, whole query groups per KV head."""
    return head_dim % 16 == 0 and num_heads % num_kv_heads == 0
