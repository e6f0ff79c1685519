"""Drive a synchronous engine from one thread and fan its events out to asyncio callers.

Adds and cancels are queued and applied between steps, so a cancel frees the
request's KV blocks within one engine step. A step that raises fails the
requests it held with INTERNAL and the server keeps serving.

Given a factory instead of an engine, the same thread builds (loads, warms up) the engine first: every
torch kernel of the process then runs on one thread. GNU OpenMP keeps a thread team per calling
thread, and once a second team exists (model loaded on one thread, stepped on another) the teams
outnumber the cores and its workers stop spinning between parallel regions: a decode step took 2x as
long (11.4 vs 6.1 ms at batch 1 on the 2-core machine).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from services.common.sampling import InvalidRequest
from services.worker.engine import metrics
from services.worker.engine.types import FINISH_CANCELLED, FINISH_ERROR, Engine, Event, Request, Stats

log = logging.getLogger("tokenmill.engine")


@dataclass(slots=True)
class _Tracked:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    prompt_tokens: int
    first_token: float = 0.0
    tokens: int = 0
    scheduled: float = 0.0  # start of the first engine step that ran it (its worker queue time ends)
    choices: int = 1  # choices still to finish (n > 1: each ends with its own stop / length event)


@dataclass(slots=True)
class _Inbox:
    adds: list[Request] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)


class AsyncEngine:
    def __init__(self, engine: Engine | Callable[[], Engine], step_delay_s: float = 0.0) -> None:
        """`engine`, or a factory that builds it on the engine thread (then await `ready` before use)."""
        self.step_delay_s = step_delay_s
        self._tracked: dict[str, _Tracked] = {}
        self._inbox = _Inbox()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}  # engine thread only
        self._wake = threading.Condition()
        self._stopping = False
        self._unscheduled: set[str] = set()  # admitted, not yet run by a step (engine thread only)
        # request id -> (arrival, scheduled, first token, end) of finished requests, kept for the caller to
        # pop when keep_phases is set (tracing: the servicer records the worker's spans from them)
        self.keep_phases = False
        self.phases: dict[str, tuple[float, float, float, float]] = {}
        self.ready: Future[Engine] = Future()
        factory = engine if callable(engine) and not hasattr(engine, "step") else None
        if factory is None:
            self._set_engine(engine)
        self._thread = threading.Thread(target=self._run, args=(factory,), name="engine", daemon=True)
        self._thread.start()

    def _set_engine(self, engine: Engine) -> None:
        self.engine = engine
        self._stats = engine.stats()
        self.ready.set_result(engine)

    # ---- asyncio side -------------------------------------------------
    async def generate(self, requests: list[Request]) -> AsyncIterator[Event]:
        """Admit all requests at once; yield their events until every one has finished.

        Closing the iterator early (the client went away) cancels what is left.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        pending: dict[str, int] = {}  # request id -> choices not yet finished
        accepted: list[Request] = []
        for req in requests:
            if req.request_id in self._tracked or req.request_id in pending:
                queue.put_nowait(_error(req, "ALREADY_EXISTS", f"request_id {req.request_id!r} is already running"))
                continue
            pending[req.request_id] = req.params.n
            self._tracked[req.request_id] = _Tracked(queue, loop, time.monotonic(), len(req.prompt_token_ids),
                                                     choices=req.params.n)
            accepted.append(req)
        with self._wake:
            self._inbox.adds.extend(accepted)
            self._wake.notify()
        remaining = len(requests)
        try:
            while remaining:
                event = await queue.get()
                if event.finish_reason is not None and (not _ends_choice(event) or
                                                        pending.get(event.request_id, 1) <= 1):
                    remaining -= 1
                    pending.pop(event.request_id, None)
                elif event.finish_reason is not None:
                    pending[event.request_id] -= 1
                yield event
        finally:
            if pending:
                self.cancel(list(pending))

    def cancel(self, request_ids: list[str]) -> int:
        known = [rid for rid in request_ids if rid in self._tracked]
        with self._wake:
            self._inbox.aborts.extend(known)
            self._wake.notify()
        return len(known)

    def stats(self) -> Stats:
        return self._stats

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # ---- engine thread ----------------------------------------------------
    def _run(self, factory: Callable[[], Engine] | None) -> None:
        if factory is not None:
            try:
                self._set_engine(factory())
            except BaseException as exc:  # the caller awaiting `ready` gets the load failure
                self.ready.set_exception(exc)
                return
        while True:
            with self._wake:
                while not (self._stopping or self._inbox.adds or self._inbox.aborts or self.engine.has_work()):
                    self._wake.wait()
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, _Inbox()
            for req in inbox.adds:
                self._admit(req)
            cancelled = [rid for rid in inbox.aborts if rid in self._tracked and self.engine.abort_request(rid)]
            if cancelled:
                self._publish_stats()  # before the events: a caller that sees "cancelled" then asks Load sees it
            for rid in cancelled:
                self._deliver(Event(rid, [], "", finish_reason=FINISH_CANCELLED))
            if self.engine.has_work():
                self._step()
            else:
                self._publish_stats()
            self._flush()  # cancels and refused admissions when no step ran

    def _admit(self, req: Request) -> None:
        if req.request_id not in self._tracked:
            return  # cancelled before it reached the engine
        try:
            self.engine.add_request(req)
            self._unscheduled.add(req.request_id)
        except InvalidRequest as exc:
            self._deliver(_error(req, "INVALID_ARGUMENT", str(exc)))
        except Exception as exc:  # a bad request must not take the engine down
            log.exception("add_request failed for %s", req.request_id)
            self._deliver(_error(req, "INTERNAL", f"engine rejected the request: {exc}"))

    def _step(self) -> None:
        started = time.monotonic()
        try:
            events = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing its requests")
            for rid in list(self._tracked):
                self.engine.abort_request(rid)
                self._deliver(Event(rid, [], "", finish_reason=FINISH_ERROR, error_code="INTERNAL",
                                    error_message=f"engine step failed: {exc}"))
            self._publish_stats()
            return
        self._publish_stats()  # before the events, so Load never lags the requests a caller saw finish
        if self._unscheduled:
            self._mark_scheduled(started)
        for event in events:
            self._deliver(event)
        self._flush()
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    def _deliver(self, event: Event) -> None:
        tracked = self._tracked.get(event.request_id)
        if tracked is None:
            return
        now = time.monotonic()
        if event.token_ids:
            if not tracked.tokens:
                tracked.first_token = now
                metrics.ttft.observe(now - tracked.arrival)
            tracked.tokens += len(event.token_ids)
            metrics.generation_tokens.inc(len(event.token_ids))
        if event.finish_reason is not None and _ends_choice(event) and tracked.choices > 1:
            tracked.choices -= 1  # one of n choices ended; the request goes on
        elif event.finish_reason is not None:
            del self._tracked[event.request_id]
            metrics.finished.labels(event.finish_reason).inc()
            metrics.e2e.observe(now - tracked.arrival)
            self._finish_phases(event.request_id, tracked, now)
            metrics.prompt_tokens.inc(tracked.prompt_tokens)
            if tracked.tokens > 1:
                metrics.tpot.observe((now - tracked.first_token) / (tracked.tokens - 1))
        self._outbox.setdefault(tracked.loop, []).append((tracked.queue, event))

    def _mark_scheduled(self, started: float) -> None:
        """Requests the step that began at `started` ran for the first time: their queue time ends there. The
        paged engine says so per sequence; an engine without sequences (hf-static) ran all it had admitted."""
        seqs = getattr(self.engine, "seqs", None)
        for rid in list(self._unscheduled):
            seq = seqs.get(rid) if seqs is not None else None
            if seq is None or seq.first_scheduled:
                self._unscheduled.discard(rid)
                tracked = self._tracked.get(rid)
                if tracked is not None:
                    tracked.scheduled = started

    def _finish_phases(self, rid: str, tracked: _Tracked, now: float) -> None:
        """A finished request's phase histograms (vLLM's): queue, prefill, decode, inference."""
        self._unscheduled.discard(rid)
        if not tracked.scheduled:
            return  # cancelled or refused before it ran
        first = tracked.first_token or now
        metrics.queue_time.observe(tracked.scheduled - tracked.arrival)
        metrics.prefill_time.observe(max(0.0, first - tracked.scheduled))
        metrics.decode_time.observe(max(0.0, now - first))
        metrics.inference_time.observe(now - tracked.scheduled)
        if self.keep_phases:
            self.phases[rid] = (tracked.arrival, tracked.scheduled, first, now)

    def _flush(self) -> None:
        """Hand the iteration's events to their event loops: one wake-up per loop, not one per event."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _publish_stats(self) -> None:
        old, new = self._stats, self.engine.stats()
        self._stats = new
        metrics.running.set(new.running)
        metrics.waiting.set(new.waiting)
        if new.total_kv_blocks:
            metrics.kv_usage.set(1 - new.free_kv_blocks / new.total_kv_blocks)
        metrics.prefix_queries.inc(max(0, new.prefix_cache_queries - old.prefix_cache_queries))
        metrics.prefix_hits.inc(max(0, new.prefix_cache_hits - old.prefix_cache_hits))
        metrics.preemptions.inc(max(0, new.num_preemptions - old.num_preemptions))
        metrics.spec_draft.inc(max(0, new.spec_draft_tokens - old.spec_draft_tokens))
        metrics.spec_accepted.inc(max(0, new.spec_accepted_tokens - old.spec_accepted_tokens))


def _error(req: Request, code: str, message: str) -> Event:
    return Event(req.request_id, [], "", finish_reason=FINISH_ERROR, prompt_tokens=len(req.prompt_token_ids),
                 error_code=code, error_message=message)


def _ends_choice(event: Event) -> bool:
    """stop / length end one choice of a request; an error or a cancel ends the whole request."""
    return event.finish_reason not in (FINISH_CANCELLED, FINISH_ERROR)


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
