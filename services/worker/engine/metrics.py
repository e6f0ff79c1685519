"""Engine metrics under vLLM's names, so existing dashboards and endpoint pickers work."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS, TPOT_BUCKETS

running = Gauge("vllm:num_requests_running", "Requests in the running queue")
waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to run")
kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0..1)")
prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache")
preemptions = Counter("vllm:num_preemptions", "Sequences preempted for lack of KV blocks")
ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS)
tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token after the first", buckets=TPOT_BUCKETS)
e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in the engine", buckets=LATENCY_BUCKETS)
prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed")
generation_tokens = Counter("vllm:generation_tokens", "Tokens generated")
spec_draft = Counter("vllm:spec_decode_num_draft_tokens", "Drafted tokens verified (speculative decoding)")
spec_accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Drafted tokens accepted (speculative decoding)")
# a request's phases (vLLM's names): waiting in the engine's queue, first step to first token, first token to
# its end, first step to its end
queue_time = Histogram("vllm:request_queue_time_seconds", "Time a request waited in the engine's queue",
                       buckets=LATENCY_BUCKETS)
prefill_time = Histogram("vllm:request_prefill_time_seconds", "Time from a request's first step to its first token",
                         buckets=LATENCY_BUCKETS)
decode_time = Histogram("vllm:request_decode_time_seconds", "Time from a request's first token to its end",
                        buckets=LATENCY_BUCKETS)
inference_time = Histogram("vllm:request_inference_time_seconds", "Time from a request's first step to its end",
                           buckets=LATENCY_BUCKETS)
finished = Counter("tokenmill:worker_requests_finished", "Requests finished, by reason", ["finish_reason"])
