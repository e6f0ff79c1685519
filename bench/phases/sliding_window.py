"""Phase 3 — sliding window: KV memory and time per token vs window size, over sequence length.

The engine's paged attention honours a layer's sliding window (keys older than the window are skipped, in both
prefill and decode), and when every layer has the same window the engine frees the blocks that leave it
(`BlockManager.release_before`). SmolLM2 (Llama) has no window of its own, so the benchmark sets one on the
worker's model (`--quantization auto`, `--model-impl auto`: tokenmill's forward over the GGUF blocks; its
layers' window and the config's `sliding_window`, which the engine reads), runs one request per (sequence
length, window) through `PagedEngine` (prefill of L tokens, then timed decode steps) and records:
- the KV the engine holds (its block manager's peak blocks in use) and the KV a window needs (min(L, w)
  tokens, rounded up to whole blocks, plus the one a window straddles);
- the engine's decode ms per token, and the attention alone over a window-bounded (ring-buffer) cache;
- how many greedy tokens equal those of full attention (the cost of forgetting).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.phases.common import (
    Options,
    heldout_text,
    is_native,
    load_engine,
    make_engine,
    setup_of,
    sync,
    timeit,
    write_results,
)

PHASE, TITLE = "sliding-window", "Phase 3 — sliding-window attention"


def _set_window(model, window: int | None) -> None:
    """The same window on every layer, where the engine reads it: the config (the model runner frees blocks
    behind a window every layer shares) and the layers (tokenmill's forward, or transformers' attention)."""
    model.config.sliding_window = window
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = ["sliding_attention" if window else "full_attention"] * len(model.config.layer_types)
    if is_native(model):
        for layer in model.layers:
            layer.window = window
        model._fused = None  # the C++ layer loop holds each layer's window: rebuilt at the next step
    else:
        for layer in model.model.layers:
            layer.self_attn.sliding_window = window


def _engine_run(lm, prompt: list[int], new_tokens: int, device: str) -> dict:
    from services.common.sampling import SamplingParams
    from services.worker.engine.types import Request

    bs = 16
    blocks = -(-(len(prompt) + new_tokens) // bs) + 2
    engine = make_engine(lm, block_size=bs, num_blocks=blocks, max_num_seqs=1,
                         max_num_batched_tokens=len(prompt), enable_prefix_caching=False)
    engine.add_request(Request("w", prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)))
    bm = engine.block_manager
    tokens, decode_times, used = [], [], 0
    first = True
    while engine.has_work():
        t0 = time.perf_counter()
        events = engine.step()
        sync(device)
        if not first:
            decode_times.append(time.perf_counter() - t0)
        first = False
        used = max(used, bm.num_blocks - bm.num_free_blocks)
        tokens += [t for e in events for t in e.token_ids]
    per_block = engine.runner.kv_bytes // engine.runner.num_blocks
    return {"tokens": tokens, "ms_per_token": 1e3 * sum(decode_times) / len(decode_times),
            "kv_held": used * per_block, "per_block": per_block}


def _ring_attention_ms(cfg, keys: int, device: str, dtype: torch.dtype) -> float:
    """One decode token's attention over `keys` cached tokens in every layer (what a window-sized cache costs)."""
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    q = torch.randn(1, heads, 1, dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, keys, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)

    def all_layers():
        for _ in range(cfg.num_hidden_layers):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != kv_heads)

    return 1e3 * timeit(all_layers, device, repeat=5)


def run(opts: Options) -> dict:
    lengths = opts.pick([64, 128, 256], [512, 1024, 2048, 4096], "lengths")
    windows = opts.pick([32, 64, 128, 256], [32, 64, 128, 256, 512, 1024], "windows")
    new_tokens = opts.pick(8, 32, "new_tokens")
    lm = load_engine(opts)
    cfg = lm.model.config
    text_ids = lm.tokenizer(heldout_text())["input_ids"]
    rows = []
    try:
        for length in lengths:
            prompt = [text_ids[i % len(text_ids)] for i in range(length)]
            full = None
            for w in [None, *windows]:
                if w is not None and w >= length + new_tokens:
                    continue  # the window covers everything: identical to full attention
                _set_window(lm.model, w)
                r = _engine_run(lm, prompt, new_tokens, opts.device)
                full = full or r
                ctx = length + new_tokens
                need = -(-min(ctx, w or ctx) // 16) + (1 if w else 0)  # a window straddles one extra block
                need = min(need, -(-ctx // 16))
                same = sum(a == b for a, b in zip(r["tokens"], full["tokens"], strict=False)) / len(full["tokens"])
                rows.append({"seq_len": length, "window": w or "full", "engine_ms_per_token": r["ms_per_token"],
                             "engine_kv_held_MiB": r["kv_held"] / 2**20,
                             "window_kv_needed_MiB": need * r["per_block"] / 2**20,
                             "kv_saving_x": (-(-ctx // 16)) / need,
                             "ring_attention_ms": _ring_attention_ms(cfg, min(ctx, w or ctx), opts.device,
                                                                     lm.dtype),
                             "tokens_equal_full": same})
    finally:
        _set_window(lm.model, None)

    longest = max(lengths)
    at_long = [r for r in rows if r["seq_len"] == longest]
    smallest = min((r for r in at_long if r["window"] != "full"), key=lambda r: r["window"], default=at_long[0])
    summary = {
        f"KV needed at {longest + new_tokens} tokens, w={smallest['window']} vs full (MiB)":
            f"{smallest['window_kv_needed_MiB']:.2f} vs {at_long[0]['window_kv_needed_MiB']:.2f} "
            f"({smallest['kv_saving_x']:.1f}x)",
        "engine KV held (MiB), full vs smallest window": f"{at_long[0]['engine_kv_held_MiB']:.2f} vs "
                                                         f"{smallest['engine_kv_held_MiB']:.2f}",
        "engine ms/token full vs smallest window": f"{at_long[0]['engine_ms_per_token']:.1f} vs "
                                                   f"{smallest['engine_ms_per_token']:.1f}",
        "seed (T4, toy model)": "2048 tokens: 32 MB (w=128) vs 512 MB (full) = 16x",
    }

    def plot(fig):
        ax1, ax2 = fig.subplots(1, 2)
        for i, w in enumerate(["full", *windows]):
            sel = [r for r in rows if r["window"] == w]
            if sel:
                xs, c = [r["seq_len"] for r in sel], f"C{i}"
                ax1.plot(xs, [r["window_kv_needed_MiB"] for r in sel], "o-", color=c, label=f"needed w={w}")
                ax1.plot(xs, [r["engine_kv_held_MiB"] for r in sel], "x:", color=c, label=f"engine holds w={w}")
                ax2.plot(xs, [r["engine_ms_per_token"] for r in sel], "o-", color=c, label=f"engine w={w}")
                ax2.plot(xs, [r["ring_attention_ms"] for r in sel], "x:", color=c, label=f"attn only w={w}")
        ax1.set(xlabel="sequence length (prompt)", ylabel="KV MiB", title="KV memory a window needs")
        ax2.set(xlabel="sequence length (prompt)", ylabel="ms", yscale="log", title="time per decode token")
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=6, ncol=2)

    config = {"lengths": lengths, "windows": windows, "new_tokens": new_tokens, "block_size": 16,
              "engine": "PagedEngine (the worker's engine_options), window on every layer"}
    notes = ["Windows at least as long as the sequence are skipped (identical to full attention).",
             "The engine frees the blocks a window has left (every layer shares the window here), so "
             "engine_kv_held follows window_kv_needed instead of the sequence length; tokens_equal_full is the "
             "cost of forgetting (greedy tokens equal to full attention's). ring_attention_ms is SDPA over a "
             "window-sized cache (all layers), for scale."]
    return write_results(PHASE, TITLE, opts, config=config, rows=rows, summary=summary, plot=plot, notes=notes,
                         setup=setup_of(lm), columns=["seq_len", "window", "engine_ms_per_token", "engine_kv_held_MiB",
                                  "window_kv_needed_MiB", "kv_saving_x", "ring_attention_ms", "tokens_equal_full"])
