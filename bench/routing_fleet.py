"""A benchmark fleet: N paged workers and a gateway with one routing mode, as processes on 127.0.0.1, and the
counters the routing benchmark reads from their /metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from bench.harness import Stack, free_port
from services.common.metrics import sample_sum

REASONS = ("prefix", "session", "balance", "load", "miss", "least_loaded")


class Fleet(Stack):
    def __init__(self, routing: str, workers: int, threads: int, model: str, kv_cache_memory: str,
                 log_dir: Path) -> None:
        metrics_ports = [free_port() for _ in range(workers)]
        http_port = free_port()
        super().__init__(
            f"{routing}-gateway",
            [(f"{routing}-worker-{i}", ["--metrics-port", str(mport), "--engine", "paged", "--model", model,
                                        "--threads", str(threads), "--kv-cache-memory", kv_cache_memory])
             for i, mport in enumerate(metrics_ports)],
            ["--http-port", str(http_port), "--routing", routing], log_dir)
        self.metrics_urls = [f"http://127.0.0.1:{p}/metrics" for p in metrics_ports]
        self.gateway_http = f"http://127.0.0.1:{http_port}/metrics"

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
