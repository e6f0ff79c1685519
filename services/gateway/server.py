"""The gateway's public gRPC API (tokenmill.v1.Inference) over the queue, batcher and worker pool."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from services.common.config import GatewayConfig
from services.common.grpc_util import FINISH_REASONS
from services.common.pb import inference_pb2, inference_pb2_grpc
from services.common.sampling import InvalidRequest
from services.gateway import metrics
from services.gateway.batcher import Batcher
from services.gateway.pending import Chunk, Pending, QueueFull
from services.gateway.picker import MAX_SESSION_ID_CHARS, Picker
from services.gateway.prefix_index import PrefixIndex
from services.gateway.router import WorkerPool
from services.gateway.validation import Validator

log = logging.getLogger("tokenmill.gateway")


class GatewayError(Exception):
    """A request that ends with a status: gRPC aborts with it, HTTP maps it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Gateway:
    """Everything behind the front ends (gRPC and HTTP): validation, admission, the request's life."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        workers = [a for a in config.workers.split(",") if a.strip()]
        index = PrefixIndex(config.routing_index_blocks) if config.routing == "prefix-aware" else None
        self.picker = Picker(config, index)
        self.pool = WorkerPool(workers, config.workers_dns, index)
        self.batcher = Batcher(self.pool, self.picker, config)
        self.validator: Validator | None = None
        self._http = None

    async def start(self) -> None:
        """Find a worker, load its tokenizer, start dispatching (the gateway's `prepare`)."""
        from services.common.model_loader import load_tokenizer

        self.pool.start()
        self.batcher.start()
        if self.config.http_port:
            from services.gateway.http import start_http

            self._http = await start_http(self, self.config.host, self.config.http_port)
            log.info("OpenAI-compatible HTTP on %s:%d", self.config.host, self.config.http_port)
        await self.pool.first_info.wait()
        info = self.pool.info()
        tokenizer = await asyncio.to_thread(load_tokenizer, info.tokenizer)
        self.validator = Validator(tokenizer, info.model, info.context_length, self.config.default_max_tokens)
        log.info("serving model %s (context %d) from %d worker(s)", info.model, info.context_length,
                 len(self.pool.live()))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.cleanup()
        await self.batcher.close()
        await self.pool.close()

    def admit(self, *, request_id: str, model: str, prompt: str, messages: Sequence[tuple[str, str]],
              sampling: Any, priority: int, streaming: bool, session_id: str = "") -> Pending:
        if self.validator is None:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "gateway is starting: no worker has reported yet")
        try:
            if len(session_id) > MAX_SESSION_ID_CHARS:
                raise InvalidRequest(f"session_id is {len(session_id)} characters; at most {MAX_SESSION_ID_CHARS} "
                                     "are allowed: send a shorter conversation id (a hash of it will do)")
            prepared = self.validator.prepare(model, prompt, messages, sampling)
        except InvalidRequest as exc:
            metrics.requests.labels("INVALID_ARGUMENT").inc()
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if not self.pool.live():
            metrics.requests.labels("UNAVAILABLE").inc()
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "no worker is available; retry later")
        p = Pending(request_id or uuid.uuid4().hex, prepared.prompt_ids, prepared.params, priority, streaming,
                    session_id=session_id)
        try:
            self.batcher.submit(p)
        except QueueFull as exc:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        return p

    async def chunks(self, p: Pending) -> AsyncIterator[Chunk]:
        """The request's chunks up to and including its final one; cancels it if the caller leaves early."""
        try:
            while True:
                chunk = await p.out.get()
                if chunk.error is not None:
                    raise GatewayError(*chunk.error)
                yield chunk
                if chunk.final:
                    return
        finally:
            self.batcher.cancel(p)  # no-op once it has finished

    def response(self, p: Pending, chunk: Chunk, whole: bool) -> inference_pb2.GenerateResponse:
        final = chunk.final
        return inference_pb2.GenerateResponse(
            request_id=p.request_id,
            text="".join(p.text) if whole else chunk.text,
            token_ids=p.token_ids if whole else chunk.token_ids,
            finish_reason=FINISH_REASONS[chunk.finish_reason],
            usage=p.usage if final else None,
            timing=p.timing() if final else None,
            model=self.validator.model if self.validator else "",
        )


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def _admit(self, request: inference_pb2.GenerateRequest, context, streaming: bool) -> Pending:
        # the field, else the x-session-id metadata (which an L7 proxy in front of several gateways can hash on)
        session = request.session_id or dict(context.invocation_metadata() or ()).get("x-session-id", "")
        try:
            return self.gw.admit(
                request_id=request.request_id, model=request.model, prompt=request.prompt,
                messages=[(m.role, m.content) for m in request.messages], sampling=request.sampling,
                priority=request.priority, streaming=streaming, session_id=session)
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)

    async def Generate(self, request, context):
        p = await self._admit(request, context, streaming=False)
        try:
            async for chunk in self.gw.chunks(p):
                if chunk.final:
                    return self.gw.response(p, chunk, whole=True)
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)

    async def GenerateStream(self, request, context):
        p = await self._admit(request, context, streaming=True)
        try:
            async for chunk in self.gw.chunks(p):
                yield self.gw.response(p, chunk, whole=False)
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)

    async def ListModels(self, request, context):
        info = self.gw.pool.info()
        models = []
        if info is not None:
            models.append(inference_pb2.ModelInfo(id=info.model, context_length=info.context_length,
                                                  quantization=info.quantization, workers=len(self.gw.pool.live())))
        return inference_pb2.ListModelsResponse(models=models)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every tokenmill.v1 call must carry `authorization: Bearer <key>`; health and reflection stay open."""

    def __init__(self, api_key: str) -> None:
        self.expected = f"Bearer {api_key}"

    async def intercept_service(self, continuation, details):
        if not details.method.startswith("/tokenmill."):
            return await continuation(details)
        if dict(details.invocation_metadata or ()).get("authorization") == self.expected:
            return await continuation(details)
        handler = await continuation(details)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send metadata 'authorization: Bearer <key>'")

        if handler.response_streaming:
            async def deny_stream(request, context):
                await deny(request, context)
                yield  # pragma: no cover - makes this an async generator

            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)


def run(config: GatewayConfig) -> None:
    from services.common.log import setup_logging
    from services.common.server import serve, start_metrics_server

    setup_logging("gateway")
    try:
        gateway = Gateway(config)
    except ValueError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    start_metrics_server(config.metrics_port)
    servicer = InferenceServicer(gateway)
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name

    asyncio.run(serve(
        name="gateway", host=config.host, port=config.port, service_names=[service],
        register=lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server),
        prepare=gateway.start, grace_period_s=config.grace_period_s, on_shutdown=gateway.close,
        interceptors=[ApiKeyInterceptor(config.api_key)] if config.api_key else (),
    ))
