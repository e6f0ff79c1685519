"""Phase 1 — KV cache: greedy decode by full recomputation vs with a KV cache, over output length.

Both loops run the embedded model's own layers (transformers, SDPA attention) one token at a time:
- recompute: every step feeds the whole sequence again (`use_cache=False`), so step t costs O(t) and a
  generation of n tokens O(n²);
- cached: the prompt once, then one token per step against the cached K/V (a DynamicCache): O(1) per step in
  the projections and MLP, O(t) only in the attention over the cache, O(n) overall.
One run to the longest length per mode; the cumulative time is read off at each checkpoint length.
"""

from __future__ import annotations

import time

import torch

from bench.phases.common import Options, load, setup_of, sync, write_results

PHASE, TITLE = "kv-cache", "Phase 1 — KV cache vs recomputation"


@torch.inference_mode()
def _decode(model, prompt: torch.Tensor, steps: int, cached: bool, device: str) -> tuple[list[float], list[int]]:
    """Per-step wall seconds and the greedy tokens (the first step includes the prompt's prefill)."""
    from transformers import DynamicCache

    ids = prompt
    past = DynamicCache(config=model.config) if cached else None
    times, tokens = [], []
    nxt = None
    for _ in range(steps):
        t0 = time.perf_counter()
        if not cached:
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        elif nxt is None:
            logits = model(input_ids=ids, cache=past, use_cache=True).logits[:, -1]
        else:
            logits = model(input_ids=nxt, cache=past, use_cache=True).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(int(nxt))
        ids = torch.cat([ids, nxt], dim=1)
    return times, tokens


def _line_fit(ctx0: int, step_times: list[float]) -> tuple[float, float]:
    """Least-squares (intercept ms, slope ms per context token) of the step times after the first."""
    xs = [ctx0 + 1 + i for i in range(len(step_times))]
    ys = [1e3 * t for t in step_times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    return my - slope * mx, slope


def run(opts: Options) -> dict:
    lengths = opts.pick([8, 16, 32, 64], [50, 100, 200, 400, 800], "lengths")
    prompt_text = "The lighthouse on the northern cape had been dark for eleven years when"
    lm = load(opts)
    model, dev = lm.model, opts.device
    prompt = lm.tokenizer(prompt_text, return_tensors="pt").input_ids.to(dev)
    n = max(lengths)
    _decode(model, prompt, 3, True, dev)  # warm-up: first-call allocations and kernel selection
    _decode(model, prompt, 3, False, dev)
    rec_t, rec_tok = _decode(model, prompt, n, False, dev)
    kv_t, kv_tok = _decode(model, prompt, n, True, dev)
    same = sum(a == b for a, b in zip(rec_tok, kv_tok, strict=True)) / n

    rows = []
    for length in lengths:
        rec, kv = sum(rec_t[:length]), sum(kv_t[:length])
        rows.append({"new_tokens": length, "context": prompt.shape[1] + length, "recompute_s": rec, "cached_s": kv,
                     "speedup": rec / kv, "recompute_last_step_ms": 1e3 * rec_t[length - 1],
                     "cached_last_step_ms": 1e3 * kv_t[length - 1]})
    # per-step time ~ a + b * context: b > 0 for recomputation (so the total grows as n²), b ≈ 0 with the cache
    ctx0 = prompt.shape[1]
    rec_fit, kv_fit = _line_fit(ctx0, rec_t[1:]), _line_fit(ctx0, kv_t[1:])
    summary = {
        f"speedup at {n} tokens": rows[-1]["speedup"],
        "recompute: ms per step per context token (slope)": rec_fit[1],
        "cached: ms per step per context token (slope)": kv_fit[1],
        "recompute: ms per step at context 0 (intercept)": rec_fit[0],
        "cached: ms per step (intercept)": kv_fit[0],
        "greedy tokens equal (recompute vs cached)": same,
        "seed (T4, toy model)": "400 tokens: 25.3 s naive vs 2.5 s cached = 10.1x",
    }

    def plot(fig):
        ax1, ax2 = fig.subplots(1, 2)
        xs = [r["new_tokens"] for r in rows]
        ax1.plot(xs, [r["recompute_s"] for r in rows], "o-", label="recompute (O(n²))")
        ax1.plot(xs, [r["cached_s"] for r in rows], "o-", label="KV cache (O(n))")
        ax1.set(xlabel="generated tokens", ylabel="total decode time (s)", title="cumulative time")
        ax1.legend()
        steps = range(1, n + 1)
        ax2.plot(steps, [1e3 * t for t in rec_t], lw=0.8, label="recompute")
        ax2.plot(steps, [1e3 * t for t in kv_t], lw=0.8, label="KV cache")
        ax2.set(xlabel="step (tokens generated so far)", ylabel="ms per step", title="per-step time", yscale="log")
        ax2.legend()

    config = {"prompt_tokens": prompt.shape[1], "lengths": lengths, "dtype": str(lm.dtype),
              "model": opts.model, "attention": "sdpa", "batch": 1}
    notes = ["Same model, same greedy tokens; the only difference is whether past K/V are kept.",
             "Step 1 of both runs includes the prompt's prefill."]
    return write_results(PHASE, TITLE, opts, config=config, rows=rows, summary=summary, plot=plot, notes=notes,
                         setup=setup_of(lm, fmt="none (fp32: the lesson needs a plain model, not the served format)",
                                        forward="transformers' modules (DynamicCache vs recompute)",
                                        kernels="PyTorch (F.linear, SDPA)"),
                         columns=["new_tokens", "context", "recompute_s", "cached_s", "speedup",
                                  "recompute_last_step_ms", "cached_last_step_ms"])
