"""How the serving benchmarks drive a system: free ports, a stack of workers and a gateway as processes, one
request into a Sample (streamed over gRPC, or through an in-process AsyncEngine), closed-loop clients, and a
poller of peak memory. Standard library only at import: bench/peers/llama_probe.py runs without the venv."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.results import Sample


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """Workers and a gateway over them, as `tokenmill` processes on free ports of 127.0.0.1 (services.local.launch).

    `workers`: each worker's process name and its flags after `worker --port P`; the gateway runs
    `gateway --port P --workers <theirs>` plus `gateway_args`. `cwd`: the services of that source tree. start() /
    stop(), or a context manager (which stops what it started when the start fails)."""

    def __init__(self, gateway: str, workers: list[tuple[str, list[str]]], gateway_args: list[str], log_dir: Path,
                 *, cwd: Path | None = None, timeout_s: float = 600.0) -> None:
        self.gateway_name, self.worker_specs, self.gateway_args = gateway, workers, gateway_args
        self.log_dir, self.cwd, self.timeout_s = log_dir, cwd, timeout_s
        self.worker_ports = [free_port() for _ in workers]
        self.gateway_port = free_port()
        self.services: list[Any] = []  # services.local.Service: the gateway, then the workers

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def worker_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.worker_ports]

    @property
    def gateway(self) -> Any:
        return self.services[0]

    @property
    def workers(self) -> list[Any]:
        return self.services[1:]

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.services]

    def start(self) -> None:
        from services.local import launch, wait_serving

        workers: list[Any] = []
        self.services = workers  # stop() reaches those launched should a later launch fail
        for (name, args), port, address in zip(self.worker_specs, self.worker_ports, self.worker_addresses,
                                               strict=True):
            workers.append(launch(name, ["worker", "--port", str(port), *args], address, self.log_dir, cwd=self.cwd))
        gateway = launch(self.gateway_name, ["gateway", "--port", str(self.gateway_port), "--workers",
                                             ",".join(self.worker_addresses), *self.gateway_args],
                         self.address, self.log_dir, cwd=self.cwd)
        self.services = [gateway, *workers]
        wait_serving(self.services, self.timeout_s)

    def stop(self) -> None:
        from services.local import stop_all

        stop_all(self.services)
        self.services = []

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def chat_request(messages: list[tuple[str, str]], max_tokens: int, *, ignore_eos: bool = False,
                 session_id: str = "") -> Any:
    """A greedy Inference.GenerateRequest of (role, content) messages."""
    from services.common.pb import inference_pb2 as pb

    return pb.GenerateRequest(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages], session_id=session_id,
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                         ignore_eos=ignore_eos))


async def stream_chat(stub: Any, request: Any, timeout: float = 3600) -> tuple[Sample, Any, str]:
    """One Inference.GenerateStream call: its Sample (time to the first token, latency, output tokens), its last
    chunk (usage, timing) and its text."""
    t0 = time.perf_counter()
    first, tokens, last, text = 0.0, 0, None, []
    async for chunk in stub.GenerateStream(request, timeout=timeout):
        if (chunk.token_ids or chunk.text) and not first:
            first = time.perf_counter()
        tokens += len(chunk.token_ids)
        text.append(chunk.text)
        last = chunk
    end = time.perf_counter()
    return Sample((first or end) - t0, end - t0, tokens), last, "".join(text)


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


async def closed_loop(n: int, concurrency: int, one: Callable[[int], Awaitable[Any]]) -> tuple[list[Any], float]:
    """`concurrency` clients, each sending its next request as soon as its previous one finished."""
    next_index = iter(range(n))
    samples: list[Any] = []

    async def client() -> None:
        for i in next_index:
            samples.append(await one(i))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(min(concurrency, n))))
    return samples, time.perf_counter() - t0


class MemoryPoller(threading.Thread):
    """Polls every `period` s in the background: the peak summed RSS of some pids, plus a custom probe."""

    def __init__(self, pids: list[int], probe: Callable[[], None] | None = None, period: float = 0.2) -> None:
        import psutil

        super().__init__(daemon=True)
        self.procs = [psutil.Process(p) for p in pids]
        self.gone = psutil.Error
        self.probe, self.period = probe, period
        self.peak_rss = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        rss = 0
        for p in self.procs:
            with contextlib.suppress(self.gone):
                rss += p.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        if self.probe is not None:
            self.probe()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.sample()

    def __enter__(self) -> MemoryPoller:
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop_event.set()
        self.join()
        self.sample()
