"""The Judge gRPC service: rubric scores in [0, 1] for (prompt, response) pairs.

Score (one item), ScoreBatch (many, results in request order), ScoreStream (items scored as they arrive,
results streamed back as they finish, matched by id), ListRubrics, and Compare (two responses, judged in
both orders and averaged). Every item is validated before any
scoring: bad input is INVALID_ARGUMENT with a message that says what to change. Backend failures come
back as the backend's status (UNAVAILABLE, FAILED_PRECONDITION, INTERNAL), never as a silent default.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from services.common.config import JudgeConfig
from services.common.pb import judge_pb2, judge_pb2_grpc
from services.common.sampling import InvalidRequest
from services.judge import metrics
from services.judge.backends import build_backend
from services.judge.rubrics import METHODS, Rubric, RubricRegistry
from services.judge.types import BackendError, CompareItem, ItemScore, ScoreItem
from services.judge.wire import combine_orders, dimensions_from_proto, result_to_proto, rubric_to_proto

log = logging.getLogger("tokenmill.judge")

MAX_BATCH_ITEMS = 1024
MAX_ID_CHARS = 256


class JudgeServicer(judge_pb2_grpc.JudgeServicer):
    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        extra = [Path(p) for p in config.rubrics.split(",") if p.strip()] if config.rubrics else []
        self.rubrics = RubricRegistry(extra)
        self.backend = build_backend(config, [self.rubrics.get(n) for n in self.rubrics.names])
        self.max_chars = config.max_text_chars

    async def prepare(self) -> None:
        await self.backend.start()
        log.info("judge ready: backend=%s model=%s rubrics=%s", self.backend.name, self.backend.model_name,
                 ", ".join(self.rubrics.names))

    async def close(self) -> None:
        await self.backend.close()

    # ------------------------------------------------------------ validation
    def _check_text(self, what: str, text: str) -> None:
        if not text.strip():
            raise InvalidRequest(f"{what} is empty: send the {what} text to judge")
        if len(text) > self.max_chars:
            raise InvalidRequest(
                f"{what} has {len(text)} characters; the judge takes at most {self.max_chars} "
                f"(--max-text-chars): send a shorter {what}")

    def _rubric_and_method(self, req: Any) -> tuple[Rubric, str]:
        rubric = self.rubrics.resolve(req.rubric, dimensions_from_proto(req.dimensions))
        methods = self.backend.methods
        if req.method and req.method in METHODS and req.method not in methods:
            raise InvalidRequest(f"method {req.method!r} needs the local backend; the {self.backend.name} backend "
                                 f"judges by {', '.join(methods)}: leave method empty or use {methods[0]}")
        method = rubric.resolve_method(req.method) if req.method or rubric.method in methods else methods[0]
        return rubric, method

    def _checked(self, req: Any, *texts: str) -> tuple[Rubric, str]:
        """Check the id, the prompt and the named response fields; the request's rubric and method."""
        if len(req.id) > MAX_ID_CHARS:
            raise InvalidRequest(f"id has {len(req.id)} characters; at most {MAX_ID_CHARS}")
        for what in ("prompt", *texts):
            self._check_text(what, getattr(req, what))
        return self._rubric_and_method(req)

    def item_from_request(self, req: judge_pb2.ScoreRequest) -> ScoreItem:
        """Validate one request and turn it into a ScoreItem; raises InvalidRequest."""
        rubric, method = self._checked(req, "response")
        item = ScoreItem(id=req.id, prompt=req.prompt, response=req.response, rubric=rubric, method=method)
        self.backend.check(item)
        return item

    def pair_from_request(self, req: judge_pb2.CompareRequest) -> CompareItem:
        rubric, method = self._checked(req, "response_a", "response_b")
        item = CompareItem(req.id, req.prompt, req.response_a, req.response_b, rubric, method)
        self.backend.check(item)
        return item

    async def _ready(self, context: grpc.aio.ServicerContext) -> None:
        if not self.backend.ready:
            metrics.errors.labels("UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the judge is still loading its model; retry shortly")

    async def _abort(self, context: grpc.aio.ServicerContext, code: str, message: str) -> None:
        metrics.errors.labels(code).inc()
        await context.abort(getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL), message)

    async def _judge(self, call: Callable[[list], Awaitable[list]], items: list,
                     context: grpc.aio.ServicerContext) -> list:
        """Run a backend call; its BackendError becomes the call's status."""
        t0 = time.perf_counter()
        try:
            results = await call(items)
        except BackendError as exc:
            await self._abort(context, exc.code, str(exc))
        for _ in items:
            metrics.latency.observe(time.perf_counter() - t0)
        return results

    async def _score(self, items: list[ScoreItem], context: grpc.aio.ServicerContext) -> list[ItemScore]:
        return await self._judge(self.backend.score, items, context)

    # ------------------------------------------------------------ RPCs
    async def Score(self, request: judge_pb2.ScoreRequest, context: grpc.aio.ServicerContext):
        await self._ready(context)
        try:
            item = self.item_from_request(request)
        except InvalidRequest as exc:
            await self._abort(context, "INVALID_ARGUMENT", str(exc))
        (result,) = await self._score([item], context)
        return result_to_proto(result, item.method)

    async def ScoreBatch(self, request: judge_pb2.ScoreBatchRequest, context: grpc.aio.ServicerContext):
        await self._ready(context)
        if not request.items:
            await self._abort(context, "INVALID_ARGUMENT", "items is empty: send at least one ScoreRequest")
        if len(request.items) > MAX_BATCH_ITEMS:
            await self._abort(context, "INVALID_ARGUMENT",
                              f"{len(request.items)} items; at most {MAX_BATCH_ITEMS} per ScoreBatch: split the batch")
        items = []
        for i, req in enumerate(request.items):
            try:
                items.append(self.item_from_request(req))
            except InvalidRequest as exc:
                await self._abort(context, "INVALID_ARGUMENT", f"items[{i}] (id {req.id!r}): {exc}")
        results = await self._score(items, context)
        return judge_pb2.ScoreBatchResponse(
            results=[result_to_proto(r, it.method) for r, it in zip(results, items, strict=True)])

    async def ScoreStream(self, request_iterator: Any, context: grpc.aio.ServicerContext):
        """Score each request as it arrives; yield results as they finish (match them by id)."""
        await self._ready(context)
        done: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        end = object()
        started = 0

        async def one(item: ScoreItem) -> None:
            try:
                (res,) = await self.backend.score([item])
                res = result_to_proto(res, item.method)
            except BackendError as exc:
                res = exc
            await done.put(res)

        async def reader() -> None:
            nonlocal started
            try:
                async for req in request_iterator:
                    try:
                        item = self.item_from_request(req)
                    except InvalidRequest as exc:
                        await done.put(InvalidRequest(f"request {started} (id {req.id!r}): {exc}"))
                        return
                    started += 1
                    task = asyncio.create_task(one(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except Exception as exc:  # the client's side of the stream broke
                await done.put(exc)
                return
            await done.put(end)

        read = asyncio.create_task(reader())
        received, ended = 0, False
        try:
            while not (ended and received == started):
                got = await done.get()
                if got is end:
                    ended = True
                    continue
                received += 1
                yield await self._stream_item(got, context)
        finally:
            read.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_item(self, item: Any, context: grpc.aio.ServicerContext) -> judge_pb2.ScoreResponse:
        if isinstance(item, InvalidRequest):
            await self._abort(context, "INVALID_ARGUMENT", str(item))
        if isinstance(item, BackendError):
            await self._abort(context, item.code, str(item))
        if isinstance(item, Exception):
            raise item
        return item

    async def Compare(self, request: judge_pb2.CompareRequest, context: grpc.aio.ServicerContext):
        """Judge the pair with A shown first and with B shown first, in one batch, and average the two."""
        await self._ready(context)
        try:
            item = self.pair_from_request(request)
        except InvalidRequest as exc:
            await self._abort(context, "INVALID_ARGUMENT", str(exc))
        a_first, b_first = await self._judge(self.backend.compare, [item, item.swapped()], context)
        return combine_orders(a_first, b_first, request, item.rubric.name, item.method)

    async def ListRubrics(self, request: judge_pb2.ListRubricsRequest, context: grpc.aio.ServicerContext):
        return judge_pb2.ListRubricsResponse(rubrics=[rubric_to_proto(self.rubrics.get(n)) for n in self.rubrics.names])


def run(config: JudgeConfig) -> None:
    from services.common.log import setup_logging
    from services.common.server import serve, start_metrics_server

    setup_logging("judge")
    start_metrics_server(config.metrics_port, config.host)
    try:
        servicer = JudgeServicer(config)
    except ValueError as exc:  # a broken rubric file
        raise SystemExit(f"judge: {exc}") from None

    asyncio.run(serve(
        name="judge", host=config.host, port=config.port,
        service_names=[judge_pb2.DESCRIPTOR.services_by_name["Judge"].full_name],
        register=lambda server: judge_pb2_grpc.add_JudgeServicer_to_server(servicer, server),
        prepare=servicer.prepare, grace_period_s=config.grace_period_s, on_shutdown=servicer.close,
    ))


if __name__ == "__main__":  # `python -m services.judge.server --port 50071` without the full CLI
    import typer

    from services.common.config import typer_command

    typer.run(typer_command(JudgeConfig, "judge", run))
