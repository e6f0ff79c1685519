"""A request's life inside the gateway: from admission to its final chunk (result or error)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.pb import inference_pb2
from services.common.sampling import SamplingParams
from services.gateway.pool import WorkerHandle


class QueueFull(Exception):
    pass


@dataclass(slots=True)
class Output:
    """One choice's result so far (sampling.n > 1: one per choice, by index)."""

    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class Chunk:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: tuple[grpc.StatusCode, str] | None = None
    logprobs: list = field(default_factory=list)  # TokenLogprob per token, when the request asked
    index: int = 0  # the choice it belongs to (sampling.n > 1)
    last: bool = True  # False on the finish of a choice while other choices go on

    @property
    def final(self) -> bool:
        return (self.finish_reason is not None and self.last) or self.error is not None


def coalesce(chunk: Chunk, queue: asyncio.Queue) -> tuple[Chunk, Chunk | None]:
    """`chunk` with the token chunks of its choice already waiting behind it in `queue`, as one chunk (one write
    instead of several when the caller fell behind; vLLM's output collector merges the same way; nothing waits for
    more), and the first queued chunk that cannot join (a finish, an error, another choice), or None."""
    while chunk.finish_reason is None and chunk.error is None and not queue.empty():
        nxt = queue.get_nowait()
        if nxt.finish_reason is not None or nxt.error is not None or nxt.index != chunk.index:
            return chunk, nxt
        chunk = Chunk(chunk.text + nxt.text, chunk.token_ids + nxt.token_ids, logprobs=chunk.logprobs + nxt.logprobs,
                      index=chunk.index)
    return chunk, None


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
    route: Any = None  # the routing policy's Choice for its current attempt
    hashes: dict[int, list[int]] = field(default_factory=dict)  # block size -> its cacheable prompt blocks' hashes
    queued: float = 0.0  # when it (last) joined the queue: a retry waits again
    source: Any = None  # (prompt, messages) as sent, kept for the judge when live quality is on
    span: Any = None  # tracing: the request's root span (None when tracing is off)
    dispatch_span: Any = None  # tracing: the current attempt's dispatch span

    def __post_init__(self) -> None:
        # choice 0 is token_ids / text / logprobs themselves; sampling.n > 1 adds one Output per further choice
        self.outputs = [Output(self.token_ids, self.text, self.logprobs)] + [Output() for _ in range(self.params.n - 1)]

    def output(self, index: int) -> Output:
        return self.outputs[index] if 0 <= index < len(self.outputs) else self.outputs[0]

    def end_choice(self, index: int, reason: str) -> bool:
        """Choice `index` ended with `reason`; True while other choices go on (its finish then goes out as a
        chunk of its own when streaming)."""
        self.output(index).finish_reason = reason
        if all(o.finish_reason is not None for o in self.outputs):
            return False
        if self.streaming:
            self.out.put_nowait(Chunk(finish_reason=reason, index=index, last=False))
        return True

    def clear_outputs(self) -> None:
        """A retry starts every choice over."""
        for o in self.outputs:
            o.token_ids.clear()
            o.text.clear()
            o.logprobs.clear()
            o.finish_reason = None

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
