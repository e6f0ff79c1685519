"""`tokenmill bench routing`: least-loaded vs prefix-aware routing over the same fleet and work, in one run.

For each routing mode a fresh fleet (N paged workers, threads split between them, and a gateway) runs
1. multiturn: chats of min..max turns; closed-loop clients take the chat that waited longest, send its next
   turn (the whole history so far) and put it back, so many chats are open at once, as with many users;
2. system: single-turn questions under a few long system prompts shared by many users;
3. uniform: distinct single-turn prompts (does routing keep the load balanced?).
Reported per phase: the fleet's prefix-cache hit rate from the workers' own counters (vllm:prefix_cache_*),
TTFT and latency p50/p95, output tokens/s, requests per worker and the spread (most / fewest), and the
gateway's routing reasons. Writes JSON and prints a table.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import chat_request, closed_loop, stream_chat
from bench.report import options_record
from bench.results import percentile
from bench.routing_fleet import Fleet
from bench.routing_workload import conversations, shared_system, uniform_prompts

MODES = ("least-loaded", "prefix-aware")
PHASES = ("multiturn", "system", "uniform")


@dataclass
class Options:
    workers: int = 3
    modes: tuple[str, ...] = MODES
    phases: tuple[str, ...] = PHASES
    conversations: int = 24
    min_turns: int = 4
    max_turns: int = 8
    system_prompts: int = 3
    system_requests: int = 48
    clients: int = 8
    max_tokens: int = 48
    uniform_requests: int = 48
    single_max_tokens: int = 32  # of the system and uniform phases
    kv_cache_memory: str = "256MiB"
    threads: int = 0  # per worker; 0 = this machine's CPUs / workers (at least 1)
    session_ids: bool = False  # send each chat's id as session_id (else affinity comes from the prefix alone)
    seed: int = 0
    model: str = "smollm2-135m"
    out: Path = Path("results/routing.json")


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int
    worker: str
    prompt_tokens: int
    cached_tokens: int
    text: str = field(default="", repr=False)


async def _generate(stub: Any, messages: list[tuple[str, str]], max_tokens: int, session: str) -> Sample:
    sample, last, text = await stream_chat(stub, chat_request(messages, max_tokens, session_id=session), timeout=1800)
    return Sample(sample.ttft, sample.latency, sample.tokens, last.timing.worker, last.usage.prompt_tokens,
                  last.usage.cached_tokens, text)


async def multiturn(address: str, opts: Options) -> tuple[list[Sample], float]:
    import grpc

    from services.common.pb import inference_pb2_grpc

    chats = conversations(opts.conversations, opts.min_turns, opts.max_turns, opts.seed)
    ready = collections.deque(range(len(chats)))
    samples: list[Sample] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def client() -> None:
            while ready:
                i = ready.popleft()
                s = await _generate(stub, chats[i].next_messages(), opts.max_tokens,
                                    f"chat-{i}" if opts.session_ids else "")
                chats[i].reply(s.text)
                samples.append(s)
                if not chats[i].done:
                    ready.append(i)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(opts.clients)))
        return samples, time.perf_counter() - t0


async def single_turns(address: str, chats: list[list[tuple[str, str]]], opts: Options) -> tuple[list[Sample], float]:
    import grpc

    from services.common.pb import inference_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(i: int) -> Sample:
            return await _generate(stub, chats[i], opts.single_max_tokens, "")

        return await closed_loop(len(chats), opts.clients, one)


async def system(address: str, opts: Options) -> tuple[list[Sample], float]:
    return await single_turns(address, shared_system(opts.system_requests, opts.system_prompts, opts.seed), opts)


async def uniform(address: str, opts: Options) -> tuple[list[Sample], float]:
    prompts = uniform_prompts(opts.uniform_requests, opts.seed)
    return await single_turns(address, [[("user", p)] for p in prompts], opts)


def summarise(samples: list[Sample], wall: float, workers: list[str], before: dict, after: dict) -> dict[str, Any]:
    per_worker = collections.Counter(s.worker for s in samples)
    shares = [per_worker.get(w, 0) for w in workers]
    queries = after["queries"] - before["queries"]
    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples), "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
        "requests_per_s": len(samples) / wall,
        "fleet_prefix_hit_rate": (after["hits"] - before["hits"]) / queries if queries else 0.0,
        "usage_cached_share": sum(s.cached_tokens for s in samples) / max(1, sum(s.prompt_tokens for s in samples)),
        "prompt_tokens": sum(s.prompt_tokens for s in samples),
        "preemptions": after["preemptions"] - before["preemptions"],
        "ttft_p50_s": percentile([s.ttft for s in samples], 0.5),
        "ttft_p95_s": percentile([s.ttft for s in samples], 0.95),
        "latency_p50_s": percentile([s.latency for s in samples], 0.5),
        "latency_p95_s": percentile([s.latency for s in samples], 0.95),
        "requests_per_worker": shares,
        "spread": max(shares) / min(shares) if min(shares) else float("inf"),
        "reasons": {k: after["reasons"].get(k, 0) - before["reasons"].get(k, 0) for k in after["reasons"]},
    }


def run_mode(mode: str, opts: Options, log_dir: Path) -> dict[str, Any]:
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.workers)
    with Fleet(mode, opts.workers, threads, opts.model, opts.kv_cache_memory, log_dir) as fleet:
        out: dict[str, Any] = {"threads_per_worker": threads}
        drivers = {"multiturn": multiturn, "system": system, "uniform": uniform}
        for phase in opts.phases:
            driver = drivers[phase]
            before = fleet.counters()
            samples, wall = asyncio.run(driver(fleet.address, opts))
            out[phase] = summarise(samples, wall, fleet.worker_addresses, before, fleet.counters())
            print(f"  {mode:12s} {phase:9s} " + row(out[phase]), flush=True)
        return out


def row(r: dict[str, Any]) -> str:
    return (f"hit {r['fleet_prefix_hit_rate']:.3f} | TTFT p50 {r['ttft_p50_s']:.2f}s p95 {r['ttft_p95_s']:.2f}s | "
            f"{r['output_tok_s']:.1f} tok/s | lat p50 {r['latency_p50_s']:.2f}s | per worker "
            f"{r['requests_per_worker']} (spread {r['spread']:.2f}) | reasons {r['reasons']}")


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance targets, from this run (None where a mode was not run)."""
    ll, pa = results.get("least-loaded", {}), results.get("prefix-aware", {})
    out: dict[str, Any] = {}
    if "multiturn" in ll and "multiturn" in pa:
        a, b = pa["multiturn"], ll["multiturn"]
        out.update(hit_rate_ratio=a["fleet_prefix_hit_rate"] / b["fleet_prefix_hit_rate"] if b["fleet_prefix_hit_rate"]
                   else float("inf"), hit_rate_2x=a["fleet_prefix_hit_rate"] >= 2 * b["fleet_prefix_hit_rate"],
                   ttft_p50_lower=a["ttft_p50_s"] < b["ttft_p50_s"],
                   throughput_not_lower=a["output_tok_s"] >= b["output_tok_s"])
    if "uniform" in pa:
        out.update(uniform_spread_prefix_aware=pa["uniform"]["spread"], uniform_balanced=pa["uniform"]["spread"] <= 1.5)
    return out


def main(opts: Options) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"routing benchmark: {opts.workers} workers, {opts.clients} clients; {opts.conversations} chats of "
          f"{opts.min_turns}-{opts.max_turns} turns (max_tokens {opts.max_tokens}); {opts.system_requests} requests "
          f"under {opts.system_prompts} system prompts; {opts.uniform_requests} uniform", flush=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as logs:
        for mode in opts.modes:
            results[mode] = run_mode(mode, opts, Path(logs))
    report = {
        "benchmark": "routing", "options": options_record(opts),
        "environment": {"python": sys.version.split()[0], "cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_avg_at_end": os.getloadavg()},
        "total_s": time.perf_counter() - t0, "results": results, "targets": targets(results),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    for name, value in report["targets"].items():
        print(f"{name}: {value}")
    print(f"wrote {opts.out}")
    return report
