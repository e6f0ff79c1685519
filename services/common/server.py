"""gRPC server bootstrap shared by every service.

The server starts answering at once with health NOT_SERVING, loads what it
needs (the model) in `prepare`, then turns SERVING. On SIGTERM/SIGINT it turns
NOT_SERVING, stops accepting new RPCs and gives in-flight ones `grace_period_s`
to finish.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]

log = logging.getLogger("tokenmill.server")


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """A request that does not parse (e.g. invalid UTF-8 in a string field) gets INVALID_ARGUMENT, not UNKNOWN."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer

        def safe(data: bytes):
            try:
                return deserialize(data)
            except Exception as exc:
                return _Undecodable(exc)

        async def reject(request, context) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request could not be parsed ({request.error}); strings must be valid UTF-8")

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    await reject(request, context)
                responses = inner_stream(request, context)
                if inspect.isawaitable(responses):  # a handler that writes with context.write (health Watch)
                    await responses
                    return
                async for item in responses:
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, safe, handler.response_serializer)
        inner = handler.unary_unary

        async def unary(request, context):
            if isinstance(request, _Undecodable):
                await reject(request, context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, safe, handler.response_serializer)


class HealthServicer(health.aio.HealthServicer):
    """grpc's health servicer whose Watch streams can be ended: a draining server tells its watchers
    NOT_SERVING, then closes their streams so they do not hold the drain for the whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._watches: set[asyncio.Task] = set()
        self._ending = False

    async def Watch(self, request, context) -> None:
        task = asyncio.ensure_future(super().Watch(request, context))
        self._watches.add(task)
        try:
            await task
        except asyncio.CancelledError:
            if not self._ending:  # the RPC itself was cancelled (the watcher left)
                raise
        finally:
            self._watches.discard(task)

    async def end_watches(self) -> None:
        if self._watches:
            await asyncio.sleep(0.1)  # the NOT_SERVING just set goes out on every stream first
        self._ending = True
        for task in list(self._watches):
            task.cancel()


async def serve(
    *,
    name: str,
    host: str,
    port: int,
    service_names: Sequence[str],
    register: Callable[[grpc.aio.Server], None],
    prepare: Callable[[], Awaitable[None]],
    grace_period_s: float,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Run a gRPC server until a signal; `register` adds the servicers, `prepare` loads the model.
    With `credentials` the port speaks TLS only (services/common/tls.py)."""
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[DecodeErrorInterceptor(), *interceptors])
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    register(server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise SystemExit(f"{name}: cannot bind {host}:{port} (port in use?)")

    async def set_status(status: int) -> None:
        for svc in ("", *service_names):
            await health_servicer.set(svc, status)

    await set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("%s listening on %s:%d (NOT_SERVING until ready)", name, host, bound)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    prepare_task = asyncio.create_task(prepare())
    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({prepare_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if prepare_task in done:
        if (exc := prepare_task.exception()) is not None:  # a load failure: say why, exit non-zero
            log.error("%s failed to start: %s: %s", name, type(exc).__name__, exc, exc_info=exc)
            await server.stop(0)
            raise SystemExit(f"{name} failed to start: {exc}")
        await set_status(health_pb2.HealthCheckResponse.SERVING)
        log.info("%s SERVING on %s:%d", name, host, bound)
        await stop_task
    else:
        prepare_task.cancel()

    # NOT_SERVING first: gateways watching the health stream stop routing here at once, while the
    # requests already running get the grace period to finish
    await set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.end_watches()
    log.info("%s draining (grace %.0fs)", name, grace_period_s)
    await server.stop(grace_period_s)
    if on_shutdown is not None:
        await on_shutdown()
    log.info("%s stopped", name)


def start_metrics_server(port: int, host: str) -> None:
    """Prometheus /metrics on host:port (the service's own --host: a laptop run exposes nothing)."""
    if port:
        from services.common.metrics import start_http_server

        try:
            start_http_server(port, host)
        except OSError as exc:
            raise SystemExit(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        log.info("metrics on %s:%d/metrics", host, port)
