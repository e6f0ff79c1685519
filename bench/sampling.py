"""`tokenmill bench sampling`: what parallel sampling and penalties cost on the paged engine (issue #25's targets).

1. n: one request with n = 8 over a ~1,000-token prompt (prose), 128 sampled tokens per sample (ignore_eos), against the
   same 8 samples sent as 8 requests (seeds seed + i: the tokens n = 8 samples) at the same instant (with the
   prefix cache, which chunked prefill lets the later ones hit, and without it: eight prefills), after one
   request has put the prompt in the prefix cache, and one after another; plus the n = 1 request alone. Peak KV
   blocks held and wall time of each; every run has a prompt of its own (a run number leads it), so none finds
   another's prompt in the prefix cache.
2. penalties: a batch of 32 story requests, sampled, with presence / frequency / repetition penalties (and with
   those plus min_p, logit_bias, min_tokens, bad_words) against the same batch without: output tokens/s.

One engine as the worker builds it by default (prefix caching on), called directly (AsyncEngine in this process,
bench/direct.py). The configurations run interleaved, round after round, in an order rotated each
round, and ratios are taken within a round, so a shared machine's load falls on each alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.direct import Models, direct_front
from bench.harness import closed_loop, timed
from bench.kernels import lscpu
from bench.report import environment, options_record
from bench.workloads import chat_ids

N_RUNS = ("n1", "n8", "same_instant", "same_instant_uncached", "cached_then_separate", "one_after_another")
PENALTIES = {"plain": {}, "penalties": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)}
PENALTIES["penalties+filters"] = dict(PENALTIES["penalties"], min_p=0.05, min_tokens=16, bad_words=("dragon",),
                                      logit_bias={13: -5.0, 30: 2.0})


@dataclass
class Options:
    n: int = 8
    prompt_tokens: int = 1000
    max_tokens: int = 128
    batch: int = 32  # the penalties batch
    batch_max_tokens: int = 128
    rounds: int = 3
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    model: str = "smollm2-135m"
    kv_cache_memory: str = ""  # "" = the worker's default
    threads: int = 0
    out: Path = Path("results/sampling.json")


class Bench:
    """One engine (the worker's defaults) behind AsyncEngine, its KV probe, and a counter that gives every run
    a prompt of its own."""

    def __init__(self, opts: Options) -> None:
        from services.common.model_loader import load_tokenizer

        self.opts = opts
        self.tokenizer = load_tokenizer(opts.model)
        self.front, self.engine, self.probe = direct_front("paged", Models(opts.model), opts.kv_cache_memory)
        self.runs = 0
        self.prose: str | None = None

    def params(self, max_tokens: int, seed: int, **kw: Any) -> Any:
        from services.common.sampling import SamplingParams

        o = self.opts
        return SamplingParams(max_tokens=max_tokens, temperature=o.temperature, top_p=o.top_p, seed=seed,
                              ignore_eos=True, **kw)

    def document(self) -> list[int]:
        """A prompt of exactly opts.prompt_tokens tokens no earlier run has sent (the Language Reference's prose,
        as bench quality scores it)."""
        from bench.quality import prose_paragraphs

        self.runs += 1
        if self.prose is None:
            self.prose = "\n\n".join(prose_paragraphs())
        ids = self.tokenizer.encode(f"Document {self.runs}.\n\n{self.prose}")[: self.opts.prompt_tokens]
        assert len(ids) == self.opts.prompt_tokens, "prose shorter than the prompt asked for"
        return ids

    def measure(self, run: Any) -> dict[str, Any]:
        """Wall time, this process's CPU time (the work done, which other processes on a shared machine disturb
        far less than the wall clock), output tokens, peak KV blocks held and prefix-cache hits of one run (a
        coroutine factory returning its samples)."""
        self.probe.peak_blocks = 0
        hits = self.engine.stats().prefix_cache_hits
        t0, cpu0 = time.perf_counter(), time.process_time()
        samples = asyncio.run(run())
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "tokens": sum(s.tokens for s in samples),
                "kv_blocks_peak": self.probe.peak_blocks, "cached_tokens": self.engine.stats().prefix_cache_hits - hits}

    # ---- 1. n = 8 against 8 requests ---------------------------------------------------------------------
    def n_run(self, kind: str) -> dict[str, Any]:
        from services.worker.engine.types import Request

        o, prompt, tag = self.opts, self.document(), f"{kind}-{self.runs}"
        seed = o.seed + 100 * self.runs

        def one(i: int) -> Any:
            return timed(self.front, Request(f"{tag}-{i}", prompt, self.params(o.max_tokens, seed + i)))

        async def run() -> list:
            if kind in ("n1", "n8"):
                n = o.n if kind == "n8" else 1
                return [await timed(self.front, Request(tag, prompt, self.params(o.max_tokens, seed, n=n)))]
            if kind == "one_after_another":
                return (await closed_loop(o.n, 1, one))[0]
            if kind == "cached_then_separate":  # one short request prefills the prompt into the cache first
                await timed(self.front, Request(f"{tag}-warm", prompt, self.params(1, seed)))
            return list(await asyncio.gather(*(one(i) for i in range(o.n))))

        bm = self.engine.block_manager
        cache = bm.enable_prefix_caching  # switched while the engine idles between runs
        bm.enable_prefix_caching = cache and kind != "same_instant_uncached"
        try:
            return self.measure(run)
        finally:
            bm.enable_prefix_caching = cache

    # ---- 2. penalties on a batch ---------------------------------------------------------------------------
    def batch_run(self, kind: str) -> dict[str, Any]:
        from services.judge.stories import sample_prompts
        from services.worker.engine.types import Request

        o = self.opts
        self.runs += 1
        prompts = [chat_ids(self.tokenizer, f"{self.runs}. {p}") for p in sample_prompts(o.batch, o.seed)]
        requests = [Request(f"{kind}-{self.runs}-{i}", p, self.params(o.batch_max_tokens, o.seed + i,
                                                                         **PENALTIES[kind]))
                    for i, p in enumerate(prompts)]

        async def run() -> list:
            return (await closed_loop(len(requests), len(requests), lambda i: timed(self.front, requests[i])))[0]

        out = self.measure(run)
        out["tok_s"] = round(out["tokens"] / out["wall_s"], 2)
        return out

    def warm(self) -> None:
        """Untimed: one story request down the penalised path, which also puts the chat template's system prompt
        (every batch run's first tokens) in the prefix cache before the first timed run."""
        from services.worker.engine.types import Request

        prompt = chat_ids(self.tokenizer, "Hello.")
        asyncio.run(timed(self.front, Request("warm", prompt, self.params(16, 0, **PENALTIES["penalties+filters"]))))

    def close(self) -> None:
        self.front.shutdown()


def rotated(names: tuple[str, ...], r: int) -> list[str]:
    return [names[(i + r) % len(names)] for i in range(len(names))]


def summary(rounds: list[dict[str, dict[str, Any]]], opts: Options, block_size: int) -> dict[str, Any]:
    """Median of each configuration over the rounds and the targets' ratios (each taken within a round, then the
    median): n's KV blocks vs n = 1 plus the other samples' own blocks, wall time vs the separate requests, and
    penalised throughput vs plain."""
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    out: dict[str, Any] = {}
    n_rounds = [r for r in rounds if "n8" in r]
    if n_rounds:
        first = n_rounds[0]
        one, full = first["n1"]["kv_blocks_peak"], opts.prompt_tokens // block_size
        ideal = one + (opts.n - 1) * (one - full)  # the prompt's full blocks once, each sample's own
        out["kv"] = {name: first[name]["kv_blocks_peak"] for name in N_RUNS}
        out["kv"].update(prompt_full_blocks=full, n1_plus_own_blocks=ideal,
                         n8_over_n1_plus_own=round(first["n8"]["kv_blocks_peak"] / ideal, 3))
        out["wall_s"] = {name: med([r[name]["wall_s"] for r in n_rounds]) for name in N_RUNS}
        for clock in ("wall", "cpu"):
            out[f"n8_{clock}_over"] = {name: med([r["n8"][f"{clock}_s"] / r[name][f"{clock}_s"] for r in n_rounds])
                                       for name in N_RUNS[2:]}
    b_rounds = [r for r in rounds if "plain" in r]
    if b_rounds:
        out["tok_s"] = {name: med([r[name]["tok_s"] for r in b_rounds]) for name in PENALTIES}
        out["tok_s_over_plain"] = {name: med([r[name]["tok_s"] / r["plain"]["tok_s"] for r in b_rounds])
                                   for name in PENALTIES if name != "plain"}
        out["tok_per_cpu_s_over_plain"] = {name: med([r["plain"]["cpu_s"] / r[name]["cpu_s"] for r in b_rounds])
                                           for name in PENALTIES if name != "plain"}
    return out


def main(opts: Options) -> dict[str, Any]:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    bench = Bench(opts)
    result: dict[str, Any] = {"benchmark": "sampling", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "options": options_record(opts),
                              "environment": environment(), "rounds": []}
    from services.common.config import WorkerConfig

    result["engine"] = {k: getattr(WorkerConfig(), k) for k in ("block_size", "kv_cache_memory", "max_num_seqs",
                                                               "max_num_batched_tokens", "prefix_cache", "speculative")}
    result["engine"]["kv_cache_memory"] = opts.kv_cache_memory or result["engine"]["kv_cache_memory"]
    result["engine"]["kv_blocks_total"] = bench.engine.stats().total_kv_blocks
    t0 = time.perf_counter()
    try:
        bench.warm()
        for r in range(opts.rounds):
            runs: dict[str, dict[str, Any]] = {}
            for name in rotated(N_RUNS, r):
                runs[name] = bench.n_run(name)
                print(f"round {r} {name}: {runs[name]}", flush=True)
            for name in rotated(tuple(PENALTIES), r):
                runs[name] = bench.batch_run(name)
                print(f"round {r} {name}: {runs[name]}", flush=True)
            result["rounds"].append(runs)
    finally:
        bench.close()
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["environment"]["load_avg_end"] = os.getloadavg()
    result["environment"]["lscpu"] = lscpu()
    result["summary"] = summary(result["rounds"], opts, bench.engine.block_size)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {opts.out}")
    return result
