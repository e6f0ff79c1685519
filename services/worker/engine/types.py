"""What every engine (paged, hf-static) takes and gives back, and the interface the worker drives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.sampling import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    grammar: Any = None  # the compiled grammar of params.structured (compiled off the engine thread)


@dataclass(slots=True)
class Logprob:
    """A position's chosen token, its log-probability, and the most likely tokens there (most likely first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class Event:
    """Tokens (and their text) a request produced since its last event; `finish_reason` on the last."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    batch_size: int = 0
    error_code: str = ""  # grpc.StatusCode name when finish_reason == "error"
    error_message: str = ""
    logprobs: list[Logprob] | None = None  # one per token_ids entry when the request asked
    prompt_logprobs: list[Logprob] | None = None  # prompt tokens 2..n, on the request's first event
    index: int = 0  # the choice it belongs to (n > 1); stop / length end that choice, the request ends with all n


@dataclass(slots=True)
class Stats:
    running: int = 0
    waiting: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    capacity: int = 0
    outstanding_tokens: int = 0
    kv_tokens: int = 0  # tokens whose K/V the running sequences hold (paged engine)
    # cumulative counters
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class Engine(Protocol):
    """Synchronous engine; `AsyncEngine` drives it from one thread."""

    name: str
    block_size: int
    max_model_len: int

    def add_request(self, request: Request) -> None:
        """Queue a request; raise InvalidRequest if it can never run (e.g. larger than the KV pool)."""

    def abort_request(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its memory; True if it was known."""

    def step(self) -> list[Event]:
        """Run one scheduling step; return the events it produced."""

    def has_work(self) -> bool: ...

    def stats(self) -> Stats: ...
