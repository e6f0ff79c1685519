"""Phase 2 — batching: tokenmill's paged engine, decode tokens/s and memory vs batch size, on a roofline.

For each batch size B, B distinct prompts of the same length go into a fresh `PagedEngine` (the production
scheduler, block manager, paged attention and sampler; prefix caching off so every prompt is computed) and
run greedy with `ignore_eos`. Steps in which every sequence decodes are timed apart from the prefill.

The roofline: per decode step the model does ≈ 2·(linear params)·B + 4·layers·ctx·heads·head_dim·B FLOPs and
reads its weights once plus B·ctx tokens of K/V; FLOPs / bytes is the arithmetic intensity. The machine's
peaks come from a matmul probe and a copy probe run in the same process, so the achieved FLOP/s and bytes/s
can be placed against them: batch 1 sits far left (memory-bound), large batches move toward compute.
"""

from __future__ import annotations

import time

import torch

from bench.phases.common import Options, PeakMemory, heldout_text, load, param_bytes, sync, timeit, write_results

PHASE, TITLE = "batching", "Phase 2 — batching on the paged engine"


def probes(device: str, dtype: torch.dtype, quick: bool) -> dict:
    """Peak matmul FLOP/s and copy bytes/s of this device in this process (same threads as the engine)."""
    n = 1024 if quick and device == "cpu" else (2048 if device == "cpu" else 8192)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t_mm = timeit(lambda: a @ b, device, repeat=5)
    numel = (16 if device == "cpu" else 256) * 2**20
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    t_cp = timeit(lambda: dst.copy_(src), device, repeat=5)
    return {"matmul_n": n, "peak_flops": 2 * n**3 / t_mm, "copy_bytes": 2 * src.nbytes,
            "peak_bytes_per_s": 2 * src.nbytes / t_cp}


def _prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    ids = tokenizer(heldout_text())["input_ids"]
    return [[ids[(i * 7 + j) % len(ids)] for j in range(length)] for i in range(batch)]  # distinct prompts


def run_batch(lm, batch: int, prompt_len: int, new_tokens: int, device: str) -> dict:
    from services.common.sampling import SamplingParams
    from services.worker.engine.engine import PagedEngine
    from services.worker.engine.types import Request

    bs = 16
    per_seq = -(-(prompt_len + new_tokens) // bs)
    engine = PagedEngine(lm.model, lm.tokenizer, block_size=bs, num_blocks=batch * per_seq + 4, max_num_seqs=batch,
                         max_num_batched_tokens=max(batch * prompt_len, 512), enable_prefix_caching=False)
    engine.warmup()
    bm, sch = engine.block_manager, engine.scheduler
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(_prompts(lm.tokenizer, batch, prompt_len)):
        engine.add_request(Request(f"b{batch}-{i}", p, params))
    prefill_s = decode_s = 0.0
    decode_steps, used_peak, out_tokens = 0, 0, 0
    with PeakMemory(device) as mem:
        t_start = time.perf_counter()
        while engine.has_work():
            pure_decode = not sch.waiting and all(s.num_computed_tokens == s.num_tokens - 1 for s in sch.running)
            ctx = max((s.num_tokens for s in sch.running), default=0)
            t0 = time.perf_counter()
            events = engine.step()
            sync(device)
            dt = time.perf_counter() - t0
            used_peak = max(used_peak, bm.num_blocks - bm.num_free_blocks)
            out_tokens += sum(len(e.token_ids) for e in events)
            if pure_decode and len(events) == batch:
                decode_s += dt
                decode_steps += 1
                last_ctx = ctx
            else:
                prefill_s += dt
        total_s = time.perf_counter() - t_start
    per_block = engine.runner.kv_bytes // engine.runner.num_blocks
    del engine
    return {"decode_s": decode_s, "decode_steps": decode_steps, "prefill_s": prefill_s, "total_s": total_s,
            "out_tokens": out_tokens, "kv_used_bytes": used_peak * per_block, "mem_peak_delta": mem.delta,
            "mem_peak": mem.peak, "ctx": last_ctx if decode_steps else prompt_len}


def run(opts: Options) -> dict:
    full = [1, 2, 4, 8, 16, 32, 64, 128, 256] if opts.cuda else [1, 2, 4, 8, 16, 32, 64]
    batches = opts.pick([1, 4, 16, 64], full, "batches")
    prompt_len = opts.pick(16, 128, "prompt_len")
    new_tokens = opts.pick(9, 65, "new_tokens")
    lm = load(opts)
    model, dev = lm.model, opts.device
    cfg = model.config
    layers, heads, hdim = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    hdim = getattr(cfg, "head_dim", None) or hdim
    kv_heads = getattr(cfg, "num_key_value_heads", heads)
    esize = torch.finfo(lm.model.dtype).bits // 8
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    wbytes = param_bytes(model)
    peaks = probes(dev, lm.model.dtype, opts.quick)

    rows = []
    for b in batches:
        r = run_batch(lm, b, prompt_len, new_tokens, dev)
        ctx = r["ctx"]
        flops = b * (2 * linear + 4 * layers * ctx * heads * hdim)
        nbytes = wbytes + b * ctx * 2 * layers * kv_heads * hdim * esize
        step_s = r["decode_s"] / max(r["decode_steps"], 1)
        rows.append({"batch": b, "decode_tok_s": b / step_s, "ms_per_step": 1e3 * step_s,
                     "prefill_tok_s": b * prompt_len / r["prefill_s"] if r["prefill_s"] else float("nan"),
                     "e2e_tok_s": r["out_tokens"] / r["total_s"], "kv_used_MiB": r["kv_used_bytes"] / 2**20,
                     "peak_mem_delta_MiB": r["mem_peak_delta"] / 2**20, "intensity_flop_per_byte": flops / nbytes,
                     "achieved_GFLOP_s": flops / step_s / 1e9, "achieved_GB_s": nbytes / step_s / 1e9,
                     "pct_peak_flops": 100 * flops / step_s / peaks["peak_flops"],
                     "pct_peak_bw": 100 * nbytes / step_s / peaks["peak_bytes_per_s"]})
    ridge = peaks["peak_flops"] / peaks["peak_bytes_per_s"]
    best = max(rows, key=lambda r: r["decode_tok_s"])
    summary = {
        "matmul probe (GFLOP/s)": peaks["peak_flops"] / 1e9, "copy probe (GB/s)": peaks["peak_bytes_per_s"] / 1e9,
        "ridge point (FLOP/byte)": ridge, "weights (MiB)": wbytes / 2**20,
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
        ax2.plot(ai, [min(peaks["peak_flops"], a * peaks["peak_bytes_per_s"]) / 1e9 for a in ai], "k-",
                 label="roofline (probes)")
        for r in rows:
            ax2.plot(r["intensity_flop_per_byte"], r["achieved_GFLOP_s"], "o")
            ax2.annotate(f"B={r['batch']}", (r["intensity_flop_per_byte"], r["achieved_GFLOP_s"]), fontsize=8)
        ax2.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP/byte)", ylabel="GFLOP/s",
                title="decode step on the roofline")
        ax2.legend(loc="lower right")

    config = {"batches": batches, "prompt_len": prompt_len, "new_tokens": new_tokens, "dtype": str(model.dtype),
              "linear_params": linear, "weight_bytes": wbytes, "block_size": 16, "engine": "PagedEngine",
              "probes": peaks, "prefix_caching": False}
    notes = ["Decode FLOPs = B·(2·linear params + 4·layers·ctx·heads·head_dim); bytes = weights + B·ctx·KV/token.",
             "peak_mem_delta is the CUDA allocator's peak on a GPU, the RSS increase on CPU (KV blocks are "
             "allocated lazily, so it tracks what the batch actually touched)."]
    return write_results(PHASE, TITLE, opts, config=config, rows=rows, summary=summary, plot=plot, notes=notes,
                         columns=["batch", "decode_tok_s", "ms_per_step", "prefill_tok_s", "e2e_tok_s",
                                  "kv_used_MiB", "peak_mem_delta_MiB", "intensity_flop_per_byte",
                                  "achieved_GFLOP_s", "achieved_GB_s", "pct_peak_flops", "pct_peak_bw"])
