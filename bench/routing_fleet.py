"""A benchmark fleet: N paged workers and a gateway with one routing mode, as processes on 127.0.0.1, and the
counters the routing benchmark reads from their /metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from services.common.metrics import sample_sum
from services.local import Service, launch, stop_all, wait_serving

REASONS = ("prefix", "session", "balance", "load", "miss", "least_loaded")


class Fleet:
    def __init__(self, routing: str, workers: int, threads: int, model: str, kv_cache_memory: str, log_dir: Path,
                 free_port: Callable[[], int]) -> None:
        self.routing, self.n, self.threads, self.model = routing, workers, threads, model
        self.kv_cache_memory, self.log_dir, self.free_port = kv_cache_memory, log_dir, free_port
        self.services: list[Service] = []
        self.metrics_urls: list[str] = []
        self.gateway_http = ""

    @property
    def address(self) -> str:
        return self.services[-1].address

    @property
    def worker_addresses(self) -> list[str]:
        return [s.address for s in self.services[:-1]]

    def __enter__(self) -> Fleet:
        try:
            for i in range(self.n):
                port, mport = self.free_port(), self.free_port()
                self.services.append(launch(
                    f"{self.routing}-worker-{i}",
                    ["worker", "--port", str(port), "--metrics-port", str(mport), "--engine", "paged", "--model",
                     self.model, "--threads", str(self.threads), "--kv-cache-memory", self.kv_cache_memory],
                    f"127.0.0.1:{port}", self.log_dir))
                self.metrics_urls.append(f"http://127.0.0.1:{mport}/metrics")
            port, hport = self.free_port(), self.free_port()
            workers = ",".join(s.address for s in self.services)
            self.services.append(launch(
                f"{self.routing}-gateway", ["gateway", "--port", str(port), "--http-port", str(hport), "--routing",
                                            self.routing, "--workers", workers],
                f"127.0.0.1:{port}", self.log_dir))
            self.gateway_http = f"http://127.0.0.1:{hport}/metrics"
            wait_serving(self.services, 600)
        except BaseException:
            stop_all(self.services)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        stop_all(self.services)

    def counters(self) -> dict[str, Any]:
        """The workers' prefix-cache and preemption counters (summed) and the gateway's routing reasons."""
        out: dict[str, Any] = {"queries": 0.0, "hits": 0.0, "preemptions": 0.0}
        for url in self.metrics_urls:
            text = httpx.get(url, timeout=10).text
            out["queries"] += sample_sum(text, "vllm:prefix_cache_queries_total")
            out["hits"] += sample_sum(text, "vllm:prefix_cache_hits_total")
            out["preemptions"] += sample_sum(text, "vllm:num_preemptions_total")
        text = httpx.get(self.gateway_http, timeout=10).text
        out["reasons"] = {r: sample_sum(text, "tokenmill:routing_prefix_hits_total", reason=r) for r in REASONS}
        return out
