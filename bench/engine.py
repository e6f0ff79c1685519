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
import contextlib
import gc
import json
import os
import random
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.results import Result, Sample, SystemSpec, environment, summarise

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


@dataclass
class Workload:
    prompts: list[str]
    prompt_ids: list[list[int]]
    max_tokens: list[int]


REPEAT_ASKS = ("Rewrite this paragraph, keeping its words:", "Copy this paragraph exactly:",
               "Repeat this paragraph with one word changed:")


def repeat_prompts(n: int) -> list[str]:
    from bench.phases.common import heldout_text

    paragraphs = [p.strip() for p in heldout_text().split("\n\n") if p.strip()]
    return [f"{REPEAT_ASKS[(i // len(paragraphs)) % len(REPEAT_ASKS)]}\n\n{paragraphs[i % len(paragraphs)]}"
            for i in range(n)]


def build_workload(tokenizer: Any, opts: Options) -> Workload:
    from services.judge.stories import chat_messages, sample_prompts

    if opts.workload not in ("story", "repeat"):
        raise ValueError(f"workload {opts.workload!r}: use story or repeat")
    prompts = sample_prompts(opts.requests, opts.seed) if opts.workload == "story" else repeat_prompts(opts.requests)
    ids = [tokenizer.apply_chat_template(chat_messages(p), add_generation_prompt=True, tokenize=True,
                                         return_dict=False) for p in prompts]
    rng = random.Random(opts.seed)
    return Workload(prompts, ids, [rng.randint(opts.min_tokens, opts.max_tokens) for _ in prompts])


class Sampler(threading.Thread):
    """Polls callables every `period` s in the background: peak RSS of some pids, plus custom probes."""

    def __init__(self, pids: list[int], probe: Callable[[], None] | None = None, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.procs = [psutil.Process(p) for p in pids]
        self.probe, self.period = probe, period
        self.peak_rss = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        rss = 0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        if self.probe is not None:
            self.probe()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


async def closed_loop(n: int, concurrency: int, one: Callable[[int], Awaitable[Sample]]) -> tuple[list[Sample], float]:
    """`concurrency` clients, each sending its next request as soon as its previous one finished."""
    next_index = iter(range(n))
    samples: list[Sample] = []

    async def client() -> None:
        for i in next_index:
            samples.append(await one(i))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, n))))
    return samples, time.perf_counter() - t0


# ---- direct: the engine behind AsyncEngine, in this process ---------------------------------------------
class Models:
    """The models the direct runs need, loaded once per (engine kind, format, impl, dtype)."""

    def __init__(self, opts: Options) -> None:
        self.opts, self.cache = opts, {}

    def get(self, spec: SystemSpec) -> Any:
        from services.common.model_loader import load_engine_model, load_model

        static = spec.name == "hf-static"
        key = (static, spec.quantization, spec.model_impl, spec.dtype)
        if key not in self.cache:
            quant, dtype = spec.quantization or "auto", spec.dtype or "auto"
            self.cache[key] = (load_model(self.opts.model, quant, dtype=dtype) if static else
                               load_engine_model(self.opts.model, quant, dtype=dtype,
                                                 model_impl=spec.model_impl or "auto"))
        return self.cache[key]


def make_engine(kind: str, models: Models, opts: Options) -> Any:
    from services.common.config import WorkerConfig

    cfg, spec = WorkerConfig(), SystemSpec.parse(kind)
    loaded = models.get(spec)
    if spec.name == "hf-static":
        from services.common.sampling import SamplingParams
        from services.worker.engine.hf_static import HFStaticEngine
        from services.worker.engine.types import Request

        loaded.model.set_attn_implementation("sdpa")  # the paged engine may have installed its own
        engine = HFStaticEngine(loaded.model, loaded.tokenizer, cfg.max_batch_size, cfg.max_model_len)
        engine.add_request(Request("warmup", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0)))
        engine.step()  # like the paged engine's warmup: the first generate() pays for lazy init
        return engine
    from services.worker.engine.engine import PagedEngine, engine_options

    cfg.speculative = spec.speculative
    cfg.kv_cache_memory = opts.kv_cache_memory or cfg.kv_cache_memory
    if opts.spec_max_batch >= 0:
        cfg.speculative_max_batch = opts.spec_max_batch
    engine = PagedEngine(loaded.model, loaded.tokenizer, **engine_options(cfg))
    engine.warmup()
    return engine


class KVProbe:
    """KV reserved vs held. Paged: blocks in use vs tokens held, from engine stats after each step.
    hf-static: each generate() call reserves batch x (padded prompt + longest max_tokens) tokens."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.peak_blocks, self.total = engine, 0, 0
        self.reserved = self.held = 0
        if engine.name == "hf-static":
            inner = engine._generate

            def generate(batch: list) -> list[list[int]]:
                out = inner(batch)
                width = max(len(r.prompt_token_ids) for r in batch)
                steps = max((len(o) for o in out), default=0)
                self.reserved += len(batch) * (width + steps) * steps
                self.held += sum((len(r.prompt_token_ids) + min(r.params.max_tokens, _until_eos(o, engine.eos_ids)))
                                 for r, o in zip(batch, out, strict=True)) * steps
                return out

            engine._generate = generate

    def __call__(self, stats: Any) -> None:
        if self.engine.name != "paged":
            return
        used = stats.total_kv_blocks - stats.free_kv_blocks
        self.peak_blocks, self.total = max(self.peak_blocks, used), stats.total_kv_blocks
        if stats.kv_tokens:
            self.reserved += used * self.engine.block_size
            self.held += stats.kv_tokens

    def ratio(self) -> float:
        return self.reserved / self.held if self.held else 0.0


def _until_eos(tokens: list[int], eos: set[int]) -> int:
    return next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))


async def timed(front: Any, request: Any) -> Sample:
    """One request through an AsyncEngine: its time to first token, latency and output tokens."""
    t0 = time.perf_counter()
    first, tokens = 0.0, 0
    async for ev in front.generate([request]):
        if ev.token_ids and not first:
            first = time.perf_counter()
        tokens += len(ev.token_ids)
        if ev.error_message:
            raise RuntimeError(ev.error_message)
    end = time.perf_counter()
    return Sample((first or end) - t0, end - t0, tokens)


def direct_front(kind: str, models: Models, opts: Options) -> tuple[Any, Any, KVProbe]:
    """(AsyncEngine, engine, KVProbe fed after every step) for `kind`, the engine built on the AsyncEngine's
    thread as the worker builds it (one OpenMP team: see AsyncEngine)."""
    from services.worker.engine.async_engine import AsyncEngine

    probes: list[KVProbe] = []

    def build() -> Any:
        engine = make_engine(kind, models, opts)
        probe = KVProbe(engine)
        inner_step = engine.step

        def step() -> list:
            events = inner_step()
            probe(engine.stats())
            return events

        engine.step = step
        probes.append(probe)
        return engine

    front = AsyncEngine(build)
    return front, front.ready.result(), probes[0]


def run_direct(models: Models, work: Workload, opts: Options, results: list[Result]) -> None:
    from services.common.sampling import SamplingParams
    from services.worker.engine.types import Request

    for conc in opts.concurrency:
        for kind in opts.engines:
            front, engine, probe = direct_front(kind, models, opts)

            async def one(i: int, front: Any = front) -> Sample:
                return await timed(front, Request(f"bench-{i}", work.prompt_ids[i], SamplingParams(
                    max_tokens=work.max_tokens[i], temperature=0.0)))

            try:
                with Sampler([os.getpid()]) as mem:
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
            print_row(res)
            del engine, front, one, probe
            gc.collect()  # the engine's KV pool: free it before the next run measures its RSS


# ---- gRPC: gateway + worker as processes ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_grpc(work: Workload, opts: Options, results: list[Result], log_dir: Path) -> None:
    import grpc

    from services.common.pb import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
    from services.local import launch, stop_all, wait_serving

    for kind in opts.engines:
        wport, gport = _free_port(), _free_port()
        spec = SystemSpec.parse(kind)
        wargs = ["worker", "--port", str(wport), "--engine", spec.name, "--model", opts.model, *spec.worker_args()]
        if opts.spec_max_batch >= 0:
            wargs += ["--speculative-max-batch", str(opts.spec_max_batch)]
        if opts.kv_cache_memory:
            wargs += ["--kv-cache-memory", opts.kv_cache_memory]
        if opts.threads:
            wargs += ["--threads", str(opts.threads)]
        worker = launch(f"bench-worker-{kind}", wargs, f"127.0.0.1:{wport}", log_dir)
        gateway = launch(f"bench-gateway-{kind}", ["gateway", "--port", str(gport), "--workers", f"127.0.0.1:{wport}"],
                         f"127.0.0.1:{gport}", log_dir)
        try:
            wait_serving([worker, gateway], 300)
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

            async def session(conc: int, address: str = gateway.address) -> tuple[list[Sample], float]:
                async with grpc.aio.insecure_channel(address) as chan:
                    stub = inference_pb2_grpc.InferenceStub(chan)

                    async def one(i: int) -> Sample:
                        req = inference_pb2.GenerateRequest(
                            messages=[inference_pb2.ChatMessage(role="user", content=work.prompts[i])],
                            sampling=inference_pb2.SamplingParams(max_tokens=work.max_tokens[i], temperature=0.0))
                        t0 = time.perf_counter()
                        first, tokens = 0.0, 0
                        async for chunk in stub.GenerateStream(req, timeout=3600):
                            if (chunk.token_ids or chunk.text) and not first:
                                first = time.perf_counter()
                            tokens += len(chunk.token_ids)
                        end = time.perf_counter()
                        return Sample((first or end) - t0, end - t0, tokens)

                    await one(0)  # warm the path
                    return await closed_loop(len(work.prompts), conc, one)

            for conc in opts.concurrency:
                kv["peak"] = 0
                with Sampler([worker.proc.pid], probe, period=0.5) as mem:
                    samples, wall = asyncio.run(session(conc))
                res = summarise(kind, "grpc", opts.workload, conc, samples, wall, mem.peak_rss)
                res.extra.update(kv_blocks_used_peak=kv["peak"], kv_blocks_total=kv["total"])
                res.extra["gateway_rss_mib"] = psutil.Process(gateway.proc.pid).memory_info().rss / 2**20
                results.append(res)
                print_row(res)
            wchan.close()
        finally:
            stop_all([gateway, worker])


# ---- report -----------------------------------------------------------------------------------------------
COLUMNS = ("system", "mode", "conc", "tok/s", "req/h", "TTFT p50", "TTFT p95", "lat p50", "lat p95", "RSS MiB",
           "KV blocks used/total", "KV reserved/held")


def row(r: Result) -> list[str]:
    used, total, over = (r.extra.get(k, 0) for k in ("kv_blocks_used_peak", "kv_blocks_total", "kv_reserved_over_held"))
    return [r.system, r.transport, str(r.concurrency), f"{r.output_tok_s:.1f}", f"{r.requests_per_hour:.0f}",
            f"{r.ttft_p50_s:.2f}s", f"{r.ttft_p95_s:.2f}s", f"{r.latency_p50_s:.2f}s", f"{r.latency_p95_s:.2f}s",
            f"{r.peak_rss_mib:.0f}", f"{used}/{total}" if total else "-", f"{over:.2f}x" if over else "-"]


def print_row(r: Result) -> None:
    print("  " + " | ".join(f"{c}={v}" for c, v in zip(COLUMNS, row(r), strict=True)), flush=True)


def table(results: list[Result]) -> str:
    rows = [list(COLUMNS)] + [row(r) for r in results]
    widths = [max(len(x[i]) for x in rows) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


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
    work = build_workload(load_tokenizer(opts.model), opts)
    print(f"workload: {len(work.prompts)} requests, prompt tokens {sum(map(len, work.prompt_ids))}, max_tokens "
          f"{opts.min_tokens}..{opts.max_tokens} (sum {sum(work.max_tokens)}), concurrency {opts.concurrency}",
          flush=True)
    results: list[Result] = []
    t0 = time.perf_counter()
    if "direct" in opts.modes:
        models = Models(opts)
        run_direct(models, work, opts, results)
        del models
    if "grpc" in opts.modes:
        with tempfile.TemporaryDirectory(prefix="bench-engine-") as logs:
            run_grpc(work, opts, results, Path(logs))
    report = {
        "benchmark": "engine", "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "environment": environment(),
        "total_s": time.perf_counter() - t0, "results": [asdict(r) for r in results], "ratios": ratios(results),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print()
    print(table(results))
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.2f}x")
    print(f"wrote {opts.out}")
    return report
