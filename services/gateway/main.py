"""`tokenmill gateway`: the core (core.py) with its two fronts, gRPC (server.py) and OpenAI HTTP (http.py).

The only module that knows both fronts: each one depends on the core alone, so either can be read or
replaced by itself.
"""

from __future__ import annotations

import asyncio
import logging

from services.common.config import GatewayConfig

log = logging.getLogger("tokenmill.gateway")


def run(config: GatewayConfig) -> None:
    from services.common import tracing
    from services.common.log import setup_logging
    from services.common.pb import inference_pb2, inference_pb2_grpc
    from services.common.server import serve, start_metrics_server
    from services.common.tls import server_credentials, server_ssl_context
    from services.gateway.core import Gateway
    from services.gateway.server import ApiKeyInterceptor, InferenceServicer

    setup_logging("gateway")
    tracing.setup("tokenmill-gateway", config.otlp_traces_endpoint)
    credentials = server_credentials(config.tls_cert, config.tls_key)
    ssl_context = server_ssl_context(config.tls_cert, config.tls_key)
    try:
        gateway = Gateway(config)
    except ValueError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    start_metrics_server(config.metrics_port, config.host)
    servicer = InferenceServicer(gateway)
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    http = None

    async def prepare() -> None:
        nonlocal http
        if config.http_port:
            from services.gateway.http import start_http

            http = await start_http(gateway, config.host, config.http_port, ssl_context)
            log.info("OpenAI-compatible HTTP%s on %s:%d", "S" if ssl_context else "", config.host, config.http_port)
        await gateway.start()

    async def shutdown() -> None:
        if http is not None:
            await http.cleanup()
        await gateway.close()
        tracing.shutdown()

    asyncio.run(serve(
        name="gateway", host=config.host, port=config.port, service_names=[service],
        register=lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server),
        prepare=prepare, grace_period_s=config.grace_period_s, on_shutdown=shutdown,
        interceptors=[ApiKeyInterceptor(config.api_key)] if config.api_key else (), credentials=credentials,
    ))
