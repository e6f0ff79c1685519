"""`tokenmill bench kernels`: every linear-layer kernel this CPU could run, per layer shape and batch rows.

Shapes are the embedded model's (SmolLM2-135M, fused as tokenmill's forward runs them); each layer
shape gets `--copies` distinct weight matrices called in turn, so weights stream from memory as they do
in a real forward instead of sitting in cache. "model" = 30 x (qkv + o + gate_up + down) + lm_head.

Kernels: tokenmill's own (C++, per format, fp32 activations) against PyTorch's: fp32 F.linear and
W @ x^T on dequantised weights, bf16 F.linear, and torch's int8 / int4 weight-only kernels (which
take bf16 activations). Writes JSON (with the CPU's flags) and a Markdown table.
"""

from __future__ import annotations

import json
import math
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
                                "tokenmill-nf4", "fp32-linear", "fp32-mm-wxT", "bf16-linear", "torch-int8pack-bf16",
                                "torch-int4pack-bf16")
    out: Path = Path("results/kernels.json")


def make_kernel(name: str, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable x -> y for weight w [N, K] under kernel `name` (packing done here, outside the timing)."""
    from services.worker.engine.layers import quant
    from services.worker.engine.layers.linear import Linear

    if name.startswith("tokenmill-"):
        layer = Linear(quant.quantize(w, name.removeprefix("tokenmill-")))
        return layer.forward
    if name == "fp32-linear":
        return lambda x: F.linear(x, w)
    if name == "fp32-mm-wxT":
        return lambda x: torch.mm(w, x.t()).t()
    if name == "bf16-linear":
        wb = w.bfloat16()
        return lambda x: F.linear(x.bfloat16(), wb).float()
    if name == "torch-int8pack-bf16":
        scale = w.abs().amax(1) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        s = scale.bfloat16()
        return lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, s).float()
    if name == "torch-int4pack-bf16":
        group = 64
        g = w.reshape(w.shape[0], -1, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = torch.clamp(torch.round((g - lo[..., None]) / scale[..., None]), 0, 15).to(torch.int32).reshape(w.shape)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        zero = lo + 8 * scale  # torch's convention: w = (q - 8) * scale + zero
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, group, sz).float()
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


def main(opts: Options) -> dict:
    from bench.results import environment

    torch.manual_seed(0)
    results = []
    for name in opts.kernels:
        per_shape: dict[str, dict[int, float]] = {}
        for shape, (n, k) in SHAPES.items():
            copies = 1 if shape == "lm_head" else opts.copies
            kernel = name if shape != "lm_head" or not name.startswith("tokenmill-") else (
                "tokenmill-int8" if name == "tokenmill-int8" else "tokenmill-q8_0")  # the head stays 8-bit
            fns = [make_kernel(kernel, torch.randn(n, k) * 0.02) for _ in range(copies)]
            per_shape[shape] = {m: time_calls(fns, torch.randn(m, k), opts.repeat) for m in opts.rows}
        for m in opts.rows:
            row = {s: per_shape[s][m] for s in SHAPES}
            model = LAYERS * sum(row[s] for s in ("qkv", "o", "gate_up", "down")) + row["lm_head"]
            results.append({"kernel": name, "rows": m, "ms": row, "model_ms": model,
                            "gflops": m * 2 * (LAYERS * sum(n * k for s, (n, k) in SHAPES.items() if s != "lm_head")
                                               + math.prod(SHAPES["lm_head"])) / model / 1e6})
            print(f"{name:22s} rows {m:4d}: model {model:8.2f} ms  {results[-1]['gflops']:6.1f} GFLOP/s", flush=True)
    report = {"benchmark": "kernels", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": environment(),
              "options": {"rows": opts.rows, "copies": opts.copies, "repeat": opts.repeat}, "results": results}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    opts.out.with_suffix(".md").write_text(markdown(results, opts.rows) + "\n")
    print(markdown(results, opts.rows))
    return report


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
