"""`tokenmill bench activations`: the worker's --activations fp32 vs int8, side by side in one run.

Per weight format (default: the worker's own on a CPU, `gguf`) and activation precision, the paged engine as
the worker builds it (`load_engine_model`, `make_engine`), interleaved over `--repeat` rounds (a shared CPU
slows whichever runs during a burst: the best round counts):
- prefill: one `--prompt-len`-token prompt alone, time to its first token -> prompt tokens/s and GFLOP/s
  (2 x weights' multiply-adds per token; attention not counted), against the best matrix roof measured in
  the same run (`bench kernels`' probes: fp32, bf16 and int8 GEMMs; bf16 where the CPU has AMX or avx512_bf16);
- decode at batch 1 and 32 (32-token prompts): tokens/s over the steps in which every sequence decodes, and at
  batch 1 the weight bytes read per second against the read-bandwidth roof: the best roof of the run, and per
  round the mean of the roofs read just before and after it (the median of those pairs in the table).
With `--kv-cache-dtype auto,float16,bfloat16` every configuration also runs with the worker's 16-bit KV caches.
The JSON carries lscpu's model and flags, the kernels' ISA and the integer unit (AMX or VNNI).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(slots=True)
class Options:
    formats: tuple[str, ...] = ("gguf",)
    prompt_len: int = 1024
    new_tokens: int = 33
    repeat: int = 3
    threads: int = 0
    quick: bool = False
    out: Path = Path("results/activations.json")
    kv_cache_dtypes: tuple[str, ...] = ("auto",)


def linear_macs(model: torch.nn.Module) -> int:
    """Multiply-adds per token of the model's linear layers (LM head included)."""
    from services.worker.engine.layers.linear import Linear

    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear))


def measure(fmt: str, activations: str, opts: Options, kv: str = "auto") -> dict[str, Any]:
    from bench.phases.quantization import speed
    from services.worker.engine.layers.linear import weight_bytes
    from services.worker.engine.models.engine_model import load_engine_model

    lm = load_engine_model("smollm2-135m", fmt, "cpu", "float32", "auto", activations)
    prefill = speed(lm, 1, opts.prompt_len, 2, "cpu", kv)
    b1 = speed(lm, 1, 32, opts.new_tokens, "cpu", kv)
    b32 = speed(lm, 32, 32, opts.new_tokens, "cpu", kv)
    row = {"format": fmt, "activations": activations, "kv_cache_dtype": kv, "weight_bytes": weight_bytes(lm.model),
           "macs_per_token": linear_macs(lm.model), "ttft_s": prefill["ttft_s"],
           "prefill_tok_s": opts.prompt_len / prefill["ttft_s"], "decode_tok_s_b1": b1["decode_tok_s"],
           "decode_tok_s_b32": b32["decode_tok_s"]}
    del lm
    gc.collect()
    return row


def main(opts: Options) -> dict[str, Any]:
    from bench.kernels import lscpu, read_rate, roofs
    from bench.phases.common import kernel_isa
    from bench.report import environment, options_record
    from services.worker.engine.layers import kernels

    if opts.threads:
        torch.set_num_threads(opts.threads)
    unit = kernels.matrix_unit() if kernels.load() is not None else "none"
    acts = ("fp32", "int8") if unit not in ("fp32", "none") else ("fp32",)
    t0 = time.perf_counter()
    roof = roofs(opts.quick)
    reads = [roof["read_bytes_per_s"]]  # measured again after every round
    rounds: list[list[dict[str, Any]]] = []
    for i in range(opts.repeat):
        rows = []
        for fmt in opts.formats:
            for act, kv in ((a, k) for a in acts for k in opts.kv_cache_dtypes):
                rows.append(measure(fmt, act, opts, kv))
                print(f"round {i + 1}: {fmt} {act} kv {kv}: TTFT {rows[-1]['ttft_s']:.3f} s, prefill "
                      f"{rows[-1]['prefill_tok_s']:.0f} tok/s, decode b1 {rows[-1]['decode_tok_s_b1']:.1f}, "
                      f"b32 {rows[-1]['decode_tok_s_b32']:.1f} tok/s", flush=True)
        rounds.append(rows)
        reads.append(read_rate(int(roof["read_buffer_MiB"]) * 2**18))
    # The memory rate of a shared host moves between minutes (13.5 to 30.5 GB/s within an hour on a VM): like the
    # tok/s, the roof is the best seen in the run, so a share is never inflated by a slow moment of the roof.
    roof["read_bytes_per_s_rounds"] = reads
    roof["read_bytes_per_s"] = max(reads)
    best = []
    for j, row in enumerate(rounds[0]):
        runs = [r[j] for r in rounds]
        b = dict(row, ttft_s=min(r["ttft_s"] for r in runs))
        for k in ("prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b32"):
            b[k] = max(r[k] for r in runs)
        b["prefill_gflop_s"] = 2 * b["macs_per_token"] * b["prefill_tok_s"] / 1e9
        b["prefill_share_of_matrix_roof"] = b["prefill_gflop_s"] * 1e9 / roof["best_matrix_flops"]
        b["decode_b1_GB_s"] = b["weight_bytes"] * b["decode_tok_s_b1"] / 1e9
        b["decode_b1_share_of_read_roof"] = b["decode_b1_GB_s"] * 1e9 / roof["read_bytes_per_s"]
        # each round against the roof read around it: the host's bandwidth moves between minutes
        paired = [r["weight_bytes"] * r["decode_tok_s_b1"] * 2 / (reads[i] + reads[i + 1]) for i, r in enumerate(runs)]
        b["decode_b1_share_of_adjacent_read_roof_rounds"] = paired
        b["decode_b1_share_of_adjacent_read_roof"] = statistics.median(paired)
        best.append(b)
    for b in best:
        base = next(r for r in best if r["format"] == b["format"] and r["activations"] == "fp32"
                    and r["kv_cache_dtype"] == opts.kv_cache_dtypes[0])
        for k in ("prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b32"):
            b[f"{k}_x_fp32"] = b[k] / base[k]
    env = environment()
    env["lscpu"] = lscpu()  # the full flag list; environment() keeps the vector ones
    report = {"benchmark": "activations", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join(["tokenmill bench activations", *sys.argv[sys.argv.index("activations") + 1:]])
              if "activations" in sys.argv else " ".join(sys.argv),
              "options": options_record(opts),
              "environment": env, "kernels": kernel_isa("cpu", torch.float32), "integer_unit": unit,
              "roofs": roof, "rows": best, "rounds": rounds, "total_s": time.perf_counter() - t0}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Activation precision ({report['date']}, {env['cpu']}, {torch.get_num_threads()} threads, "
             f"integer unit {unit})", "", f"Command: `{report['command']}`", "",
             f"Roofs measured in the run: read {roof['read_bytes_per_s'] / 1e9:.1f} GB/s (2 MiB pages, THP "
             f"{roof['transparent_huge_pages']}; best of {len(reads)}, before and after each round; the lowest "
             f"{min(reads) / 1e9:.1f}); "
             + ", ".join(f"{k} {v / 1e9:,.1f}" for k, v in roof["matmul_flops"].items())
             + f" GFLOP/s (the matrix roof: {roof['best_matrix']}). Best of the rounds.", "",
             "| format | activations | KV cache | TTFT (1 prompt) s | prefill tok/s | x fp32 | % matrix roof | "
             "decode b1 tok/s | x fp32 | % read roof | % adjacent roof (median) | decode b32 tok/s | x fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in best:
        lines.append(f"| {b['format']} | {b['activations']} | {b['kv_cache_dtype']} | {b['ttft_s']:.3f} | "
                     f"{b['prefill_tok_s']:.0f} | "
                     f"{b['prefill_tok_s_x_fp32']:.2f} | {100 * b['prefill_share_of_matrix_roof']:.1f} | "
                     f"{b['decode_tok_s_b1']:.1f} | {b['decode_tok_s_b1_x_fp32']:.2f} | "
                     f"{100 * b['decode_b1_share_of_read_roof']:.0f} | "
                     f"{100 * b['decode_b1_share_of_adjacent_read_roof']:.0f} | {b['decode_tok_s_b32']:.1f} | "
                     f"{b['decode_tok_s_b32_x_fp32']:.2f} |")
    opts.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report
