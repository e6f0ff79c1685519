"""Live quality: a sample of completed requests goes to the judge, off the request path.

When a request ends well (stop or length) the gateway draws with probability `--judge-sample-rate` (nothing
else is done for a request not drawn); a drawn one's (prompt, response, model, worker) goes on a bounded queue
at once: a full queue drops the sample and counts it, so a lagging judge never delays a client. A few tasks
(`--judge-concurrency`) take samples off the queue and call the judge's `Score`; its scores become
`tokenmill:quality_score{model, worker, dimension}` histograms (the rubric's dimensions and `overall`), so two
workers serving different quantizations of one model can be compared on live traffic. A judge error is
counted by status and logged, never surfaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass

import grpc

from services.gateway import metrics

log = logging.getLogger("tokenmill.quality")
ERROR_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL")


@dataclass(slots=True)
class Sample:
    prompt: str
    response: str
    model: str
    worker: str


class QualitySampler:
    def __init__(self, address: str, rate: float, queue_size: int = 64, concurrency: int = 4, rubric: str = "",
                 timeout_s: float = 300.0, seed: int | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"--judge-sample-rate must be in [0, 1], got {rate}")
        if rate > 0 and not address:
            raise ValueError("--judge-sample-rate needs --judge-address (the judge's host:port)")
        if queue_size < 1 or concurrency < 1:
            raise ValueError("--judge-queue-size and --judge-concurrency must be at least 1")
        self.address, self.rate, self.rubric, self.timeout_s = address, rate, rubric, timeout_s
        self.concurrency = concurrency
        self.queue: asyncio.Queue[Sample] = asyncio.Queue(queue_size)
        self._random = random.Random(seed)
        self._tasks: list[asyncio.Task] = []
        self._channel: grpc.aio.Channel | None = None

    @property
    def on(self) -> bool:
        return self.rate > 0

    def start(self) -> None:
        if not self.on:
            return
        from services.common.pb import judge_pb2_grpc

        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = judge_pb2_grpc.JudgeStub(self._channel)
        for code in ERROR_CODES:  # exported at 0 from the start, so a rate over them is 0, not "no data"
            metrics.quality_errors.labels(code)
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self.concurrency)]
        log.info("live quality: %.0f %% of completed requests to the judge at %s", 100 * self.rate, self.address)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._channel is not None:
            await self._channel.close()

    def draw(self) -> bool:
        """Whether to sample the request that just completed (with probability --judge-sample-rate)."""
        return self.on and self._random.random() < self.rate

    def put(self, prompt: str, response: str, model: str, worker: str) -> bool:
        """Queue a drawn request for the judge; never blocks: a full queue drops it (counted). True when queued."""
        if not response.strip():
            return False
        metrics.quality_sampled.inc()
        try:
            self.queue.put_nowait(Sample(prompt, response, model, worker))
        except asyncio.QueueFull:
            metrics.quality_dropped.inc()
            return False
        metrics.quality_queue.set(self.queue.qsize())
        return True

    def offer(self, prompt: str, response: str, model: str, worker: str) -> bool:
        """draw() then put()."""
        return self.draw() and self.put(prompt, response, model, worker)

    async def _run(self) -> None:
        from services.common.pb import judge_pb2

        while True:
            s = await self.queue.get()
            metrics.quality_queue.set(self.queue.qsize())
            try:
                res = await self._stub.Score(judge_pb2.ScoreRequest(prompt=s.prompt, response=s.response,
                                                                    rubric=self.rubric),
                                             timeout=self.timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                metrics.quality_errors.labels(exc.code().name).inc()
                log.warning("judge %s: %s: %s", self.address, exc.code().name, exc.details())
                continue
            except Exception:  # one bad sample must not end a judge task
                metrics.quality_errors.labels("UNKNOWN").inc()
                log.exception("judge %s: scoring a sample failed", self.address)
                continue
            for d in res.scores:
                metrics.quality_score.labels(s.model, s.worker, d.name).observe(d.score)
            metrics.quality_score.labels(s.model, s.worker, "overall").observe(res.overall)
            metrics.quality_judged.inc()


def user_prompt(prompt: str | list[int], messages: list[tuple[str, str]] | tuple, decode=None) -> str:
    """What the judge reads as the prompt: the last user message of a chat, else the prompt text (token ids
    decoded with `decode`)."""
    for role, content in reversed(list(messages)):
        if role == "user":
            return content
    if isinstance(prompt, str):
        return prompt
    return decode(prompt) if decode is not None and prompt else ""
