"""What the serving benchmarks (`bench engine`, `bench compare`) measure, in one result type and one JSON
schema, its summary statistics, and how a system is named on their command lines.

A system spec is `name[+speculative][:option]...`: `paged+ngram`, `tokenmill:transformers`,
`hf-static:gguf`, `tokenmill:none:float32`. Each option is recognised by its value: a dtype
(float32, bfloat16, float16), a weight format (`--quantization`) or a model implementation (`--model-impl`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(slots=True)
class Sample:
    ttft: float
    latency: float
    tokens: int


@dataclass
class Result:
    system: str  # as given on the command line, e.g. "paged", "tokenmill:transformers", "llama.cpp"
    transport: str  # "direct" (in-process), "grpc gateway+worker", "http /v1/chat/completions", ...
    workload: str
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    requests_per_hour: float
    ttft_p50_s: float
    ttft_p95_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    peak_rss_mib: float
    load_avg_1m: float
    extra: dict[str, Any] = field(default_factory=dict)  # KV blocks, speculation, gateway RSS, ...


@dataclass(slots=True)
class SystemSpec:
    name: str
    speculative: str = "off"
    dtype: str = ""
    quantization: str = ""
    model_impl: str = ""
    activations: str = ""  # "activations=int8": the worker's --activations
    kv_cache_dtype: str = ""  # "kv-cache-dtype=float16": the worker's --kv-cache-dtype

    @classmethod
    def parse(cls, spec: str) -> SystemSpec:
        from services.worker.engine.kv_cache import KV_CACHE_DTYPES
        from services.worker.engine.layers.linear import ACTIVATIONS
        from services.worker.engine.models.engine_model import MODEL_IMPLS
        from services.worker.engine.models.weights import QUANTIZATIONS

        head, *options = spec.split(":")
        name, _, speculative = head.partition("+")
        out = cls(name, speculative or "off")
        for opt in options:
            key, eq, value = opt.partition("=")
            if eq and key == "activations" and value in ACTIVATIONS:
                out.activations = value
            elif eq and key == "kv-cache-dtype" and value in KV_CACHE_DTYPES:
                out.kv_cache_dtype = value
            elif opt in DTYPES:
                out.dtype = opt
            elif opt in QUANTIZATIONS:
                out.quantization = opt
            elif opt in MODEL_IMPLS:
                out.model_impl = opt
            else:
                raise ValueError(f"{spec!r}: option {opt!r} is none of dtype {DTYPES}, quantization "
                                 f"{QUANTIZATIONS}, model impl {MODEL_IMPLS}, activations=" + "|".join(ACTIVATIONS)
                                 + " or kv-cache-dtype=" + "|".join(KV_CACHE_DTYPES))
        return out

    def worker_args(self) -> list[str]:
        """The worker flags this spec sets (the rest stay at the worker's defaults)."""
        args = ["--speculative", self.speculative]
        for flag, value in (("--dtype", self.dtype), ("--quantization", self.quantization),
                            ("--model-impl", self.model_impl), ("--activations", self.activations),
                            ("--kv-cache-dtype", self.kv_cache_dtype)):
            if value:
                args += [flag, value]
        return args


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def summarise(system: str, transport: str, workload: str, concurrency: int, samples: list[Sample], wall: float,
              rss: int) -> Result:
    tokens = sum(s.tokens for s in samples)
    ttft, lat = [s.ttft for s in samples], [s.latency for s in samples]
    return Result(system, transport, workload, concurrency, len(samples), wall, tokens, tokens / wall,
                  len(samples) / wall * 3600, percentile(ttft, 0.5), percentile(ttft, 0.95), percentile(lat, 0.5),
                  percentile(lat, 0.95), percentile(lat, 0.99), rss / 2**20, os.getloadavg()[0])
