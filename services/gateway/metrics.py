"""Gateway metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

QUALITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

queue_depth = Gauge("tokenmill:gateway_queue_depth", "Requests waiting in the gateway queue")
queue_capacity = Gauge("tokenmill:gateway_queue_capacity", "The queue's bound (--max-queued-requests)")
batch_size = Histogram("tokenmill:gateway_batch_size", "Requests per batch sent to a worker",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
requests = Counter("tokenmill:gateway_requests", "Requests by final status", ["status"])
ttft = Histogram("tokenmill:gateway_time_to_first_token_seconds", "TTFT seen at the gateway", buckets=LATENCY_BUCKETS)
e2e = Histogram("tokenmill:gateway_e2e_request_latency_seconds", "End-to-end latency at the gateway",
                buckets=LATENCY_BUCKETS)
outstanding = Gauge("tokenmill:gateway_worker_outstanding_requests", "Requests in flight per worker", ["worker"])
queue_time = Histogram("tokenmill:gateway_queue_time_seconds", "Time a request waited in the gateway queue before "
                       "its batch was dispatched (each attempt)", buckets=LATENCY_BUCKETS)
workers_live = Gauge("tokenmill:gateway_workers_live", "Workers currently healthy")
retries = Counter("tokenmill:gateway_retries", "Requests re-dispatched after a worker failure")
routing_decisions = Counter(
    "tokenmill:routing_prefix_hits", "Routing decisions by reason: prefix (to a worker holding the longest cached "
    "prefix of the prompt), session, balance (the guard overrode the best-scored worker), load (a less-loaded "
    "worker beat a longer cached prefix on score), miss (no worker holds enough of it), least_loaded",
    ["reason"])
predicted_cached_tokens = Counter("tokenmill:routing_predicted_cached_tokens",
                                  "Prompt tokens the prefix index expected the chosen worker to have cached")
cached_tokens = Counter("tokenmill:routing_cached_tokens", "Prompt tokens the workers reported served from cache")
worker_load = Gauge("tokenmill:routing_worker_load", "Requests in flight per worker as the router sees them",
                    ["worker"])
index_blocks = Gauge("tokenmill:routing_index_blocks", "Block hashes the prefix index holds per worker", ["worker"])
index_evictions = Counter("tokenmill:routing_index_evictions", "Block hashes dropped from the prefix index, by "
                          "cause: worker (it reported the eviction), lru (bound), down, resync", ["cause"])
# live quality (quality.py): the judge's scores of a sample of completed requests
quality_score = Histogram("tokenmill:quality_score", "Judge scores (0..1) of sampled completed requests, per "
                          "rubric dimension and overall", ["model", "worker", "dimension"], buckets=QUALITY_BUCKETS)
quality_sampled = Counter("tokenmill:quality_sampled", "Completed requests sampled for the judge")
quality_judged = Counter("tokenmill:quality_judged", "Sampled requests the judge scored")
quality_dropped = Counter("tokenmill:quality_dropped", "Sampled requests dropped because the judge queue was full")
quality_errors = Counter("tokenmill:quality_errors", "Judge calls that failed, by gRPC status", ["code"])
quality_queue = Gauge("tokenmill:quality_queue_depth", "Sampled requests waiting for the judge")
