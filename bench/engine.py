"""`tokenmill bench engine`: the seed's hf-static engine vs the paged engine, side by side in one run.

Workload: N story prompts (chat template), greedy, each request's max_tokens drawn from a range with a
fixed seed, sent by closed-loop clients at each concurrency. `--workload repeat` asks instead to rewrite
held-out paragraphs keeping their words (the answer repeats the prompt: where speculation shines).
An engine is a system spec (bench/results.py): "paged+ngram" is the paged engine with that speculative
decoding mode, "paged:transformers" the paged engine over transformers' modules instead of tokenmill's
forward, "hf-static:none" the seed's engine on float weights. Each engine runs directly (through
AsyncEngine, in this process) and through gateway + worker over gRPC (subprocesses on 127.0.0.1).
Writes JSON (bench/results.py's schema, shared with `bench compare`) and prints a table.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.direct import Models, direct_front
from bench.harness import MemoryPoller, Stack, chat_request, closed_loop, stream_chat, timed
from bench.report import ENGINE_COLUMNS, engine_cells, environment, options_record, print_row, table
from bench.results import Result, Sample, SystemSpec, summarise
from bench.workloads import Work, drawn_work

ENGINES = ("hf-static", "paged", "paged:transformers")


@dataclass
class Options:
    requests: int = 128
    concurrency: tuple[int, ...] = (1, 8, 32)
    engines: tuple[str, ...] = ENGINES
    modes: tuple[str, ...] = ("direct", "grpc")
    min_tokens: int = 32
    max_tokens: int = 256
    seed: int = 0
    model: str = "smollm2-135m"
    kv_cache_memory: str = ""  # "" = the worker's default
    threads: int = 0
    workload: str = "story"  # story | repeat
    spec_max_batch: int = -1  # paged+<mode>: --speculative-max-batch; -1 = the worker's default
    out: Path = Path("results/engine.json")


def run_direct(models: Models, work: Work, opts: Options, results: list[Result]) -> None:
    from services.common.sampling import SamplingParams
    from services.worker.engine.types import Request

    for conc in opts.concurrency:
        for kind in opts.engines:
            front, engine, probe = direct_front(kind, models, opts.kv_cache_memory, opts.spec_max_batch)

            async def one(i: int, front: Any = front) -> Sample:
                return await timed(front, Request(f"bench-{i}", work.prompt_ids[i], SamplingParams(
                    max_tokens=work.max_tokens[i], temperature=0.0)))

            try:
                with MemoryPoller([os.getpid()]) as mem:
                    samples, wall = asyncio.run(closed_loop(len(work.prompts), conc, one))
            finally:
                front.shutdown()
            res = summarise(kind, "direct", opts.workload, conc, samples, wall, mem.peak_rss)
            res.extra.update(kv_blocks_used_peak=probe.peak_blocks, kv_blocks_total=probe.total,
                             kv_reserved_over_held=probe.ratio())
            stats = engine.stats()
            if stats.spec_draft_tokens:
                res.extra.update(spec_draft_tokens=stats.spec_draft_tokens,
                                 spec_accepted_tokens=stats.spec_accepted_tokens,
                                 spec_acceptance=stats.spec_accepted_tokens / stats.spec_draft_tokens)
            results.append(res)
            print_row(ENGINE_COLUMNS, engine_cells(res))
            del engine, front, one, probe
            gc.collect()  # the engine's KV pool: free it before the next run measures its RSS


# ---- gRPC: gateway + worker as processes ----------------------------------------------------------------
def run_grpc(work: Work, opts: Options, results: list[Result], log_dir: Path) -> None:
    import grpc

    from services.common.pb import inference_pb2_grpc, worker_pb2, worker_pb2_grpc

    for kind in opts.engines:
        spec = SystemSpec.parse(kind)
        wargs = ["--engine", spec.name, "--model", opts.model, *spec.worker_args()]
        if opts.spec_max_batch >= 0:
            wargs += ["--speculative-max-batch", str(opts.spec_max_batch)]
        if opts.kv_cache_memory:
            wargs += ["--kv-cache-memory", opts.kv_cache_memory]
        if opts.threads:
            wargs += ["--threads", str(opts.threads)]
        stack = Stack(f"bench-gateway-{kind}", [(f"bench-worker-{kind}", wargs)], [], log_dir, timeout_s=300)
        try:
            stack.start()
            worker = stack.workers[0]
            wchan = grpc.insecure_channel(worker.address)
            load = worker_pb2_grpc.WorkerStub(wchan).Load
            kv = {"peak": 0, "total": 0}

            def probe(load=load, kv=kv) -> None:
                try:
                    r = load(worker_pb2.LoadRequest(), timeout=2)
                except grpc.RpcError:
                    return
                kv["peak"] = max(kv["peak"], r.total_kv_blocks - r.free_kv_blocks)
                kv["total"] = r.total_kv_blocks

            async def session(conc: int, address: str = stack.address) -> tuple[list[Sample], float]:
                async with grpc.aio.insecure_channel(address) as chan:
                    stub = inference_pb2_grpc.InferenceStub(chan)

                    async def one(i: int) -> Sample:
                        request = chat_request([("user", work.prompts[i])], work.max_tokens[i])
                        return (await stream_chat(stub, request))[0]

                    await one(0)  # warm the path
                    return await closed_loop(len(work.prompts), conc, one)

            for conc in opts.concurrency:
                kv["peak"] = 0
                with MemoryPoller([worker.proc.pid], probe, period=0.5) as mem:
                    samples, wall = asyncio.run(session(conc))
                res = summarise(kind, "grpc", opts.workload, conc, samples, wall, mem.peak_rss)
                res.extra.update(kv_blocks_used_peak=kv["peak"], kv_blocks_total=kv["total"])
                res.extra["gateway_rss_mib"] = psutil.Process(stack.gateway.proc.pid).memory_info().rss / 2**20
                results.append(res)
                print_row(ENGINE_COLUMNS, engine_cells(res))
            wchan.close()
        finally:
            stack.stop()


# ---- report -----------------------------------------------------------------------------------------------
def ratios(results: list[Result]) -> dict[str, float]:
    """Each engine over hf-static; a variant (paged+ngram, paged:transformers) over its plain engine; gRPC over
    the same engine called directly."""
    by = {(r.system, r.transport, r.concurrency): r.output_tok_s for r in results}
    out = {}
    for (system, mode, conc), tps in by.items():
        base = by.get(("hf-static", mode, conc))
        if not system.startswith("hf-static") and base:
            out[f"{system}/hf-static {mode} c={conc}"] = tps / base
        plain = SystemSpec.parse(system).name
        if system != plain and (p := by.get((plain, mode, conc))):
            out[f"{system}/{plain} {mode} c={conc}"] = tps / p
        direct = by.get((system, "direct", conc))
        if mode == "grpc" and direct:
            out[f"{system} grpc/direct c={conc}"] = tps / direct
    return out


def main(opts: Options) -> dict[str, Any]:
    import torch

    from services.common.model_loader import load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    work = drawn_work(load_tokenizer(opts.model), opts.workload, opts.requests, opts.seed, opts.min_tokens,
                      opts.max_tokens)
    print(f"workload: {len(work.prompts)} requests, prompt tokens {sum(map(len, work.prompt_ids))}, max_tokens "
          f"{opts.min_tokens}..{opts.max_tokens} (sum {sum(work.max_tokens)}), concurrency {opts.concurrency}",
          flush=True)
    results: list[Result] = []
    t0 = time.perf_counter()
    if "direct" in opts.modes:
        models = Models(opts.model)
        run_direct(models, work, opts, results)
        del models
    if "grpc" in opts.modes:
        with tempfile.TemporaryDirectory(prefix="bench-engine-") as logs:
            run_grpc(work, opts, results, Path(logs))
    report = {
        "benchmark": "engine", "options": options_record(opts),
        "environment": environment(),
        "total_s": time.perf_counter() - t0, "results": [asdict(r) for r in results], "ratios": ratios(results),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print()
    print(table(ENGINE_COLUMNS, [engine_cells(r) for r in results]))
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.2f}x")
    print(f"wrote {opts.out}")
    return report
