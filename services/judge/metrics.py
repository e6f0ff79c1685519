"""Judge metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)

items = Counter("tokenmill:judge_items_scored", "(prompt, response) items scored", ["backend"])
errors = Counter("tokenmill:judge_errors", "Requests answered with an error status", ["code"])
latency = Histogram("tokenmill:judge_item_latency_seconds", "Time from arrival to score, per item", buckets=BUCKETS)
batch_items = Histogram("tokenmill:judge_batch_items", "Items scored in one local forward batch",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128))
upstream_retries = Counter("tokenmill:judge_upstream_retries", "Retried calls to the OpenAI-compatible judge API")
