"""`tokenmill bench kernels`: every linear-layer kernel this CPU could run, per layer shape and batch rows.

Shapes are the embedded model's (SmolLM2-135M, fused as tokenmill's forward runs them); each layer
shape gets `--copies` distinct weight matrices called in turn, so weights stream from memory as they do
in a real forward instead of sitting in cache; in 2 MiB pages, as the worker's (layers/hugepages.py).
"model" = 30 x (qkv + o + gate_up + down) + lm_head.

Kernels: tokenmill's own (C++, per format, fp32 activations; "-a8": int8 activations on the CPU's integer
unit, AMX, VNNI or AVX2, as the worker's --activations int8) against PyTorch's: fp32 F.linear and
W @ x^T on dequantised weights, bf16 F.linear, and torch's int8 / int4 weight-only kernels (which
take bf16 activations). Writes JSON (with the CPU's flags, lscpu's included) and a Markdown table.

Roofs: the machine's own, measured in the same run with the same threads (`roofs`): read bandwidth (a sum
over a buffer far larger than the caches: 1 GiB, 256 MiB with --quick), and the matrix rates of square
GEMMs: fp32, bf16 (oneDNN; AMX tiles where the CPU has them) and int8 (torch._int_mm, int32 accumulate),
and the issue rate of the integer units the "-a8" kernels use (VNNI, AVX2; `integer_unit_rates`).
Each kernel row gets its share of them: the weight bytes it streams per pass over the GB/s it reached
(% of the read roof), its GFLOP/s over the best matrix rate (% of the matrix roof), and which of the two
bounds it by the roofline (arithmetic intensity x read bandwidth below the matrix rate: "read", else
"matrix") with its share of that one: batch-1 decode is read-bound, prefill rows are matrix-bound.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}
LAYERS = 30


@dataclass(slots=True)
class Options:
    rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 256)
    copies: int = 8
    repeat: int = 5
    kernels: tuple[str, ...] = ("tokenmill-q4_1", "tokenmill-q8_0", "tokenmill-int4", "tokenmill-int8",
                                "tokenmill-nf4", "tokenmill-q4_1-a8", "tokenmill-q8_0-a8", "fp32-linear",
                                "fp32-mm-wxT", "bf16-linear", "torch-int8pack-bf16", "torch-int4pack-bf16")
    out: Path = Path("results/kernels.json")
    quick: bool = False  # smaller roof probes (256 MiB read, 1024^3 GEMMs)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_kernel(name: str, w: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """A callable x -> y for weight w [N, K] under kernel `name` (packing done here, outside the timing), and the
    bytes of the weight it reads (codes and scales as stored)."""
    from services.worker.engine.layers import hugepages, quant
    from services.worker.engine.layers.linear import Linear, set_activations, weight_bytes

    # every kernel's weights in 2 MiB pages, as the worker's are and as the read roof is measured
    if name.startswith("tokenmill-"):
        fmt = name.removeprefix("tokenmill-").removesuffix("-a8")
        layer = Linear(quant.quantize(w, fmt))
        if name.endswith("-a8"):  # int8 activations on the CPU's integer unit (the worker's --activations int8)
            set_activations(layer, "int8")  # before the move: the quad layout's codes are new tensors
        hugepages.move_weights(layer)
        return layer.forward, weight_bytes(layer)
    w = hugepages.split([(tuple(w.shape), w.dtype)])[0].copy_(w)
    if name == "fp32-linear":
        return (lambda x: F.linear(x, w)), nbytes(w)
    if name == "fp32-mm-wxT":
        return (lambda x: torch.mm(w, x.t()).t()), nbytes(w)
    if name == "bf16-linear":
        wb = w.bfloat16()
        return (lambda x: F.linear(x.bfloat16(), wb).float()), nbytes(wb)
    if name == "torch-int8pack-bf16":
        scale = w.abs().amax(1) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        s = scale.bfloat16()
        return (lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s).float()), nbytes(q, s)
    if name == "torch-int4pack-bf16":
        group = 64
        g = w.reshape(w.shape[0], -1, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15).to(torch.int32).reshape(w.shape)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        zero = lo + 8 * scale  # torch's convention: w = (q - 8) * scale + zero
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
        return ((lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, group, sz).float()),
                nbytes(packed, sz))
    raise ValueError(f"unknown kernel {name!r}")


def time_calls(fns: list[Callable], x: torch.Tensor, repeat: int) -> float:
    """ms per call, cycling through the weight copies (best of `repeat` passes over all of them)."""
    for f in fns:
        f(x)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for f in fns:
            f(x)
        best = min(best, (time.perf_counter() - t) / len(fns))
    return best * 1e3


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def roofs(quick: bool = False, repeat: int = 5) -> dict:
    """This machine's roofs with this process's threads: read bandwidth (torch.sum over a buffer far larger than
    the caches) and the matrix rates of square GEMMs per element type (int8: torch._int_mm, where torch offers it
    on this CPU); the best of `repeat` runs each. Rates in FLOP/s (int8: multiply-adds x 2 as well)."""
    from services.worker.engine.layers.hugepages import thp_mode

    numel = (64 if quick else 256) * 2**20  # float32: 256 MiB / 1 GiB
    read = read_rate(numel, repeat)
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates: dict[str, float] = {"float32": 2 * n**3 / best_seconds(lambda: a @ b, repeat)}
    sizes, notes = {"float32": n}, {}
    a8, b8 = torch.randint(-127, 128, (n, n), dtype=torch.int8), torch.randint(-127, 128, (n, n), dtype=torch.int8)
    gemms = {"bfloat16": (a.bfloat16(), b.bfloat16(), torch.matmul), "int8": (a8, b8, getattr(torch, "_int_mm", None))}
    for name, (x, y, mm) in gemms.items():
        try:
            rates[name], sizes[name] = gemm_rate(mm, x, y, repeat)
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            notes[name] = f"no {name} GEMM in torch on this CPU: {type(exc).__name__}: {str(exc)[:200]}"
    rates.update(integer_unit_rates(repeat, notes))
    best = max(rates, key=rates.__getitem__)
    return {"read_bytes_per_s": read, "read_buffer_MiB": numel * 4 / 2**20, "transparent_huge_pages": thp_mode(),
            "matmul_n": sizes, "matmul_flops": rates,
            "best_matrix": best, "best_matrix_flops": rates[best], "notes": notes, "threads": torch.get_num_threads()}


def read_rate(numel: int = 256 * 2**20, repeat: int = 5) -> float:
    """Bytes/s of torch.sum over `numel` float32 (1 GiB: far larger than the caches), the best of `repeat`. The
    buffer is in 2 MiB pages, as the engine's weights are (hugepages.py): in 4 KiB pages the same sum reads
    ~13 % slower on Zen 4 (25.9 vs 29.8 GB/s), and that would be the TLB's roof, not the memory's."""
    from services.worker.engine.layers import hugepages

    buf = hugepages.split([((numel,), torch.float32)])[0].fill_(1.0)
    return buf.nbytes / best_seconds(buf.sum, repeat)


def gemm_rate(mm: Callable, a: torch.Tensor, b: torch.Tensor, repeat: int) -> tuple[float, int]:
    """FLOP/s of mm over a and b (square), and the size that measured it: a GEMM the CPU runs in emulation
    (bf16 without avx512_bf16 / AMX, int8 without VNNI: ~0.2-1 GFLOP/s, minutes at 2048) is timed at 512:
    seconds, and a rate that stays far below every real roof whatever the size."""
    n = a.shape[0]
    small = 2 * 256**3 / best_seconds(lambda: mm(a[:256, :256], b[:256, :256]), 1)
    if 2 * n**3 / small > 2.0:
        n = 512
    x, y = a[:n, :n].contiguous(), b[:n, :n].contiguous()
    return 2 * n**3 / best_seconds(lambda: mm(x, y), repeat), n


def integer_unit_rates(repeat: int, notes: dict) -> dict[str, float]:
    """The issue rate of tokenmill's integer units other than AMX (kernels' q8_peak: 8 independent dot-product
    instructions a round on register data, every thread): what the "-a8" kernels could reach, where no library
    GEMM uses the unit (torch's int8 GEMM on an AVX2 CPU is a reference loop). AMX's tile rate is not probed:
    bf16 GEMM (oneDNN on the tiles) stands for it."""
    from services.worker.engine.layers import kernels

    ops = kernels.load()
    if ops is None:
        return {}
    rates, iters = {}, 2_000_000
    for unit in ("vnni", "avx2"):
        if unit in ops.q8_units().split(","):
            code = kernels.q8_unit(unit)
            macs = ops.q8_peak(code, iters)
            rates[f"int8-{unit}"] = 2 * macs / best_seconds(lambda c=code: ops.q8_peak(c, iters), repeat)
    if "amx" in ops.q8_units().split(","):
        notes["int8-amx"] = "AMX tile rate not probed: bf16 GEMM (oneDNN on the tiles) stands for it"
    return rates


def shares(flops: float, weight_bytes: int, seconds: float, roof: dict) -> dict:
    """A kernel pass's rates and its share of the roofs (see the module's docstring)."""
    read, best = roof["read_bytes_per_s"], roof["best_matrix_flops"]
    intensity = flops / weight_bytes
    bound = "read" if intensity * read < best else "matrix"
    return {"weight_bytes": weight_bytes, "gb_s": weight_bytes / seconds / 1e9,
            "pct_read_roof": 100 * weight_bytes / seconds / read, "pct_matrix_roof": 100 * flops / seconds / best,
            "flops_per_byte": intensity, "bound": bound,
            "pct_roof": 100 * flops / seconds / min(best, intensity * read)}


def lscpu() -> dict:
    """lscpu's model name and full flag list (environment() keeps only the vector ones); /proc/cpuinfo without it."""
    fields: dict[str, str] = {}
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}
    else:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                fields.setdefault({"flags": "Flags", "model name": "Model name"}.get(k.strip(), k.strip()), v.strip())
    return {"model": fields.get("Model name", ""), "flags": fields.get("Flags", "").split()}


def main(opts: Options) -> dict:
    from bench.report import environment
    from services.worker.engine.layers.kernels import matrix_unit

    torch.manual_seed(0)
    roof = roofs(quick=opts.quick)
    print(roofs_line(roof), flush=True)
    results = []
    for name in opts.kernels:
        if name.endswith("-a8") and matrix_unit() == "fp32":
            print(f"{name}: skipped: int8 activations need tokenmill's C++ kernels, which did not build here")
            continue
        per_shape: dict[str, dict[int, float]] = {}
        shape_bytes: dict[str, int] = {}
        for shape, (n, k) in SHAPES.items():
            copies = 1 if shape == "lm_head" else opts.copies
            kernel = name  # the head stays 8-bit
            if shape == "lm_head" and name.startswith("tokenmill-"):
                head = "tokenmill-int8" if name == "tokenmill-int8" else "tokenmill-q8_0"
                kernel = head + ("-a8" if name.endswith("-a8") else "")
            made = [make_kernel(kernel, torch.randn(n, k) * 0.02) for _ in range(copies)]
            shape_bytes[shape] = made[0][1]
            per_shape[shape] = {m: time_calls([f for f, _ in made], torch.randn(m, k), opts.repeat)
                                for m in opts.rows}
        model_bytes = LAYERS * sum(shape_bytes[s] for s in SHAPES if s != "lm_head") + shape_bytes["lm_head"]
        for m in opts.rows:
            row = {s: per_shape[s][m] for s in SHAPES}
            model = LAYERS * sum(row[s] for s in ("qkv", "o", "gate_up", "down")) + row["lm_head"]
            flops = m * 2 * (LAYERS * sum(n * k for s, (n, k) in SHAPES.items() if s != "lm_head")
                             + math.prod(SHAPES["lm_head"]))
            results.append({"kernel": name, "rows": m, "ms": row, "model_ms": model, "gflops": flops / model / 1e6,
                            **shares(flops, model_bytes, model / 1e3, roof)})
            r = results[-1]
            print(f"{name:22s} rows {m:4d}: model {model:8.2f} ms  {r['gflops']:6.1f} GFLOP/s  {r['gb_s']:5.1f} GB/s"
                  f"  {r['pct_roof']:5.1f} % of the {r['bound']} roof", flush=True)
    env = environment()
    env["lscpu"] = lscpu()
    env["int8_unit"] = matrix_unit()  # the "-a8" kernels' unit
    report = {"benchmark": "kernels", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": env,
              "options": {"rows": opts.rows, "copies": opts.copies, "repeat": opts.repeat, "quick": opts.quick},
              "roofs": roof, "results": results}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    text = "\n\n".join((roofs_line(roof), markdown(results, opts.rows), roof_table(results, opts.rows)))
    opts.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return report


def roofs_line(roof: dict) -> str:
    sizes = roof["matmul_n"]

    def how(k: str) -> str:
        n = sizes.get(k) if isinstance(sizes, dict) else sizes
        return f"GEMM {n}^3" if n else "issue rate"

    rates = ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s ({how(k)})" for k, v in roof["matmul_flops"].items())
    return (f"Roofs ({roof['threads']} threads): read {roof['read_bytes_per_s'] / 1e9:.1f} GB/s "
            f"(torch.sum over {roof['read_buffer_MiB']:.0f} MiB in 2 MiB pages, THP "
            f"{roof['transparent_huge_pages']}); {rates}; "
            f"best matrix rate: {roof['best_matrix']}" + "".join(f"; {v}" for v in roof["notes"].values()))


def roof_table(results: list[dict], rows: tuple[int, ...]) -> str:
    """Each kernel's share of the roof that bounds it (R: read bandwidth, M: the best matrix rate)."""
    by = {(r["kernel"], r["rows"]): r for r in results}
    kernels = list(dict.fromkeys(r["kernel"] for r in results))
    lines = ["| % of roof (R read, M matrix) | " + " | ".join(f"{m} rows" for m in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for k in kernels:
        cells = [f"{by[(k, m)]['pct_roof']:.0f} % {by[(k, m)]['bound'][0].upper()}" for m in rows]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: list[dict], rows: tuple[int, ...]) -> str:
    """Model ms per kernel (rows) x batch rows (columns); the best per column in bold."""
    kernels = list(dict.fromkeys(r["kernel"] for r in results))
    ms = {(r["kernel"], r["rows"]): r["model_ms"] for r in results}
    lines = ["| kernel | " + " | ".join(f"{m} rows" for m in rows) + " |", "|---|" + "---|" * len(rows)]
    for k in kernels:
        cells = []
        for m in rows:
            best = min(ms[(x, m)] for x in kernels)
            cells.append(f"**{ms[(k, m)]:.1f}**" if ms[(k, m)] == best else f"{ms[(k, m)]:.1f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
