"""Phase 2 — batching: tokenmill's paged engine, decode tokens/s and memory vs batch size, on a roofline.

The model and engine are the worker's defaults (`--quantization auto`: the embedded GGUF's own 4-bit blocks on
a CPU; `--model-impl auto`: tokenmill's forward; the C++ kernels where they apply), built from the worker's
settings. For each batch size B, B distinct prompts of the same length go into a fresh `PagedEngine` (prefix
caching off so every prompt is computed) and run greedy with `ignore_eos`. Steps in which every sequence
decodes are timed apart from the prefill.

The roofline: per decode step the model does ≈ 2·(linear weights)·B + 4·layers·ctx·heads·head_dim·B FLOPs and
reads its resident weights once (`weight_bytes`: the packed codes, scales and mins) plus B·ctx tokens of K/V;
FLOPs / bytes is the arithmetic intensity. The machine's roofs are measured in the same process with the
engine's threads by the probes `tokenmill bench kernels` uses (bench.kernels.roofs): read bandwidth over a
buffer far larger than the caches, and the best matrix rate of fp32, bf16 and int8 GEMM. Batch 1 sits far
left (memory-bound), large batches move toward compute.
"""

from __future__ import annotations

import torch

from bench.phases.common import (
    Options,
    PeakMemory,
    load_engine,
    make_engine,
    roofs,
    run_requests,
    setup_of,
    text_prompts,
    write_results,
)

PHASE, TITLE = "batching", "Phase 2 — batching on the paged engine"


def linear_weights(model: torch.nn.Module) -> int:
    """Weights multiplied per token: every linear layer's out x in, packed or float (the LM head included)."""
    from services.worker.engine.layers.linear import Linear

    return sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, Linear | torch.nn.Linear))


def run_batch(lm, batch: int, prompt_len: int, new_tokens: int, device: str) -> dict:
    per_seq = -(-(prompt_len + new_tokens) // 16)
    engine = make_engine(lm, num_blocks=batch * per_seq + 4, max_num_seqs=batch,
                         max_num_batched_tokens=max(batch * prompt_len, 512), enable_prefix_caching=False,
                         block_size=16)
    with PeakMemory(device) as mem:
        r = run_requests(engine, text_prompts(lm.tokenizer, batch, prompt_len), new_tokens, device)
    del engine
    return {**r, "mem_peak_delta": mem.delta}


def run(opts: Options) -> dict:
    from services.worker.engine.layers.linear import weight_bytes

    full = [1, 2, 4, 8, 16, 32, 64, 128, 256] if opts.cuda else [1, 2, 4, 8, 16, 32, 64]
    batches = opts.pick([1, 4, 16, 64], full, "batches")
    prompt_len = opts.pick(16, 128, "prompt_len")
    new_tokens = opts.pick(9, 65, "new_tokens")
    lm = load_engine(opts)
    model, dev = lm.model, opts.device
    cfg = model.config
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    hdim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", heads)
    esize = torch.finfo(lm.dtype).bits // 8
    linear = linear_weights(model)
    wbytes = weight_bytes(model)
    roof = roofs(dev, opts.quick)
    read_bw, mat = roof["read_bytes_per_s"], roof["best_matrix_flops"]

    rows = []
    for b in batches:
        r = run_batch(lm, b, prompt_len, new_tokens, dev)
        ctx = r["ctx"]
        flops = b * (2 * linear + 4 * layers * ctx * heads * hdim)
        nbytes = wbytes + b * ctx * 2 * layers * kv_heads * hdim * esize
        step_s = sum(t for t, _ in r["decode"]) / max(len(r["decode"]), 1)
        rows.append({"batch": b, "decode_tok_s": b / step_s, "ms_per_step": 1e3 * step_s,
                     "prefill_tok_s": b * prompt_len / r["prefill_s"] if r["prefill_s"] else float("nan"),
                     "e2e_tok_s": r["out_tokens"] / r["total_s"], "kv_used_MiB": r["kv_used_bytes"] / 2**20,
                     "peak_mem_delta_MiB": r["mem_peak_delta"] / 2**20, "intensity_flop_per_byte": flops / nbytes,
                     "achieved_GFLOP_s": flops / step_s / 1e9, "achieved_GB_s": nbytes / step_s / 1e9,
                     "pct_matrix_roof": 100 * flops / step_s / mat, "pct_read_roof": 100 * nbytes / step_s / read_bw})
    best = max(rows, key=lambda r: r["decode_tok_s"])
    summary = {
        "read bandwidth roof (GB/s)": read_bw / 1e9,
        f"matrix roof (GFLOP/s, best of {', '.join(roof['matmul_flops'])}: {roof['best_matrix']})": mat / 1e9,
        "ridge point (FLOP/byte)": mat / read_bw, "resident weights (MiB, weight_bytes)": wbytes / 2**20,
        "batch 1 decode tokens/s": rows[0]["decode_tok_s"],
        "best decode tokens/s": f"{best['decode_tok_s']:.1f} at batch {best['batch']}",
        f"speedup batch {best['batch']} vs 1": best["decode_tok_s"] / rows[0]["decode_tok_s"],
    }

    def plot(fig):
        ax1, ax2 = fig.subplots(1, 2)
        xs = [r["batch"] for r in rows]
        ax1.plot(xs, [r["decode_tok_s"] for r in rows], "o-", label="decode tokens/s")
        ax1.set_xscale("log", base=2)
        ax1.set(xlabel="batch size", ylabel="decode tokens/s", title="throughput and KV in use")
        ax1b = ax1.twinx()
        ax1b.plot(xs, [r["kv_used_MiB"] for r in rows], "s--", color="tab:red", label="KV in use (MiB)")
        ax1b.set_ylabel("KV in use (MiB)", color="tab:red")
        ax1.legend(loc="upper left")
        ai = [10 ** (k / 10) for k in range(-10, 41)]
        ax2.plot(ai, [min(mat, a * read_bw) / 1e9 for a in ai], "k-", label="roofline (measured)")
        for r in rows:
            ax2.plot(r["intensity_flop_per_byte"], r["achieved_GFLOP_s"], "o")
            ax2.annotate(f"B={r['batch']}", (r["intensity_flop_per_byte"], r["achieved_GFLOP_s"]), fontsize=8)
        ax2.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)", ylabel="GFLOP/s",
                title="decode step on the roofline")
        ax2.legend(loc="lower right")

    config = {"batches": batches, "prompt_len": prompt_len, "new_tokens": new_tokens, "linear_weights": linear,
              "weight_bytes": wbytes, "block_size": 16, "engine": "PagedEngine (the worker's engine_options)",
              "roofs": roof, "prefix_caching": False}
    notes = ["Decode FLOPs = B·(2·linear weights + 4·layers·ctx·heads·head_dim); bytes = resident weights "
             "(weight_bytes: packed codes + scales + mins + float tensors, the tied head once) + B·ctx·KV/token.",
             "Roofs measured in this process by bench kernels' probes (bench.kernels.roofs): read bandwidth = "
             "torch.sum over a buffer far larger than the caches; matrix roof = the best of fp32, bf16 and int8 "
             "GEMM. The quantized kernels multiply in fp32 (the caption names an integer matmul unit where the "
             "build uses one), so the best rate is an upper bound, not their own peak.",
             "peak_mem_delta is the CUDA allocator's peak on a GPU, the RSS increase on CPU (KV blocks are "
             "allocated lazily, so it tracks what the batch actually touched)."]
    return write_results(PHASE, TITLE, opts, config=config, rows=rows, summary=summary, plot=plot, notes=notes,
                         setup=setup_of(lm),
                         columns=["batch", "decode_tok_s", "ms_per_step", "prefill_tok_s", "e2e_tok_s",
                                  "kv_used_MiB", "peak_mem_delta_MiB", "intensity_flop_per_byte",
                                  "achieved_GFLOP_s", "achieved_GB_s", "pct_matrix_roof", "pct_read_roof"])
