"""The gateway's queue and dispatcher: bounded admission, dynamic batches, retries on worker failure.

The routing policy chooses a worker for the first request in the queue; its batch is that request and the next
ones (in priority order) the policy sends to the same worker: up to `max_batch_size` requests (and no more than
the worker's room) and `max_batch_tokens` prompt tokens, waiting at most `max_wait_ms` after the oldest request
arrived for it to fill (no wait for an idle worker whose engine batches continuously).
Every accepted request ends with exactly one final chunk (a result or an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time

import grpc

from services.common import tracing
from services.common.config import GatewayConfig
from services.common.grpc_util import FINISH_NAMES, code_name, status_code
from services.common.pb import inference_pb2, worker_pb2
from services.gateway import metrics
from services.gateway.pending import Chunk, Pending, QueueFull
from services.gateway.pool import WorkerHandle, WorkerPool
from services.gateway.routing import Choice, Policy

log = logging.getLogger("tokenmill.batcher")

MAX_ATTEMPTS = 3
NO_WORKER_GRACE_S = 5.0
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.CANCELLED}
SCAN_PER_SLOT = 4  # a batch looks at most this many queued requests per free slot for ones routed its way


class Batcher:
    def __init__(self, pool: WorkerPool, routing: Policy, config: GatewayConfig) -> None:
        self.pool = pool
        self.routing = routing
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
        p.queued = time.monotonic()
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

    def _take(self, head: Pending, choice: Choice, limit: int) -> list[Pending]:
        """`head` (routed by `choice`) and, in priority order, the queued requests the policy routes to the same
        worker. Each joins the worker's in-flight set at once, so the next one's choice sees its load."""
        worker = choice.worker
        batch: list[Pending] = []
        tokens = 0
        skipped = []
        scan = SCAN_PER_SLOT * limit
        while self._heap and len(batch) < limit and scan > 0:
            item = heapq.heappop(self._heap)
            p = item[2]
            if p.done:
                continue
            scan -= 1
            if batch and tokens + len(p.prompt_ids) > self.config.max_batch_tokens:
                skipped.append(item)
                break
            p.route = choice if p is head else self.routing.joins(p, worker, self.pool.candidates())
            if p.route is None:
                skipped.append(item)
                continue
            batch.append(p)
            tokens += len(p.prompt_ids)
            worker.inflight[p.request_id] = p.params.max_tokens
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
            head = self._heap[0][2]
            choice = self.routing.choose(head, self.pool.candidates())
            if choice is None:
                if self.pool.live():
                    no_worker_since = None
                else:
                    no_worker_since = no_worker_since or time.monotonic()
                    if time.monotonic() - no_worker_since > NO_WORKER_GRACE_S:
                        self._fail_all(grpc.StatusCode.UNAVAILABLE, "no worker is available; retry later")
                await self._wait(self.pool.changed, 0.2)
                continue
            no_worker_since = None
            worker = choice.worker
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
            batch = self._take(head, choice, min(limit, worker.room))
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
            worker.inflight[p.request_id] = p.params.max_tokens * p.params.best_of
            worker.sent += 1
            self.routing.dispatched(p, p.route)
            metrics.queue_time.observe(now - p.queued)
            if p.span is not None:
                tracing.record("gateway.queue", p.span, p.queued, now, attempt=p.attempts + 1)
                p.dispatch_span = tracing.start("gateway.dispatch", p.span, now, worker=worker.address,
                                                batch_size=len(batch), attempt=p.attempts + 1)
        metrics.batch_size.observe(len(batch))
        metrics.outstanding.labels(worker.address).set(len(worker.inflight))
        request = worker_pb2.SubmitRequest(requests=[
            worker_pb2.WorkerRequest(request_id=p.request_id, prompt_token_ids=p.prompt_ids, priority=p.priority,
                                     sampling=p.params.to_proto(inference_pb2.SamplingParams))
            for p in batch
        ])
        unfinished = set(by_id)
        metadata = [(tracing.METADATA_KEY, f"{p.request_id} {tracing.traceparent(p.dispatch_span)}")
                    for p in batch if p.dispatch_span is not None]
        if len(batch) == 1 and metadata:
            metadata.append(("traceparent", metadata[0][1].split(" ", 1)[1]))
        try:
            async for ev in worker.stub.Submit(request, metadata=metadata or None):
                p = by_id.get(ev.request_id)
                if p is None:
                    continue
                self._on_event(worker, p, ev)
                if ev.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED and p.done:  # all its choices
                    unfinished.discard(ev.request_id)
                    worker.inflight.pop(ev.request_id, None)
                    worker.served += 1
                    if p.dispatch_span is not None:
                        tracing.end(p.dispatch_span, tokens=len(p.token_ids))
                        p.dispatch_span = None
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
                if p.dispatch_span is not None:  # this attempt is over (finished, failed or retried)
                    tracing.end(p.dispatch_span, tokens=len(p.token_ids))
                    p.dispatch_span = None
            metrics.outstanding.labels(worker.address).set(len(worker.inflight))
            self.pool.notify()

    def _on_event(self, worker: WorkerHandle, p: Pending, ev: worker_pb2.WorkerEvent) -> None:
        if p.done:
            return
        if ev.prompt_logprobs:  # before the first chunk goes out: it carries them
            p.prompt_logprobs = list(ev.prompt_logprobs)
        if ev.token_ids:
            if not p.first_token:
                p.first_token = time.monotonic()
                metrics.ttft.observe(p.first_token - p.received)
            out = p.output(ev.index)
            out.token_ids.extend(ev.token_ids)
            out.text.append(ev.text)
            out.logprobs.extend(ev.logprobs)
            worker.inflight[p.request_id] = max(0, worker.inflight.get(p.request_id, 0) - len(ev.token_ids))
            if p.streaming:
                p.committed = True
                p.out.put_nowait(Chunk(ev.text, list(ev.token_ids), logprobs=list(ev.logprobs), index=ev.index))
        if ev.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED:
            return
        p.usage = ev.usage  # a finishing event's usage counts every sample's tokens so far
        if ev.finish_reason in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH) and \
                p.end_choice(ev.index, FINISH_NAMES[ev.finish_reason]):
            return  # other choices (sampling.n > 1) go on
        if ev.finish_reason == inference_pb2.FINISH_REASON_ERROR:
            code = status_code(code_name(ev.error_code))
            metrics.requests.labels(code.name).inc()
            p.finish(Chunk(error=(code, ev.error_message or "worker error")))
        else:
            metrics.requests.labels("OK").inc()
            metrics.e2e.observe(time.monotonic() - p.received)
            self.routing.finished(p, worker)
            p.finish(Chunk(finish_reason=FINISH_NAMES[ev.finish_reason], index=ev.index))

    def _retry_or_fail(self, p: Pending, code: grpc.StatusCode, message: str) -> None:
        if p.done:
            return
        if code in RETRYABLE and not p.committed and p.attempts + 1 < MAX_ATTEMPTS:
            p.attempts += 1
            p.clear_outputs()
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
