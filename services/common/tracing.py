"""OpenTelemetry tracing of a request's life across the gateway and the workers (`--otlp-traces-endpoint`).

Off by default, and then free: nothing of OpenTelemetry is imported, `enabled()` is False and every helper
returns at once. On, each service exports its spans over OTLP/gRPC with a batch processor (a background
thread; a slow or absent collector never delays a request: spans are dropped when its queue is full).

The W3C trace context travels as `traceparent` (HTTP header, gRPC metadata). The gateway sends a worker one
`Submit` per batch of requests from many traces, so each request's context goes in its own metadata entry,
`tokenmill-traceparent: <request_id> <traceparent>`; a batch of one also carries the plain `traceparent`.

Phases are measured anyway (the phase histograms need the times), so most spans are recorded after the fact
with explicit start and end times (`record`) instead of being held open across awaits.
"""

from __future__ import annotations

import time
from typing import Any

METADATA_KEY = "tokenmill-traceparent"
_tracer: Any = None
_provider: Any = None
_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()  # monotonic -> epoch nanoseconds


def enabled() -> bool:
    return _tracer is not None


def setup(service: str, endpoint: str) -> None:
    """Export this process's spans to `endpoint` (host:port, http://host:port, or https://host:port for TLS)
    over OTLP/gRPC, as `service`. No endpoint: tracing stays off."""
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    insecure = not endpoint.startswith("https://")
    target = endpoint.removeprefix("grpc://")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=target, insecure=insecure)))
    use(provider)


def use(provider: Any) -> None:
    """Trace through this TracerProvider (setup's, or a test's with an in-memory exporter); None turns it off."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("tokenmill") if provider is not None else None


def shutdown() -> None:
    """Flush what is queued (at exit)."""
    if _provider is not None:
        _provider.shutdown()


def ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as epoch nanoseconds, as spans want them."""
    return int(monotonic_s * 1e9) + _WALL_OFFSET_NS


def context_of(traceparent: str | None) -> Any:
    """The parent context a W3C traceparent names (None when absent or malformed: a new trace starts)."""
    if not traceparent or _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    from opentelemetry import trace

    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def start(name: str, parent: Any = None, start_s: float | None = None, **attributes: Any) -> Any:
    """Open a span under `parent` (a span, a context, or None for a new trace); None when tracing is off."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, context=_as_context(parent), attributes=_clean(attributes),
                              start_time=ns(start_s) if start_s is not None else None)


def end(span: Any, end_s: float | None = None, error: str = "", **attributes: Any) -> None:
    if span is None:
        return
    if attributes:
        span.set_attributes(_clean(attributes))
    if error:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=ns(end_s) if end_s is not None else None)


def record(name: str, parent: Any, start_s: float, end_s: float, **attributes: Any) -> Any:
    """A finished span with the given monotonic start and end; returns it (a parent for more)."""
    span = start(name, parent, start_s, **attributes)
    end(span, max(start_s, end_s))
    return span


def traceparent(span: Any) -> str:
    """The W3C traceparent naming `span` as the parent ("" when tracing is off)."""
    if span is None:
        return ""
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


def parse_metadata(metadata: Any) -> dict[str, str]:
    """request_id -> traceparent from a Submit call's `tokenmill-traceparent` entries."""
    out = {}
    for key, value in metadata or ():
        if key == METADATA_KEY and isinstance(value, str):
            rid, _, tp = value.partition(" ")
            if rid and tp:
                out[rid] = tp
    return out


def _as_context(parent: Any) -> Any:
    if parent is None:
        return None
    if hasattr(parent, "get_span_context"):
        from opentelemetry import trace

        return trace.set_span_in_context(parent)
    return parent


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None and v != ""}
