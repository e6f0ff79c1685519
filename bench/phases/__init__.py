"""The seed notebook's experiments (phases 1–8) as `tokenmill bench <phase>` commands.

The engine phases (2, 3, 5, 6, 7) run the engine as the worker runs it by default: the model from
`load_engine_model` with the worker's `--quantization` / `--model-impl` / `--dtype`, a `PagedEngine` from its
engine settings (common.worker_settings: config.py's defaults, then TOKENMILL_WORKER_* variables, which the
benchmark Job's ConfigMap sets). Each records what it measured (format, forward, kernel ISA, threads) in its
JSON's "setup" and its table's caption.

`register(app)` adds one command per phase to the `tokenmill bench` typer app (bench/cli.py), plus `all` when
that app has none. Each phase module has `run(opts) -> dict` and writes <out>/<phase>.{json,png,md}.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

# phase name (as in services/k8s/jobs.py BENCH_PHASES) -> (module, one-line help)
PHASES: dict[str, tuple[str, str]] = {
    "kv-cache": ("kv_cache", "Phase 1: decode with full recomputation vs a KV cache, over output length."),
    "batching": ("batching", "Phase 2: engine tokens/s and memory vs batch size, against the measured roofs."),
    "sliding-window": ("sliding_window", "Phase 3: KV memory and time per token vs sliding-window size."),
    "attention": ("attention", "Phase 4: naive attention vs SDPA backends vs tokenmill's paged attention."),
    "paged-memory": ("paged_memory", "Phase 5: KV bytes, per-sequence max-length vs the block manager + prefix cache."),
    "speculative": ("speculative", "Phase 6: speculative decoding at batch 1, HF assisted generation vs the engine; "
                                   "the step cost behind --speculative-token-cost."),
    "quantization": ("quantization", "Phase 7: tokenmill's weight formats (none, gguf, int8, int4, int4/64, nf4): "
                                     "resident weights, PPL/KL/top-1 vs fp32, TTFT and decode tok/s at batch 1, 32."),
    "attention-variants": ("attention_variants", "Phase 8: KV bytes per token of MHA, GQA, MQA and MLA."),
}


def run_phase(name: str, opts: Any) -> dict:
    module = importlib.import_module(f"bench.phases.{PHASES[name][0]}")
    return module.run(opts)


def run_phases(names: list[str], opts: Any) -> dict[str, str]:
    """Run phases in turn; a failing phase is reported and the others still run. Returns name -> status."""
    import traceback

    status = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            run_phase(name, opts)
            status[name] = f"ok ({time.perf_counter() - t0:.0f} s)"
        except Exception as exc:  # keep going: one broken phase must not lose the others' results
            traceback.print_exc()
            status[name] = f"FAILED: {type(exc).__name__}: {exc}"
        print(f"[bench] {name}: {status[name]}  -> {Path(opts.out) / name}.{{json,png,md}}", file=sys.stderr,
              flush=True)
    return status


def make_options(quick: bool, device: str, out: Path, model: str, threads: int, phase: str) -> Any:
    import torch

    from bench.phases.common import Options, resolve_device

    dev = resolve_device(device)
    flags = (" --quick" if quick else "") + f" --device {dev}" + (f" --threads {threads}" if threads else "")
    cmd = f"tokenmill bench {phase}{flags}"  # as given: a thread count picked below shows in env.torch_threads
    if not threads and dev == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
        threads = 1  # other processes hold the cores: oversubscribed intra-op threads run many times slower
    if threads:
        torch.set_num_threads(threads)
    return Options(device=dev, quick=quick, out=Path(out), model=model, threads=threads, command=cmd)


def _command(name: str):
    import typer

    def command(
        quick: bool = typer.Option(False, "--quick", help="CPU-sized run (all phases in a few minutes)."),
        device: str = typer.Option("auto", "--device", help="cpu | cuda | auto"),
        out: Path = typer.Option(Path("results"), "--out", help="Folder for <phase>.json/.png/.md (created)."),
        model: str = typer.Option("smollm2-135m", "--model", help="Model for the phases that load one."),
        threads: int = typer.Option(0, "--threads", help="torch CPU threads; 0: default, 1 if the cores are busy."),
    ) -> None:
        opts = make_options(quick, device, out, model, threads, name)
        if name == "all":
            status = run_phases(list(PHASES), opts)
            if any(s.startswith("FAILED") for s in status.values()):
                raise typer.Exit(1)
        else:
            run_phase(name, opts)

    command.__doc__ = PHASES[name][1] if name in PHASES else "Run every phase benchmark (1–8) in turn."
    return command


def register(app: Any) -> None:
    """Add the phase commands (and `all`, unless the app defines it) to the `tokenmill bench` app."""
    existing = {c.name for c in app.registered_commands}
    for name, (_, help_text) in PHASES.items():
        if name not in existing:
            app.command(name, help=help_text)(_command(name))
    if "all" not in existing:
        app.command("all", help="Run every phase benchmark (1–8) in turn.")(_command("all"))
