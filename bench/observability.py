"""What observability costs (issue 27): throughput through gateway + worker with tracing and live quality off and on.

    python -m bench.observability [--requests 24] [--concurrency 8] [--rounds 2] [--before TREE] [--tree TREE]

`tokenmill bench engine`'s gRPC run (its story workload, greedy, max_tokens drawn per request, its closed loop
and summaries) once per configuration, each a fresh worker + gateway on 127.0.0.1:

  off      tracing and live quality off (the defaults)
  tracing  worker and gateway export every span over OTLP/gRPC to a receiver in this process
  quality  the gateway sends --sample-rate (10 %) of completed requests to a judge process on this machine
  before   --before: the services of another source tree (a git worktree of the code without issue 27)

Rounds interleave the configurations (off, tracing, quality, before, off, ...), so a drift of the machine's load
hits each alike; the summary is each configuration's mean output tok/s over the rounds and its ratio to `off`.
`--tree`: run this tree's services from another checkout (e.g. a worktree of HEAD without uncommitted work).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONFIGS = ("off", "tracing", "quality")


class SpanReceiver:
    """A real OTLP/gRPC trace endpoint on 127.0.0.1: keeps every span it is sent, with its service name."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans: list[dict] = []
        outer = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for rs in request.resource_spans:
                    service = next((a.value.string_value for a in rs.resource.attributes
                                    if a.key == "service.name"), "")
                    for ss in rs.scope_spans:
                        outer.spans.extend({"service": service, "name": s.name, "trace": s.trace_id.hex(),
                                            "id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                                            "start": s.start_time_unix_nano, "end": s.end_time_unix_nano}
                                           for s in ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)


@dataclass
class Options:
    requests: int = 24
    concurrency: int = 8
    min_tokens: int = 32
    max_tokens: int = 128
    rounds: int = 2
    configs: tuple[str, ...] = CONFIGS
    sample_rate: float = 0.1
    before: Path | None = None
    tree: Path | None = None
    threads: int = 0
    seed: int = 0
    model: str = "smollm2-135m"
    workload: str = "story"
    out: Path = Path("results/observability.json")
    notes: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(config: str, work: Any, opts: Options, log_dir: Path, otlp: str, judge: str) -> Any:
    import grpc
    import httpx

    from bench.engine import closed_loop, summarise
    from bench.results import Sample
    from services.common.metrics import sample_sum
    from services.common.pb import inference_pb2, inference_pb2_grpc
    from services.local import launch, stop_all, wait_serving

    tree = opts.before if config == "before" else opts.tree
    wport, gport, mport = _free_port(), _free_port(), _free_port()
    wargs = ["worker", "--port", str(wport), "--model", opts.model]
    gargs = ["gateway", "--port", str(gport), "--workers", f"127.0.0.1:{wport}", "--metrics-port", str(mport)]
    if opts.threads:
        wargs += ["--threads", str(opts.threads)]
    if config == "tracing":
        wargs += ["--otlp-traces-endpoint", otlp]
        gargs += ["--otlp-traces-endpoint", otlp]
    if config == "quality":
        gargs += ["--judge-address", judge, "--judge-sample-rate", str(opts.sample_rate)]
    worker = launch(f"obs-worker-{config}", wargs, f"127.0.0.1:{wport}", log_dir, cwd=tree)
    gateway = launch(f"obs-gateway-{config}", gargs, f"127.0.0.1:{gport}", log_dir, cwd=tree)
    try:
        wait_serving([worker, gateway], 600)

        async def session() -> tuple[list[Sample], float]:
            async with grpc.aio.insecure_channel(gateway.address) as chan:
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
                return await closed_loop(len(work.prompts), opts.concurrency, one)

        samples, wall = asyncio.run(session())
        res = summarise(config, "grpc", opts.workload, opts.concurrency, samples, wall, 0)
        metrics = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text
        for name in ("sampled", "judged", "dropped", "errors"):
            res.extra[f"quality_{name}"] = sample_sum(metrics, f"tokenmill:quality_{name}_total")
        return res
    finally:
        stop_all([gateway, worker])


def summary(results: list[Any]) -> dict[str, Any]:
    by: dict[str, list[float]] = {}
    for r in results:
        by.setdefault(r.system, []).append(r.output_tok_s)
    mean = {k: sum(v) / len(v) for k, v in by.items()}
    base = mean.get("off")
    return {"mean_output_tok_s": mean, "per_round_output_tok_s": by,
            "ratio_to_off": {k: v / base for k, v in mean.items()} if base else {}}


def main(opts: Options) -> dict[str, Any]:
    from bench.engine import Options as EngineOptions
    from bench.engine import build_workload, print_row, table
    from bench.results import environment
    from services.common.model_loader import load_tokenizer
    from services.local import launch, stop_all, wait_serving

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "1000")  # the SDK's batch exporter: every second
    configs = [*opts.configs, *(["before"] if opts.before and "before" not in opts.configs else [])]
    eopts = EngineOptions(requests=opts.requests, min_tokens=opts.min_tokens, max_tokens=opts.max_tokens,
                          seed=opts.seed, model=opts.model, workload=opts.workload)
    work = build_workload(load_tokenizer(opts.model), eopts)
    print(f"workload: {len(work.prompts)} requests, max_tokens {opts.min_tokens}..{opts.max_tokens} "
          f"(sum {sum(work.max_tokens)}), concurrency {opts.concurrency}; configs {configs} x {opts.rounds} rounds",
          flush=True)
    receiver = SpanReceiver()
    results, spans, t0 = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-observability-") as logs:
        judge = None
        if "quality" in configs:
            jport = _free_port()
            judge = launch("obs-judge", ["judge", "--port", str(jport), "--model", opts.model],
                           f"127.0.0.1:{jport}", Path(logs), cwd=opts.tree)
            wait_serving([judge], 600)
        try:
            for _ in range(opts.rounds):
                for config in configs:
                    before = len(receiver.spans)
                    res = run_config(config, work, opts, Path(logs), receiver.address,
                                     judge.address if judge else "")
                    res.extra["spans_received"] = len(receiver.spans) - before
                    spans[config] = spans.get(config, 0) + res.extra["spans_received"]
                    results.append(res)
                    print_row(res)
                    print(f"    spans {res.extra['spans_received']}, quality sampled/judged/dropped/errors "
                          f"{res.extra['quality_sampled']:.0f}/{res.extra['quality_judged']:.0f}/"
                          f"{res.extra['quality_dropped']:.0f}/{res.extra['quality_errors']:.0f}", flush=True)
        finally:
            if judge is not None:
                stop_all([judge])
            receiver.stop()
    report = {
        "benchmark": "observability",
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "environment": environment(), "total_s": time.perf_counter() - t0,
        "results": [asdict(r) for r in results], "summary": summary(results),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print()
    print(table(results))
    for name, ratio in report["summary"]["ratio_to_off"].items():
        print(f"{name}/off: {ratio:.3f}")
    print(f"wrote {opts.out}")
    return report


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.observability", description=__doc__.split("\n\n")[0])
    d = Options()
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--min-tokens", type=int, default=d.min_tokens)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--configs", default=",".join(d.configs), help="comma separated: off, tracing, quality")
    p.add_argument("--sample-rate", type=float, default=d.sample_rate, help="live quality's --judge-sample-rate")
    p.add_argument("--before", type=Path, help="a source tree to run as the 'before' configuration")
    p.add_argument("--tree", type=Path, help="run the other configurations' services from this source tree")
    p.add_argument("--threads", type=int, default=d.threads, help="worker --threads; 0 = its default")
    p.add_argument("--note", action="append", default=[], help="a line for the JSON's notes (the machine's state)")
    p.add_argument("--out", type=Path, default=d.out)
    a = p.parse_args(argv)
    return main(Options(requests=a.requests, concurrency=a.concurrency, min_tokens=a.min_tokens,
                        max_tokens=a.max_tokens, rounds=a.rounds, configs=tuple(a.configs.split(",")),
                        sample_rate=a.sample_rate, before=a.before, tree=a.tree, threads=a.threads,
                        out=a.out, notes=a.note))


if __name__ == "__main__":
    cli()
