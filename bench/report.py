"""What the benchmarks print and record: tables of results (the columns of `bench engine` and `bench compare`),
each run's options and the machine it ran on."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.results import Result


def environment() -> dict[str, Any]:
    """The machine and stack a result was measured on, CPU flags included (kernels are picked by them)."""
    import torch

    from services.worker.engine.layers.kernels import cpu_capability, cpu_flags

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    vector = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "cpu": model,
            "cpu_capability": cpu_capability(), "cpu_flags": vector, "load_avg": os.getloadavg()}


def options_record(opts: Any) -> dict[str, Any]:
    """A run's options (a dataclass) as the JSON records them: paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}


# ---- tables ---------------------------------------------------------------------------------------------------
def table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    """Aligned text: a header, a rule, a line per row."""
    data = [list(columns), *rows]
    widths = [max(len(x[i]) for x in data) for i in range(len(columns))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in data]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def print_row(columns: tuple[str, ...], cells: list[str]) -> None:
    """One result as it comes in: column=value pairs."""
    print("  " + " | ".join(f"{c}={v}" for c, v in zip(columns, cells, strict=True)), flush=True)


# `bench engine` (and `bench observability`): one engine through one transport at one concurrency
ENGINE_COLUMNS = ("system", "mode", "conc", "tok/s", "req/h", "TTFT p50", "TTFT p95", "lat p50", "lat p95", "RSS MiB",
                  "KV blocks used/total", "KV reserved/held")


def engine_cells(r: Result) -> list[str]:
    used, total, over = (r.extra.get(k, 0) for k in ("kv_blocks_used_peak", "kv_blocks_total", "kv_reserved_over_held"))
    return [r.system, r.transport, str(r.concurrency), f"{r.output_tok_s:.1f}", f"{r.requests_per_hour:.0f}",
            f"{r.ttft_p50_s:.2f}s", f"{r.ttft_p95_s:.2f}s", f"{r.latency_p50_s:.2f}s", f"{r.latency_p95_s:.2f}s",
            f"{r.peak_rss_mib:.0f}", f"{used}/{total}" if total else "-", f"{over:.2f}x" if over else "-"]


# `bench compare`: one system on one workload at one concurrency
COMPARE_COLUMNS = ("system", "workload", "conc", "reqs", "tok/s", "prompt tok/s", "req/h", "TTFT p50", "TTFT p95",
                   "lat p50", "lat p95", "lat p99", "peak RSS MiB", "load")


def compare_cells(r: Result) -> list[str]:
    return [r.system, r.workload, str(r.concurrency), str(r.requests), f"{r.output_tok_s:.1f}",
            f"{r.extra.get('prompt_tok_s', 0.0):.0f}", f"{r.requests_per_hour:.0f}", f"{r.ttft_p50_s:.2f}s",
            f"{r.ttft_p95_s:.2f}s", f"{r.latency_p50_s:.2f}s", f"{r.latency_p95_s:.2f}s", f"{r.latency_p99_s:.2f}s",
            f"{r.peak_rss_mib:.0f}", f"{r.load_avg_1m:.1f}"]
