"""Phase 5 — paged KV memory: per-sequence max-length allocation vs tokenmill's block manager, + prefix cache.

1. Variable-length batch: requests with very different prompt and output lengths run together through
   `PagedEngine`; the KV it reserves is its block manager's peak blocks in use × bytes per block. The naive
   baselines reserve, per sequence, the batch's longest length (a padded static batch, the seed's naive case)
   or the model's whole context (a static cache sized for any request).
2. Block-size sweep: the same final lengths admitted into the production `BlockManager` at block sizes 1…64
   (internal fragmentation: a sequence wastes at most one partly filled block).
3. Shared chat template: chat prompts from the story set share the system prompt and the start of the user
   turn; the first request runs alone, then the rest join. With prefix caching, the full blocks of the shared
   prefix are computed once and shared (ref-counted) instead of stored per sequence.
"""

from __future__ import annotations

from bench.phases.common import Options, heldout_text, load_engine, make_engine, setup_of, write_results

PHASE, TITLE = "paged-memory", "Phase 5 — paged KV memory"
STORIES = [("curious fox", "honesty", "enchanted forest"), ("shy turtle", "courage", "busy city"),
           ("brave little mouse", "kindness", "snowy mountain"), ("lazy cat", "hard work", "sunny farm"),
           ("lonely owl", "friendship", "quiet village by the sea"), ("tiny ant", "teamwork", "enchanted forest"),
           ("grumpy bear", "gratitude", "snowy mountain"), ("helpful robot", "patience", "busy city")]


def _story_prompts(n: int) -> list[str]:
    try:
        from services.judge.stories import sample_prompts
        return sample_prompts(n)
    except ImportError:  # the load-test package is optional here
        return [f"Write a single paragraph moral story for children about a {c} who learns the value of {m} "
                f"in a {s}." for c, m, s in (STORIES * (n // len(STORIES) + 1))[:n]]


def _run(lm, prompts: list[list[int]], max_tokens: list[int], block_size: int, prefix: bool) -> dict:
    """Run the requests (the first alone for one step), return peak blocks and prefix-cache counters."""
    from services.common.sampling import SamplingParams
    from services.worker.engine.types import Request

    need = sum(-(-(len(p) + m) // block_size) for p, m in zip(prompts, max_tokens, strict=True))
    engine = make_engine(lm, block_size=block_size, num_blocks=need + 4, max_num_seqs=len(prompts),
                         max_num_batched_tokens=max(2048, sum(map(len, prompts))), enable_prefix_caching=prefix)
    bm = engine.block_manager
    peak, first = 0, True
    schedule = engine.scheduler.schedule

    def schedule_and_measure():  # blocks in use right after the step's allocation, before finished ones free
        nonlocal peak
        out = schedule()
        peak = max(peak, bm.num_blocks - bm.num_free_blocks)
        return out

    engine.scheduler.schedule = schedule_and_measure
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True))
            for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
    engine.add_request(reqs[0])
    while engine.has_work():
        engine.step()
        if first:
            for r in reqs[1:]:
                engine.add_request(r)
            first = False
    stats = engine.stats()
    return {"peak_blocks": peak, "per_block": engine.runner.kv_bytes // engine.runner.num_blocks,
            "queries": stats.prefix_cache_queries, "hits": stats.prefix_cache_hits,
            "max_model_len": engine.max_model_len}


def run(opts: Options) -> dict:
    from services.common.sampling import SamplingParams
    from services.worker.engine.block_manager import BlockManager
    from services.worker.engine.sequence import Sequence

    lm = load_engine(opts)  # the worker's model: its format, forward and kernels
    tok = lm.tokenizer
    bs = 16
    # 1. variable-length batch
    p_lens = opts.pick([24, 48, 96, 192, 384, 24], [32, 64, 128, 256, 512, 1024, 1536, 2000] * 8, "prompt_lens")
    o_lens = opts.pick([16, 8, 16, 4, 8, 24], [256, 16, 128, 64, 32, 8, 256, 48] * 8, "output_lens")
    text = tok(heldout_text())["input_ids"]
    prompts = [[text[(i * 13 + j) % len(text)] for j in range(n)] for i, n in enumerate(p_lens)]
    r = _run(lm, prompts, o_lens, bs, prefix=False)
    per_token = r["per_block"] // bs
    finals = [p + o for p, o in zip(p_lens, o_lens, strict=True)]
    paged = r["peak_blocks"] * r["per_block"]
    rows = []
    for name, nbytes in [("naive: every sequence reserves max_model_len", len(finals) * r["max_model_len"] * per_token),
                         ("naive: pad every sequence to the longest (seed)", len(finals) * max(finals) * per_token),
                         (f"paged: engine block manager (block {bs}), peak in use", paged),
                         ("ideal: exactly the tokens stored", sum(finals) * per_token)]:
        rows.append({"workload": f"{len(finals)} variable-length sequences", "strategy": name,
                     "kv_MiB": nbytes / 2**20, "x_of_paged": nbytes / paged})

    # 2. block-size sweep on the production BlockManager (final lengths, all sequences resident)
    sweep = []
    for size in (1, 4, 8, 16, 32, 64):
        bm = BlockManager(sum(-(-f // size) for f in finals) + 1, size, enable_prefix_caching=False)
        for i, f in enumerate(finals):
            seq = Sequence(f"s{i}", [0] * f, f, SamplingParams(), 0, i, 0.0)
            bm.admit(seq, [], [], f)
        used = bm.num_blocks - bm.num_free_blocks
        sweep.append({"block_size": size, "blocks": used, "kv_MiB": used * size * per_token / 2**20,
                      "waste_pct": 100 * (used * size - sum(finals)) / (used * size)})

    # 3. shared chat template: prefix caching off vs on
    n_chat = opts.pick(8, 64, "chat_requests")
    chat = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    tokenize=True)["input_ids"] for p in _story_prompts(n_chat)]
    shared = next((i for i in range(min(map(len, chat))) if len({c[i] for c in chat}) > 1), 0)
    chat_out = [opts.pick(4, 64, "chat_max_tokens")] * n_chat
    for prefix in (False, True):
        c = _run(lm, chat, chat_out, bs, prefix)
        computed = c["queries"] - c["hits"]
        rows.append({"workload": f"{n_chat} chat prompts, shared template", "strategy":
                     f"paged, prefix cache {'on' if prefix else 'off'}", "kv_MiB": c["peak_blocks"] * c["per_block"]
                     / 2**20, "prefill_tokens_computed": computed, "prefix_hit_rate": c["hits"] / max(c["queries"], 1)})
    off, on = rows[-2], rows[-1]
    on["x_of_paged"], off["x_of_paged"] = 1.0, off["kv_MiB"] / on["kv_MiB"]

    summary = {
        "naive (pad to longest) / paged": rows[1]["x_of_paged"],
        "paged / ideal": paged / (sum(finals) * per_token),
        "shared chat-template prefix (tokens)": shared,
        "prefix cache: KV saved": f"{100 * (1 - on['kv_MiB'] / off['kv_MiB']):.0f}%",
        "prefix cache: prefill tokens saved":
            f"{100 * (1 - on['prefill_tokens_computed'] / max(off['prefill_tokens_computed'], 1)):.0f}%",
        "seed (T4, 5 sequences)": "4.2 MB paged vs 16.8 MB naive = 4x",
    }

    def plot(fig):
        ax1, ax2, ax3 = fig.subplots(1, 3)
        a = rows[:4]
        ax1.barh(["reserve max_model_len", "pad to longest", "paged (engine)", "ideal"], [x["kv_MiB"] for x in a],
                 color=["tab:red", "tab:orange", "tab:green", "tab:gray"])
        ax1.set(xscale="log", xlabel="KV MiB", title="variable-length batch")
        ax1.tick_params(axis="y", labelsize=8)
        ax2.plot([s["block_size"] for s in sweep], [s["kv_MiB"] for s in sweep], "o-")
        ax2.set_xscale("log", base=2)
        ax2.set(xlabel="block size (tokens)", ylabel="KV MiB", title="fragmentation vs block size")
        ax3.bar(["cache off", "cache on"], [off["kv_MiB"], on["kv_MiB"]], color=["tab:orange", "tab:green"])
        ax3.set(ylabel="peak KV MiB", title=f"{n_chat} chat prompts, shared template")

    config = {"block_size": bs, "prompt_lens": p_lens, "output_lens": o_lens, "kv_bytes_per_token": per_token,
              "dtype": str(lm.model.dtype), "chat_requests": n_chat, "chat_max_tokens": chat_out[0],
              "engine": "PagedEngine / BlockManager", "max_model_len": r["max_model_len"]}
    notes = ["KV bytes per token = 2 · layers · kv_heads · head_dim · dtype bytes (the engine's pool layout).",
             "Prefix cache: the first request runs one step alone, so its full blocks are hashed before the "
             "others arrive; requests admitted in the same step cannot share (nothing is cached yet)."]
    return write_results(PHASE, TITLE, opts, config=config, rows=rows, summary=summary, plot=plot, notes=notes,
                         setup=setup_of(lm),
                         columns=["workload", "strategy", "kv_MiB", "x_of_paged", "prefill_tokens_computed",
                                  "prefix_hit_rate"],
                         tables={"block-size sweep (same sequences, production BlockManager)":
                                 (sweep, ["block_size", "blocks", "kv_MiB", "waste_pct"])})
