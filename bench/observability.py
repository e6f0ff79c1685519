"""What observability costs (issue 27): throughput through gateway + worker with tracing and live quality off and on.

    tokenmill bench observability [--requests 24] [--concurrency 8] [--rounds 2] [--before TREE] [--tree TREE]

`tokenmill bench engine`'s gRPC run (its story workload, greedy, max_tokens drawn per request; `bench compare`'s
gateway + worker session, closed loop and summaries) once per configuration, each a fresh worker + gateway on
127.0.0.1:

  off      tracing and live quality off (the defaults)
  tracing  worker and gateway export every span over OTLP/gRPC to a receiver in this process
  quality  the gateway sends --sample-rate (10 %) of completed requests to a judge process on this machine,
           paused while the timed run lasts (--judge-running: not), so the judge model's compute, which in
           Kubernetes has its own pod, is not counted against the gateway; it then scores the backlog
  before   --before: the services of another source tree (a git worktree of the code without issue 27)

Rounds interleave the configurations (off, tracing, quality, before, off, ...), so a drift of the machine's load
hits each alike. The summary is each configuration's mean over the rounds, and its ratio to `off`, of output
tok/s and of the CPU seconds (user + system) the gateway spent per request and the worker per output token: on
a machine whose cores other work shares, throughput swings with that work, CPU time per unit of work much less.
`--tree`: run this tree's services from another checkout (e.g. a worktree of HEAD without uncommitted work).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.harness import Stack, free_port
from bench.report import ENGINE_COLUMNS, engine_cells, environment, options_record, print_row, table
from bench.results import Result, summarise
from bench.systems import GrpcSuite
from bench.workloads import Work, drawn_work

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
    judge_running: bool = False  # let the judge compute during the timed run (see run_config)
    before: Path | None = None
    tree: Path | None = None
    threads: int = 0
    seed: int = 0
    model: str = "smollm2-135m"
    workload: str = "story"
    out: Path = Path("results/observability.json")
    notes: list[str] = field(default_factory=list)


class Suite(GrpcSuite):
    """`bench compare`'s gateway + worker (its streaming session), with a configuration's flags and source tree."""

    def __init__(self, config: str, opts: Options, log_dir: Path, otlp: str, judge: str) -> None:
        self.name, self.opts, self.log_dir, self.stack = config, opts, log_dir, None
        self.tree = opts.before if config == "before" else opts.tree
        self.metrics_port = free_port()
        self.wargs = ["--model", opts.model]
        self.gargs = ["--metrics-port", str(self.metrics_port)]
        if opts.threads:
            self.wargs += ["--threads", str(opts.threads)]
        if config == "tracing":
            self.wargs += ["--otlp-traces-endpoint", otlp]
            self.gargs += ["--otlp-traces-endpoint", otlp]
        if config == "quality":
            self.gargs += ["--judge-address", judge, "--judge-sample-rate", str(opts.sample_rate)]

    def make_stack(self) -> Stack:
        return Stack(f"obs-gateway-{self.name}", [(f"obs-worker-{self.name}", self.wargs)], self.gargs, self.log_dir,
                     cwd=self.tree)

    def quality_counts(self, wait_s: float = 600.0) -> dict[str, float]:
        """The gateway's live-quality counters once the judge has worked off its backlog (so that it does not
        run on these cores into the next configuration's turn)."""
        import httpx

        from services.common.metrics import sample_sum

        deadline = time.monotonic() + wait_s
        while True:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
            counts = {n: sample_sum(text, f"tokenmill:quality_{n}_total")
                      for n in ("sampled", "judged", "dropped", "errors")}
            if counts["judged"] + counts["dropped"] + counts["errors"] >= counts["sampled"] \
                    or time.monotonic() > deadline:
                return counts
            time.sleep(1.0)


def run_config(config: str, work: Work, opts: Options, log_dir: Path, otlp: str, judge: Any) -> Result:
    """One configuration's timed session. Under `quality` the judge process is paused (SIGSTOP) while it runs,
    unless opts.judge_running: the gateway still draws, queues and sends every sample (the calls wait in the
    judge's socket), but the judge model's compute, which in a cluster runs on its own pod, stays off the 2
    cores the worker uses; it scores the backlog after the timed run."""
    suite = Suite(config, opts, log_dir, otlp, judge.address if judge else "")
    try:
        suite.start(opts.concurrency)
        asyncio.run(suite.session(work, 1, 1))  # warm the path
        procs = [psutil.Process(pid) for pid in suite.pids()]  # gateway, worker
        cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
        paused = psutil.Process(judge.proc.pid) if judge and config == "quality" and not opts.judge_running \
            else None
        if paused:
            paused.suspend()
        try:
            samples, wall = asyncio.run(suite.session(work, len(work.prompts), opts.concurrency))
        finally:
            if paused:
                paused.resume()
        cpu = [sum(p.cpu_times()[:2]) - c for p, c in zip(procs, cpu0, strict=True)]
        res = summarise(config, "grpc", opts.workload, opts.concurrency, samples, wall, 0)
        # CPU seconds the processes spent (user + system): what the feature costs, much less sensitive than
        # throughput to other work sharing the cores
        tokens = max(1, res.output_tokens)
        res.extra.update(gateway_cpu_s=cpu[0], worker_cpu_s=cpu[1], worker_cpu_ms_per_token=1e3 * cpu[1] / tokens,
                         gateway_cpu_ms_per_request=1e3 * cpu[0] / res.requests)
        res.extra.update({f"quality_{n}": v for n, v in suite.quality_counts().items()})
        return res
    finally:
        suite.stop()


def summary(results: list[Any]) -> dict[str, Any]:
    """Per configuration, the mean over rounds of throughput and CPU per unit of work, and each over `off`'s."""
    keys = {"output_tok_s": lambda r: r.output_tok_s,
            "gateway_cpu_ms_per_request": lambda r: r.extra["gateway_cpu_ms_per_request"],
            "worker_cpu_ms_per_token": lambda r: r.extra["worker_cpu_ms_per_token"]}
    out: dict[str, Any] = {}
    for key, get in keys.items():
        by: dict[str, list[float]] = {}
        for r in results:
            by.setdefault(r.system, []).append(get(r))
        mean = {k: sum(v) / len(v) for k, v in by.items()}
        out[key] = {"per_round": by, "mean": mean,
                    "ratio_to_off": {k: v / mean["off"] for k, v in mean.items()} if mean.get("off") else {}}
    return out


def main(opts: Options) -> dict[str, Any]:
    from services.common.model_loader import load_tokenizer
    from services.local import launch, stop_all, wait_serving

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "1000")  # the SDK's batch exporter: every second
    configs = [*opts.configs, *(["before"] if opts.before and "before" not in opts.configs else [])]
    work = drawn_work(load_tokenizer(opts.model), opts.workload, opts.requests, opts.seed, opts.min_tokens,
                      opts.max_tokens)
    print(f"workload: {len(work.prompts)} requests, max_tokens {opts.min_tokens}..{opts.max_tokens} "
          f"(sum {sum(work.max_tokens)}), concurrency {opts.concurrency}; configs {configs} x {opts.rounds} rounds",
          flush=True)
    receiver = SpanReceiver()
    results, spans, t0 = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-observability-") as logs:
        judge = None
        if "quality" in configs:
            jport = free_port()
            judge = launch("obs-judge", ["judge", "--port", str(jport), "--model", opts.model],
                           f"127.0.0.1:{jport}", Path(logs), cwd=opts.tree)
            wait_serving([judge], 600)
        try:
            for _ in range(opts.rounds):
                for config in configs:
                    before = len(receiver.spans)
                    res = run_config(config, work, opts, Path(logs), receiver.address,
                                     judge)
                    res.extra["spans_received"] = len(receiver.spans) - before
                    spans[config] = spans.get(config, 0) + res.extra["spans_received"]
                    results.append(res)
                    print_row(ENGINE_COLUMNS, engine_cells(res))
                    print(f"    spans {res.extra['spans_received']}, quality sampled/judged/dropped/errors "
                          f"{res.extra['quality_sampled']:.0f}/{res.extra['quality_judged']:.0f}/"
                          f"{res.extra['quality_dropped']:.0f}/{res.extra['quality_errors']:.0f}", flush=True)
        finally:
            if judge is not None:
                stop_all([judge])
            receiver.stop()
    report = {
        "benchmark": "observability",
        "options": options_record(opts),
        "environment": environment(), "total_s": time.perf_counter() - t0,
        "results": [asdict(r) for r in results], "summary": summary(results),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2))
    print()
    print(table(ENGINE_COLUMNS, [engine_cells(r) for r in results]))
    for key, value in report["summary"].items():
        print(f"{key}: " + ", ".join(f"{k} {v:.3g} ({value['ratio_to_off'].get(k, 0):.3f} x off)"
                                     for k, v in value["mean"].items()))
    print(f"wrote {opts.out}")
    return report
