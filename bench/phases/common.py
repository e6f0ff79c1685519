"""Shared helpers of the phase benchmarks: options, model loading, timing, peak memory, result files.

Every phase is `run(opts) -> dict` and ends in `write_results`, which writes <out>/<phase>.json (config,
environment, rows, summary), <out>/<phase>.png and <out>/<phase>.md (the table the results page shows).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA = 2  # 2: "setup" (format, forward, kernels, threads) added


@dataclass
class Options:
    device: str = "cpu"  # cpu | cuda (auto resolved by the CLI)
    quick: bool = False  # CPU-sized: every phase in well under a minute on a laptop
    out: Path = Path("results")
    model: str = "smollm2-135m"
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    command: str = ""  # how the run was started, for the results page
    extra: dict[str, Any] = field(default_factory=dict)  # per-phase overrides (tests use tiny sizes)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def pick(self, quick: Any, full: Any, key: str | None = None) -> Any:
        """A size: the test's override if given, else the quick or the full value."""
        if key is not None and key in self.extra:
            return self.extra[key]
        return quick if self.quick else full


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}: use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device (CPU-only torch wheel or no GPU)")
    return device


# ---- timing and memory -------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], device: str, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeat` runs after `warmup` runs (device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak memory while the block runs: the CUDA allocator's peak on a GPU; on CPU the process RSS sampled
    every millisecond by a thread. `peak` is absolute, `delta` is peak minus the value at entry."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self.delta, self.base = device, 0, 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.base


@contextlib.contextmanager
def quiet_stderr():
    """Silence fd 2 (the profiler's C++ start/stop lines) for the duration; Python errors still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensor_peak_bytes(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes of tensors fn() allocates beyond what exists at entry. CUDA: the allocator's peak.
    CPU: replays the allocations and frees recorded by torch.profiler (profile_memory) in time order."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = []
    for ev in prof.events():
        if ev.name == "[memory]":
            deltas.append((ev.time_range.start, ev.cpu_memory_usage))
        elif ev.self_cpu_memory_usage > 0:
            deltas.append((ev.time_range.start, ev.self_cpu_memory_usage))
    cur = peak = 0
    for _, b in sorted(deltas, key=lambda d: d[0]):
        cur += b
        peak = max(peak, cur)
    return peak


def ops_that_ran(fn: Callable[[], Any], needle: str = "scaled_dot_product") -> list[str]:
    """The aten ops whose names contain `needle` when fn() runs: tells which SDPA kernel actually ran."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with quiet_stderr(), profile(activities=acts) as prof:
        fn()
    names = []
    for ev in prof.events():
        if needle in ev.name and ev.name not in names:
            names.append(ev.name)
    return names


# ---- the model ----------------------------------------------------------------------------------
_MODELS: dict[tuple, Any] = {}


def load(opts: Options, quantization: str = "none", dtype: str = "auto") -> Any:
    """The benchmark model through tokenmill's own loader (cached per process), in eager/SDPA attention."""
    from services.worker.engine.models.engine_model import load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    key = (opts.model, quantization, opts.device, dtype)
    if key not in _MODELS:
        _MODELS[key] = load_model(opts.model, quantization, opts.device, dtype)
    lm = _MODELS[key]
    sdpa(lm.model)
    return lm


# ---- the engine as the worker runs it -------------------------------------------------------------
# The worker settings that shape an engine phase's engine; the benchmark Job's ConfigMap
# (k8s/jobs/base/bench-config.yaml) carries exactly these, at config.py's defaults (a test holds it).
ENGINE_SETTINGS = ("quantization", "activations", "dtype", "model_impl", "block_size", "kv_cache_memory",
                   "max_num_batched_tokens", "max_num_seqs", "max_model_len", "prefix_cache", "enforce_eager",
                   "max_waiting_steps", "speculative", "num_speculative_tokens", "draft_layers",
                   "speculative_max_batch", "speculative_min_acceptance", "speculative_token_cost")


def bench_config_data() -> dict[str, str]:
    """The benchmark Job ConfigMap's data: ENGINE_SETTINGS as TOKENMILL_WORKER_* at config.py's defaults."""
    from services.k8s.settings import settings

    data = settings("worker")
    return {k: data[k] for k in (f"TOKENMILL_WORKER_{n.upper()}" for n in ENGINE_SETTINGS)}


def worker_settings(**overrides: Any) -> Any:
    """The worker's settings: config.py's defaults, then TOKENMILL_WORKER_* variables (the benchmark Job's
    ConfigMap sets them in a cluster), then `overrides`. Every engine phase builds from these."""
    from services.common.config import WorkerConfig, from_env

    return from_env(WorkerConfig, "worker", **overrides)


def load_engine(opts: Options, quantization: str | None = None, model_impl: str | None = None) -> Any:
    """The paged engine's model as the worker loads it (`--quantization`, `--model-impl`, `--dtype` from
    worker_settings unless given), cached per process."""
    from services.worker.engine.models.engine_model import load_engine_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cfg = worker_settings()
    quant, impl = quantization or cfg.quantization, model_impl or cfg.model_impl
    key = ("engine", opts.model, quant, impl, opts.device, cfg.dtype, cfg.activations)
    if key not in _MODELS:
        _MODELS[key] = load_engine_model(opts.model, quant, opts.device, cfg.dtype, impl, cfg.activations)
    return _MODELS[key]


def is_native(model: Any) -> bool:
    """tokenmill's own forward (services/worker/engine/models), not transformers' modules."""
    return type(model).__module__.startswith("services.worker.engine.models")


def kernel_isa(device: str, dtype: Any, activations: str = "fp32") -> str:
    """Which kernels a step runs on: tokenmill's C++ build (its ISA; the integer unit where the quantized layers
    take int8 activations), Triton, PyTorch."""
    if device.startswith("cuda"):
        return "Triton (CUDA)"
    from services.worker.engine.layers import kernels

    ops = kernels.cpu_ops(torch.device(device), dtype)
    if ops is None:
        return "PyTorch (no C++ kernels for this dtype / CPU)"
    isa = f"C++ {ops.isa()}"
    if activations == "int8":
        isa += f", int8 activations on {kernels.matrix_unit()}"
    return isa


def setup_of(lm: Any = None, *, fmt: str | None = None, forward: str | None = None, kernels: str | None = None,
             device: str = "cpu", dtype: Any = torch.float32) -> dict[str, Any]:
    """The configuration a phase measured: weight format, forward, kernel ISA, threads (JSON and caption)."""
    if lm is not None:
        device, dtype = str(lm.device), lm.dtype
        fmt = fmt or lm.quantization
        if device.startswith("cuda") and fmt == "none" and kernels is None:
            kernels = "cuBLAS (float weights), Triton paged attention"
        forward = forward or ("native (tokenmill's forward, paged engine)" if is_native(lm.model)
                              else "transformers' modules")
    return {"format": fmt or "n/a", "forward": forward or "n/a",
            "kernels": kernels or kernel_isa(device, dtype, getattr(lm, "activations", "fp32")),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}


def caption(setup: dict[str, Any]) -> str:
    return (f"format {setup['format']}, forward {setup['forward']}, kernels {setup['kernels']}, "
            f"{setup['dtype']}, {setup['threads']} threads")


def make_engine(lm: Any, **overrides: Any) -> Any:
    """A warmed-up PagedEngine built from the worker's settings (engine_options), with `overrides`."""
    from services.worker.engine.build import engine_options
    from services.worker.engine.paged_engine import PagedEngine

    kw = engine_options(worker_settings())
    kw.update(overrides)
    engine = PagedEngine(lm.model, lm.tokenizer, **kw)
    engine.warmup()
    return engine


def run_requests(engine: Any, prompts: list[list[int]], new_tokens: int, device: str) -> dict[str, Any]:
    """All prompts at once, greedy, `ignore_eos`, stepped to the end. Returns the seconds to each request's
    first token, the steps in which every sequence decoded (seconds, tokens), prefill seconds, KV blocks peak."""
    from services.common.sampling import SamplingParams
    from services.worker.engine.types import Request

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        engine.add_request(Request(rid, p, params))
    bm, sch = engine.block_manager, engine.scheduler
    first: dict[str, float] = {}
    decode: list[tuple[float, int]] = []
    prefill_s, used_peak, out_tokens, ctx = 0.0, 0, 0, 0
    t_start = time.perf_counter()
    while engine.has_work():
        pure = not sch.waiting and all(s.num_computed_tokens == s.num_tokens - 1 for s in sch.running)
        n = len(sch.running)
        t0 = time.perf_counter()
        events = engine.step()
        sync(device)
        t1 = time.perf_counter()
        used_peak = max(used_peak, bm.num_blocks - bm.num_free_blocks)
        got = sum(len(e.token_ids) for e in events)
        out_tokens += got
        for e in events:
            if e.token_ids and e.request_id not in first:
                first[e.request_id] = t1 - t_start
        if pure and n == len(prompts) and got == n:
            decode.append((t1 - t0, n))
            ctx = max(s.num_tokens for s in sch.running) if sch.running else ctx
        else:
            prefill_s += t1 - t0
    total = time.perf_counter() - t_start
    per_block = engine.runner.kv_bytes // engine.runner.num_blocks
    return {"ttft": [first[r] for r in ids if r in first], "decode": decode, "prefill_s": prefill_s,
            "total_s": total, "out_tokens": out_tokens, "kv_used_bytes": used_peak * per_block,
            "ctx": ctx or max(len(p) for p in prompts) + new_tokens}


def text_prompts(tokenizer: Any, batch: int, length: int, vocab_size: int = 0) -> list[list[int]]:
    """`batch` distinct prompts of `length` tokens cut from the held-out text (ids folded into `vocab_size`
    when given: a tiny test model with a smaller vocabulary)."""
    ids = tokenizer(heldout_text())["input_ids"]
    ids = [i % vocab_size for i in ids] if vocab_size else ids
    return [[ids[(i * 7 + j) % len(ids)] for j in range(length)] for i in range(batch)]


def roofs(device: str, quick: bool) -> dict[str, Any]:
    """This machine's measured roofs in this process, with the engine's threads: on a CPU the probes of
    `tokenmill bench kernels` (bench.kernels.roofs: read bandwidth of torch.sum over a buffer far larger than
    the caches; fp32, bf16 and int8 GEMM, the best rate counts); on CUDA the same two probes on the device."""
    if not device.startswith("cuda"):
        from bench.kernels import roofs as cpu_roofs

        return cpu_roofs(quick)
    buf = torch.ones(256 * 2**20, device=device, dtype=torch.float32)
    read = buf.nbytes / timeit(buf.sum, device, repeat=5)
    buf = None  # free it before the matrices
    n, rates = 8192, {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        rates[str(dtype).removeprefix("torch.")] = 2 * n**3 / timeit(lambda a=a, b=b: a @ b, device, repeat=5)
    best = max(rates, key=rates.__getitem__)
    return {"read_bytes_per_s": read, "read_buffer_MiB": 1024.0, "matmul_n": n, "matmul_flops": rates,
            "best_matrix": best, "best_matrix_flops": rates[best], "notes": {}, "threads": torch.get_num_threads()}


def sdpa(model: Any) -> None:
    """Undo the paged engine's attention hook (PagedEngine installs it on the model it is given)."""
    if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        model.set_attn_implementation("sdpa")


def param_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def heldout_text() -> str:
    return (Path(__file__).resolve().parents[1] / "data" / "heldout.txt").read_text()


# ---- result files --------------------------------------------------------------------------------
def env_info(opts: Options) -> dict[str, Any]:
    import transformers

    if opts.cuda:
        dev_name = torch.cuda.get_device_name()
    else:
        dev_name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    dev_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "device": opts.device,
        "device_name": dev_name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
        "load_avg_1m": round(load1, 2) if load1 is not None else None,
        "shared_machine": bool(load1 is not None and load1 > 0.5 * (os.cpu_count() or 1) + 1.0),
        "quick": opts.quick, "model": opts.model,
    }


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not isinstance(value, bool):
        if value != value:
            return "n/a"  # NaN
        return f"{value:,.0f}" if 100 <= abs(value) < 1e6 else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(phase: str, title: str, opts: Options, *, config: dict[str, Any], rows: list[dict[str, Any]],
                  columns: Sequence[str], summary: dict[str, Any], plot: Callable[[Any], None],
                  notes: Sequence[str] = (), tables: dict[str, tuple[list[dict], Sequence[str]]] | None = None,
                  table_rows: list[dict[str, Any]] | None = None, setup: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Write <out>/<phase>.json, .png and .md; return the JSON document. The Markdown's main table shows
    `table_rows` (a pivot, say) when given, else `rows`; `tables` are extra (name -> rows, columns) tables;
    `setup` (setup_of) is the configuration measured: it goes into the JSON and the table's caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    opts_doc = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}
    doc = {"schema": SCHEMA, "phase": phase, "title": title, "options": opts_doc, "env": env_info(opts),
           "setup": setup or {}, "config": config, "rows": rows, "summary": summary, "notes": list(notes)}
    if tables:
        doc["tables"] = {name: r for name, (r, _) in tables.items()}
    (out / f"{phase}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")

    fig = plt.figure(figsize=(11, 4.2))
    plot(fig)
    fig.suptitle(f"{title} — {doc['env']['device_name']}{' (quick)' if opts.quick else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{phase}.png", dpi=90)
    plt.close(fig)

    env = doc["env"]
    md = [f"### {title}", "",
          f"`{opts.command or f'tokenmill bench {phase}'}` — {env['date']}, {env['device_name']}, "
          f"torch {env['torch']}, {env['torch_threads']} threads"
          + (f", load average {env['load_avg_1m']} (shared machine: timings are noisy)"
             if env["shared_machine"] else "")
          + (f". Measured: {caption(setup)}" if setup else ""), "",
          markdown_table(table_rows if table_rows is not None else rows, columns), ""]
    for name, (trows, tcols) in (tables or {}).items():
        md += [f"**{name}**", "", markdown_table(trows, tcols), ""]
    md += [f"- **{k}**: {fmt(v)}" for k, v in summary.items()]
    md += [f"- {n}" for n in notes]
    md += ["", f"![{phase}]({phase}.png)", ""]
    (out / f"{phase}.md").write_text("\n".join(md))
    return doc
