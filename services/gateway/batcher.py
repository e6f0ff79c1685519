"""The gateway's queue and dispatcher: bounded admission, dynamic batches, retries on worker failure.

A batch is formed when some worker has room: up to `max_batch_size` requests
(and no more than the worker's room) and `max_batch_tokens` prompt tokens,
waiting at most `max_wait_ms` after the oldest request arrived for it to fill
(no wait for an idle worker whose engine batches continuously).
Every accepted request ends with exactly one final chunk (a result or an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc

from services.common.config import GatewayConfig
from services.common.grpc_util import FINISH_NAMES, code_name, status_code
from services.common.pb import inference_pb2, worker_pb2
from services.common.sampling import SamplingParams
from services.gateway import metrics
from services.gateway.router import WorkerHandle, WorkerPool

log = logging.getLogger("tokenmill.batcher")

MAX_ATTEMPTS = 3
NO_WORKER_GRACE_S = 5.0
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.CANCELLED}


class QueueFull(Exception):
    pass


@dataclass(slots=True)
class Chunk:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: tuple[grpc.StatusCode, str] | None = None

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
    committed: bool = False  # tokens reached the client: it can no longer be retried elsewhere
    done: bool = False
    worker: WorkerHandle | None = None
    attempts: int = 0
    dispatched: float = 0.0
    first_token: float = 0.0
    batch_size: int = 0

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


class Batcher:
    def __init__(self, pool: WorkerPool, config: GatewayConfig) -> None:
        self.pool = pool
        self.config = config
        self._heap: list[tuple[int, int, Pending]] = []
        self._seq = itertools.count()
        self._retry_seq = itertools.count(-1, -1)  # retries go ahead of requests that arrived later
        self._arrived = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._main: asyncio.Task | None = None

    def __len__(self) -> int:
        return sum(1 for *_, p in self._heap if not p.done)

    def start(self) -> None:
        self._main = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._main:
            self._main.cancel()
        for t in list(self._tasks):
            t.cancel()

    # ---- admission ----------------------------------------------------------
    def submit(self, p: Pending) -> None:
        if len(self) >= self.config.max_queued_requests:
            metrics.requests.labels("RESOURCE_EXHAUSTED").inc()
            raise QueueFull(f"queue is full ({self.config.max_queued_requests} requests waiting); retry later")
        self._push(p, next(self._seq))

    def _push(self, p: Pending, seq: int) -> None:
        heapq.heappush(self._heap, (p.priority, seq, p))
        metrics.queue_depth.set(len(self))
        self._arrived.set()

    def cancel(self, p: Pending) -> None:
        """The client went away: drop it from the queue, or cancel it on its worker."""
        if p.done:
            return
        p.finish(Chunk(finish_reason="cancelled"))
        metrics.requests.labels("CANCELLED").inc()
        if p.worker is not None and p.request_id in p.worker.inflight:
            task = asyncio.create_task(self._cancel_on_worker(p.worker, p.request_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        metrics.queue_depth.set(len(self))

    @staticmethod
    async def _cancel_on_worker(w: WorkerHandle, request_id: str) -> None:
        try:
            await w.stub.Cancel(worker_pb2.CancelRequest(request_ids=[request_id]), timeout=5)
        except grpc.aio.AioRpcError as exc:
            log.warning("cancel of %s on %s failed: %s", request_id, w.address, exc.code().name)

    # ---- batch formation ------------------------------------------------------
    def _drop_done(self) -> None:
        while self._heap and self._heap[0][2].done:
            heapq.heappop(self._heap)

    def _take(self, limit: int) -> list[Pending]:
        batch: list[Pending] = []
        tokens = 0
        skipped = []
        while self._heap and len(batch) < limit:
            prio, seq, p = heapq.heappop(self._heap)
            if p.done:
                continue
            if batch and tokens + len(p.prompt_ids) > self.config.max_batch_tokens:
                skipped.append((prio, seq, p))
                break
            batch.append(p)
            tokens += len(p.prompt_ids)
        for item in skipped:
            heapq.heappush(self._heap, item)
        metrics.queue_depth.set(len(self))
        return batch

    async def _wait(self, event: asyncio.Event, timeout: float) -> None:
        event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def _run(self) -> None:
        no_worker_since: float | None = None
        while True:
            self._drop_done()
            if not self._heap:
                await self._wait(self._arrived, 1.0)
                continue
            worker = self.pool.pick()
            if worker is None:
                if self.pool.live():
                    no_worker_since = None
                else:
                    no_worker_since = no_worker_since or time.monotonic()
                    if time.monotonic() - no_worker_since > NO_WORKER_GRACE_S:
                        self._fail_all(grpc.StatusCode.UNAVAILABLE, "no worker is available; retry later")
                await self._wait(self.pool.changed, 0.2)
                continue
            no_worker_since = None
            limit = min(self.config.max_batch_size, worker.room)
            oldest = min(p.received for *_, p in self._heap if not p.done)
            # An idle continuous-batching worker gains nothing from the window: later arrivals join its
            # running batch at the next engine step. Waiting would only add to this request's TTFT.
            wait = 0.0 if worker.continuous and not worker.inflight else self.config.max_wait_ms / 1000
            fill_by = oldest + wait
            while len(self) < limit and (left := fill_by - time.monotonic()) > 0:
                await self._wait(self._arrived, left)
            if not worker.live or worker.room <= 0:
                continue
            batch = self._take(min(limit, worker.room))
            if batch:
                task = asyncio.create_task(self._dispatch(worker, batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _fail_all(self, code: grpc.StatusCode, message: str) -> None:
        for *_, p in self._heap:
            if not p.done:
                metrics.requests.labels(code.name).inc()
                p.finish(Chunk(error=(code, message)))
        self._heap.clear()
        metrics.queue_depth.set(0)

    # ---- dispatch ---------------------------------------------------------------
    async def _dispatch(self, worker: WorkerHandle, batch: list[Pending]) -> None:
        now = time.monotonic()
        by_id = {p.request_id: p for p in batch}
        for p in batch:
            p.worker, p.dispatched, p.batch_size = worker, now, len(batch)
            worker.inflight[p.request_id] = p.params.max_tokens
        metrics.batch_size.observe(len(batch))
        metrics.outstanding.labels(worker.address).set(len(worker.inflight))
        request = worker_pb2.SubmitRequest(requests=[
            worker_pb2.WorkerRequest(request_id=p.request_id, prompt_token_ids=p.prompt_ids, priority=p.priority,
                                     sampling=p.params.to_proto(inference_pb2.SamplingParams))
            for p in batch
        ])
        unfinished = set(by_id)
        try:
            async for ev in worker.stub.Submit(request):
                p = by_id.get(ev.request_id)
                if p is None:
                    continue
                self._on_event(worker, p, ev)
                if ev.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                    unfinished.discard(ev.request_id)
                    worker.inflight.pop(ev.request_id, None)
                    worker.served += 1
                    self.pool.notify()
            if unfinished:
                raise ConnectionError("worker closed the stream before finishing every request")
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.warning("worker %s failed a batch (%s: %s)", worker.address, code.name, detail)
            if code == grpc.StatusCode.UNAVAILABLE:
                self.pool.mark_down(worker)
            for rid in unfinished:
                self._retry_or_fail(by_id[rid], code, f"worker {worker.address} failed: {detail}")
        finally:
            for p in batch:
                worker.inflight.pop(p.request_id, None)
            metrics.outstanding.labels(worker.address).set(len(worker.inflight))
            self.pool.notify()

    def _on_event(self, worker: WorkerHandle, p: Pending, ev: worker_pb2.WorkerEvent) -> None:
        if p.done:
            return
        if ev.token_ids:
            if not p.first_token:
                p.first_token = time.monotonic()
                metrics.ttft.observe(p.first_token - p.received)
            p.token_ids.extend(ev.token_ids)
            p.text.append(ev.text)
            worker.inflight[p.request_id] = max(0, worker.inflight.get(p.request_id, 0) - len(ev.token_ids))
            if p.streaming:
                p.committed = True
                p.out.put_nowait(Chunk(ev.text, list(ev.token_ids)))
        if ev.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED:
            return
        p.usage = ev.usage
        if ev.finish_reason == inference_pb2.FINISH_REASON_ERROR:
            code = status_code(code_name(ev.error_code))
            metrics.requests.labels(code.name).inc()
            p.finish(Chunk(error=(code, ev.error_message or "worker error")))
        else:
            metrics.requests.labels("OK").inc()
            metrics.e2e.observe(time.monotonic() - p.received)
            p.finish(Chunk(finish_reason=FINISH_NAMES[ev.finish_reason]))

    def _retry_or_fail(self, p: Pending, code: grpc.StatusCode, message: str) -> None:
        if p.done:
            return
        if code in RETRYABLE and not p.committed and p.attempts + 1 < MAX_ATTEMPTS:
            p.attempts += 1
            p.token_ids.clear()
            p.text.clear()
            p.worker, p.first_token = None, 0.0
            metrics.retries.inc()
            log.info("retrying %s (attempt %d)", p.request_id, p.attempts + 1)
            self._push(p, next(self._retry_seq))
            return
        if p.committed:
            message = (f"{message}; {len(p.token_ids)} tokens had already been streamed, so the request "
                       "was not retried: resend it")
        metrics.requests.labels("UNAVAILABLE").inc()
        p.finish(Chunk(error=(grpc.StatusCode.UNAVAILABLE, message)))
