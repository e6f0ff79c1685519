"""The gRPC user: a client of the gateway's tokenmill.v1.Inference, each call timed and recorded by an interceptor."""

from __future__ import annotations

import contextlib
import random
import uuid
from typing import ClassVar

from locust import User, task
from locust.exception import StopUser

import grpc  # isort: skip  (after locust: locust monkey-patches with gevent on import)
import grpc.experimental.gevent as grpc_gevent  # isort: skip

grpc_gevent.init_gevent()

from loadtest.hooks import RUN  # noqa: E402
from loadtest.options import think_time  # noqa: E402
from loadtest.recorder import RECORDER, Outcome, elapsed_ms, start  # noqa: E402
from services.common.pb import inference_pb2, inference_pb2_grpc  # noqa: E402


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Times every Inference call and reports it (Locust's documented gRPC pattern, plus streams and the CSV)."""

    def __init__(self, environment) -> None:
        self.env = environment

    @staticmethod
    def _kind(details) -> str:
        return details.method.rsplit("/", 1)[-1]

    def intercept_unary_unary(self, continuation, client_call_details, request):
        o, t0 = start(self._kind(client_call_details), "grpc")
        o.request_id = request.request_id or o.request_id
        call = continuation(client_call_details, request)
        try:
            response = call.result()
            o.latency_ms = elapsed_ms(t0)
            _fill(o, response)
            o.ttft_ms = o.gateway_ttft_ms
            o.response_bytes = response.ByteSize()
        except grpc.RpcError as exc:
            o.latency_ms = elapsed_ms(t0)
            _failed(o, exc)
        RECORDER.record(self.env, o)
        return call

    def intercept_unary_stream(self, continuation, client_call_details, request):
        o, t0 = start(self._kind(client_call_details), "grpc")
        o.request_id = request.request_id or o.request_id
        env = self.env

        def stream():
            nbytes, last = 0, None
            try:
                for chunk in continuation(client_call_details, request):
                    if o.client_ttft_ms is None and (chunk.token_ids or chunk.text or chunk.finish_reason):
                        o.client_ttft_ms = elapsed_ms(t0)
                    nbytes += chunk.ByteSize()
                    last = chunk
                    yield chunk
                o.latency_ms = elapsed_ms(t0)
                if last is not None:
                    _fill(o, last)
                o.ttft_ms = o.client_ttft_ms
                o.response_bytes = nbytes
                if last is None or not last.finish_reason:
                    o.status, o.error = "INCOMPLETE", "stream ended without a final message"
            except grpc.RpcError as exc:
                o.latency_ms = elapsed_ms(t0)
                o.ttft_ms = o.client_ttft_ms
                _failed(o, exc)
                RECORDER.record(env, o)
                raise
            RECORDER.record(env, o)

        return stream()


def _fill(o: Outcome, r: inference_pb2.GenerateResponse) -> None:
    o.request_id = r.request_id or o.request_id
    o.finish_reason = inference_pb2.FinishReason.Name(r.finish_reason).removeprefix("FINISH_REASON_").lower()
    o.prompt_tokens, o.completion_tokens = r.usage.prompt_tokens, r.usage.completion_tokens
    o.cached_tokens = r.usage.cached_tokens
    t = r.timing
    o.worker, o.batch_size, o.queue_ms = t.worker, t.batch_size, t.queue_ms
    o.gateway_ttft_ms, o.gateway_total_ms = t.ttft_ms, t.total_ms


def _failed(o: Outcome, exc: grpc.RpcError) -> None:
    code = exc.code() if hasattr(exc, "code") else None
    o.status = code.name if code is not None else "UNKNOWN"
    o.error = (exc.details() if hasattr(exc, "details") else str(exc)) or ""


def grpc_target(host: str) -> str:
    """host:port from Locust's --host (a grpc:// or http:// prefix and a trailing slash are dropped)."""
    for prefix in ("grpc://", "http://", "dns:///"):
        host = host.removeprefix(prefix)
    return host.rstrip("/")


class GrpcUser(User):
    """A client of the gateway's gRPC API; --host is host:port."""

    host = "127.0.0.1:50051"

    def wait_time(self) -> float:
        return think_time(self)

    _pool: ClassVar[list] = []
    _users = 0

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        shared = opts.channels if opts else 0
        if shared > 0:  # users share a pool of channels, round robin
            if not GrpcUser._pool:
                GrpcUser._pool = [self._channel() for _ in range(shared)]
            self.channel, self.own_channel = GrpcUser._pool[GrpcUser._users % shared], False
            GrpcUser._users += 1
        else:
            self.channel, self.own_channel = self._channel(), True
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.timeout = opts.request_timeout if opts else 600.0
        key = opts.api_key if opts else ""
        self.metadata = [("authorization", f"Bearer {key}")] if key else None

    def _channel(self):
        return grpc.intercept_channel(grpc.insecure_channel(grpc_target(self.host)),
                                      LocustInterceptor(self.environment))

    def on_stop(self) -> None:
        if self.own_channel:
            self.channel.close()

    def _request(self) -> inference_pb2.GenerateRequest:
        opts = self.environment.parsed_options
        sampling = inference_pb2.SamplingParams(max_tokens=opts.max_tokens if opts else 256,
                                                temperature=opts.temperature if opts else 0.7,
                                                ignore_eos=bool(opts and opts.ignore_eos))
        return inference_pb2.GenerateRequest(
            request_id=f"lt-{uuid.uuid4().hex[:16]}", model=(opts.model_name if opts else "") or "",
            messages=[inference_pb2.ChatMessage(role="user", content=RUN.next_prompt())], sampling=sampling)

    @task
    def request(self) -> None:
        if RUN.stopping:
            raise StopUser()
        opts = self.environment.parsed_options
        if random.random() < (opts.stream_ratio if opts else 0.5):
            self.generate_stream()
        else:
            self.generate()

    def generate(self) -> None:
        with contextlib.suppress(grpc.RpcError):  # the interceptor recorded it
            self.stub.Generate(self._request(), timeout=self.timeout, metadata=self.metadata)

    def generate_stream(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for _ in self.stub.GenerateStream(self._request(), timeout=self.timeout, metadata=self.metadata):
                pass
