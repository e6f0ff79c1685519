"""A request's life inside the gateway: from admission to its final chunk (result or error)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.pb import inference_pb2
from services.common.sampling import SamplingParams
from services.gateway.router import WorkerHandle


class QueueFull(Exception):
    pass


@dataclass(slots=True)
class Chunk:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: tuple[grpc.StatusCode, str] | None = None
    logprobs: list = field(default_factory=list)  # TokenLogprob per token, when the request asked

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class Pending:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0
    streaming: bool = False
    received: float = field(default_factory=time.monotonic)
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    usage: inference_pb2.Usage = field(default_factory=inference_pb2.Usage)
    logprobs: list = field(default_factory=list)  # TokenLogprob per generated token, when asked
    prompt_logprobs: list = field(default_factory=list)  # prompt tokens 2..n, when asked
    committed: bool = False  # tokens reached the client: it can no longer be retried elsewhere
    done: bool = False
    worker: WorkerHandle | None = None
    attempts: int = 0
    dispatched: float = 0.0
    first_token: float = 0.0
    batch_size: int = 0
    session_id: str = ""
    route: Any = None  # the picker's Choice for its current attempt
    hashes: dict[int, list[int]] = field(default_factory=dict)  # block size -> its cacheable prompt blocks' hashes

    def finish(self, chunk: Chunk) -> None:
        if not self.done:
            self.done = True
            self.out.put_nowait(chunk)

    def timing(self) -> inference_pb2.Timing:
        end = time.monotonic()
        return inference_pb2.Timing(
            queue_ms=1000 * ((self.dispatched or end) - self.received),
            ttft_ms=1000 * (self.first_token - self.received) if self.first_token else 0.0,
            total_ms=1000 * (end - self.received),
            batch_size=self.batch_size,
            worker=self.worker.address if self.worker else "",
        )
