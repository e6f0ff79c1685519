"""Locust users for tokenmill: gRPC (the gateway's tokenmill.v1.Inference) and HTTP (any OpenAI-compatible server).

    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 1m --csv out/locust --host 127.0.0.1:50051 GrpcUser
    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 1m --csv out/locust --host http://127.0.0.1:8000 OpenAIUser

(`tokenmill loadtest` runs this for you and writes the report.) With no user class named, the host picks one:
http(s):// → OpenAIUser, anything else → GrpcUser.

Each request is one prompt of the children's story set (services/judge/stories.py) sent as a chat message, either
unary (`Generate` / non-streaming chat completion) or streaming (`GenerateStream` / SSE), the share set by
--stream-ratio. Locust entries (the same names for both protocols; request type `grpc` or `http`):

  Generate              end-to-end time of a unary call
  GenerateStream        end-to-end time of a streaming call
  GenerateStream TTFT   time to the first streamed token (only when one arrived)

A failure is named by its status alone, so the failure table groups them: RESOURCE_EXHAUSTED, UNAVAILABLE,
DEADLINE_EXCEEDED, ... for gRPC; `HTTP 429 rate_limit_error`, TIMEOUT, CONNECTION_ERROR ... for HTTP. The
details go to the per-request CSV (`<--csv prefix>_requests.csv`, or --requests-csv): one row per finished
request, written by the same code that fires the Locust event, so the two always agree.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import gevent
from locust import User, events, task
from locust.exception import StopUser
from locust.stats import CSV_STATS_INTERVAL_SEC

import grpc  # isort: skip  (after locust: locust monkey-patches with gevent on import)
import grpc.experimental.gevent as grpc_gevent  # isort: skip

grpc_gevent.init_gevent()

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: `services` and `loadtest` live next to this folder
    sys.path.insert(0, str(ROOT))

from services.common.pb import inference_pb2, inference_pb2_grpc  # noqa: E402
from services.judge.stories import sample_prompts  # noqa: E402

log = logging.getLogger("tokenmill.loadtest")
TTFT_SUFFIX = " TTFT"


# ---- options (Locust custom arguments) ---------------------------------------------------------------------
@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every request.")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (0 = greedy).")
    parser.add_argument("--ignore-eos", action="store_true", default=False,
                        help="Generate exactly max_tokens (tokenmill and vLLM honour it).")
    parser.add_argument("--stream-ratio", type=float, default=0.5,
                        help="Share of requests that stream (GenerateStream / SSE); the rest are unary.")
    parser.add_argument("--wait-min", type=float, default=0.0, help="Least think time between a user's requests, s.")
    parser.add_argument("--wait-max", type=float, default=0.0, help="Most think time between a user's requests, s.")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="Deadline of one request, s.")
    parser.add_argument("--prompt-seed", type=int, default=0, help="Seed of the prompt order.")
    parser.add_argument("--model-name", default="",
                        help="Model field of requests (HTTP: default the first of /v1/models).")
    parser.add_argument("--api-key", default="", is_secret=True, env_var="TOKENMILL_API_KEY",
                        help="Sent as 'authorization: Bearer <key>'.")
    parser.add_argument("--requests-csv", default="", help="Per-request CSV (default <--csv prefix>_requests.csv).")
    parser.add_argument("--channels", type=int, default=0,
                        help="gRPC: 0 = one channel (connection) per user; N = users share N channels.")
    parser.add_argument("--grpc-threads", type=int, default=0,
                        help="gRPC: size of gevent's threadpool that gRPC waits in (0 = users + 16).")
    parser.add_argument("--progress-interval", type=float, default=60.0,
                        help="Log one progress line this often, s (0 = never).")


# ---- the per-request record ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One finished request: a row of the per-request CSV and the source of its Locust event(s)."""

    timestamp: str = ""            # request start, ISO 8601 UTC
    epoch_s: float = 0.0           # request start, Unix seconds
    protocol: str = ""             # grpc | http
    kind: str = ""                 # Generate | GenerateStream
    request_id: str = ""
    worker: str = ""               # the worker that served it (tokenmill gateway's timing.worker)
    status: str = "OK"             # OK, a gRPC status name, or HTTP <code> ..., TIMEOUT, CONNECTION_ERROR
    ttft_ms: float | None = None   # streams: measured here; unary: the gateway's timing.ttft_ms
    latency_ms: float = 0.0        # end to end, measured here
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    tokens_per_s: float | None = None  # completion tokens / end-to-end seconds
    batch_size: int | None = None
    queue_ms: float | None = None
    gateway_ttft_ms: float | None = None
    gateway_total_ms: float | None = None
    finish_reason: str = ""
    response_bytes: int = 0
    error: str = ""                # the status details (the Locust failure carries only `status`)
    client_ttft_ms: float | None = None  # TTFT as this client saw it (streams only)


COLUMNS = [f.name for f in fields(Outcome)]


class Recorder:
    """Fires the Locust events of each outcome and appends its CSV row; one per Locust process."""

    def __init__(self) -> None:
        self.file = None
        self.writer = None
        self.path: Path | None = None
        self.rows = 0
        self.inflight: dict[int, Outcome] = {}  # sent, not yet recorded; left over at the end = abandoned
        self.statuses: dict[str, int] = {}
        self.completion_tokens = 0

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS)
        self.writer.writeheader()
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def record(self, environment, o: Outcome) -> None:
        self.inflight.pop(id(o), None)
        if o.completion_tokens and o.latency_ms > 0:
            o.tokens_per_s = round(o.completion_tokens / (o.latency_ms / 1000), 3)
        ok = o.status == "OK"
        self.statuses[o.status] = self.statuses.get(o.status, 0) + 1
        self.completion_tokens += (o.completion_tokens or 0) if ok else 0
        fire = environment.events.request.fire
        if o.client_ttft_ms is not None:
            fire(request_type=o.protocol, name=o.kind + TTFT_SUFFIX, response_time=o.client_ttft_ms,
                 response_length=0, response=None, context={}, exception=None)
        fire(request_type=o.protocol, name=o.kind, response_time=o.latency_ms, response_length=o.response_bytes,
             response=None, context={}, exception=None if ok else o.status)
        if self.writer is not None:
            row = {k: ("" if v is None else round(v, 3) if isinstance(v, float) else v) for k, v in asdict(o).items()}
            self.writer.writerow(row)
            self.file.flush()
            self.rows += 1


RECORDER = Recorder()
RUN: dict = {}
_PROGRESS: gevent.Greenlet | None = None
STOPPING = False  # set when the test starts to stop: no new request after that (see _stopping)
_PROMPTS: itertools.cycle | None = None


def next_prompt() -> str:
    return next(_PROMPTS)


def _start(kind: str, protocol: str) -> tuple[Outcome, float]:
    now = time.time()
    stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    o = Outcome(timestamp=stamp, epoch_s=round(now, 3), protocol=protocol, kind=kind,
                request_id=f"lt-{uuid.uuid4().hex[:16]}")
    RECORDER.inflight[id(o)] = o
    return o, time.perf_counter()


def _elapsed_ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


@events.init.add_listener
def _init(environment, **_kw) -> None:
    global _PROMPTS
    opts = environment.parsed_options
    _PROMPTS = itertools.cycle(sample_prompts(1500, opts.prompt_seed if opts else 0))
    # gRPC under gevent waits for every call's next event in a thread of gevent's hub threadpool (grpc's
    # grpc_gevent.pyx.pxi): one thread per call in flight. The pool's default of 10 threads makes the 11th call
    # wait for a free one, so with more users than that, stream messages and replies arrive seconds late (we
    # saw +40 s on 16 users) and every latency is inflated. Give each user its thread.
    users = (opts.num_users if opts else 0) or 0
    pool = gevent.get_hub().threadpool
    want = (opts.grpc_threads if opts and opts.grpc_threads else users + 16)
    if want > pool.maxsize:
        pool.maxsize = want
    # No user class named on the command line: the host decides (both would otherwise run side by side).
    classes = environment.user_classes
    if {c.__name__ for c in classes} == {"GrpcUser", "OpenAIUser"}:
        want = "OpenAIUser" if (environment.host or "").startswith(("http://", "https://")) else "GrpcUser"
        classes[:] = [c for c in classes if c.__name__ == want]
        log.info("no user class named; %s chosen from the host %r", want, environment.host)


@events.test_start.add_listener
def _test_start(environment, **_kw) -> None:
    opts = environment.parsed_options
    path = None
    if opts is not None and opts.requests_csv:
        path = Path(opts.requests_csv)
    elif opts is not None and getattr(opts, "csv_prefix", None):
        path = Path(f"{opts.csv_prefix}_requests.csv")
    if path is not None and RECORDER.file is None:
        RECORDER.open(path)
    global STOPPING, _PROGRESS
    STOPPING = False
    if opts is not None and opts.progress_interval > 0 and _PROGRESS is None:
        _PROGRESS = gevent.spawn(_progress, opts.progress_interval)
    RUN.clear()
    RUN.update(start_epoch_s=time.time(), host=environment.host,
               user_classes=[c.__name__ for c in environment.user_classes])
    if opts is not None:
        for key in ("num_users", "spawn_rate", "run_time", "max_tokens", "temperature", "ignore_eos", "stream_ratio",
                    "wait_min", "wait_max", "request_timeout", "prompt_seed", "model_name"):
            RUN[key] = getattr(opts, key, None)


def _progress(interval: float) -> None:
    """One line every `interval` seconds (a one-hour headless run is otherwise silent with --only-summary)."""
    t0 = time.time()
    while True:
        gevent.sleep(interval)
        elapsed = time.time() - t0
        st = dict(sorted(RECORDER.statuses.items(), key=lambda kv: -kv[1]))
        ok = st.get("OK", 0)
        log.info("progress %.0f s: %d requests %s, %.0f OK/hour, %.1f output tokens/s, %d in flight",
                 elapsed, sum(st.values()), json.dumps(st), ok / elapsed * 3600, RECORDER.completion_tokens / elapsed,
                 len(RECORDER.inflight))


@events.test_stopping.add_listener
def _stopping(environment, **_kw) -> None:
    # Locust kills a user that waits between tasks; when the wait ends at that very moment, the user may start a
    # request the kill then abandons (the server answers it, nobody records it). So no new request from here on;
    # the ones in flight finish within --stop-timeout (or are abandoned and counted as such when it is 0).
    global STOPPING, _PROGRESS
    STOPPING = True
    if _PROGRESS is not None:
        _PROGRESS.kill(block=False)
        _PROGRESS = None


@events.test_stop.add_listener
def _test_stop(environment, **_kw) -> None:
    RUN["stop_epoch_s"] = time.time()
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "csv_prefix", None):
        # Locust writes its CSVs once a second and not again at exit, so requests of the last second would be
        # missing from locust_stats.csv. The users are all stopped here: give its writer one more turn.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)
    RUN["requests_recorded"] = RECORDER.rows
    RUN["requests_abandoned"] = len(RECORDER.inflight)
    for o in RECORDER.inflight.values():
        log.warning("abandoned in flight at the end: %s %s sent %.1f s before", o.kind, o.request_id,
                    RUN["stop_epoch_s"] - o.epoch_s)
    if RECORDER.path is not None:
        stem = RECORDER.path.name.removesuffix(".csv").removesuffix("_requests")
        RECORDER.path.with_name(stem + "_run.json").write_text(json.dumps(RUN, indent=2) + "\n")
    RECORDER.close()


@events.quitting.add_listener
def _quitting(environment, **_kw) -> None:
    RECORDER.close()


def _wait(user: User) -> float:
    opts = user.environment.parsed_options
    lo, hi = (opts.wait_min, opts.wait_max) if opts is not None else (0.0, 0.0)
    return random.uniform(lo, max(lo, hi))


# ---- gRPC ----------------------------------------------------------------------------------------------------
class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Times every Inference call and reports it (Locust's documented gRPC pattern, plus streams and the CSV)."""

    def __init__(self, environment) -> None:
        self.env = environment

    @staticmethod
    def _kind(details) -> str:
        return details.method.rsplit("/", 1)[-1]

    def intercept_unary_unary(self, continuation, client_call_details, request):
        o, t0 = _start(self._kind(client_call_details), "grpc")
        o.request_id = request.request_id or o.request_id
        call = continuation(client_call_details, request)
        try:
            response = call.result()
            o.latency_ms = _elapsed_ms(t0)
            _fill(o, response)
            o.ttft_ms = o.gateway_ttft_ms
            o.response_bytes = response.ByteSize()
        except grpc.RpcError as exc:
            o.latency_ms = _elapsed_ms(t0)
            _failed(o, exc)
        RECORDER.record(self.env, o)
        return call

    def intercept_unary_stream(self, continuation, client_call_details, request):
        o, t0 = _start(self._kind(client_call_details), "grpc")
        o.request_id = request.request_id or o.request_id
        env = self.env

        def stream():
            nbytes, last = 0, None
            try:
                for chunk in continuation(client_call_details, request):
                    if o.client_ttft_ms is None and (chunk.token_ids or chunk.text or chunk.finish_reason):
                        o.client_ttft_ms = _elapsed_ms(t0)
                    nbytes += chunk.ByteSize()
                    last = chunk
                    yield chunk
                o.latency_ms = _elapsed_ms(t0)
                if last is not None:
                    _fill(o, last)
                o.ttft_ms = o.client_ttft_ms
                o.response_bytes = nbytes
                if last is None or not last.finish_reason:
                    o.status, o.error = "INCOMPLETE", "stream ended without a final message"
            except grpc.RpcError as exc:
                o.latency_ms = _elapsed_ms(t0)
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
        return _wait(self)

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
            messages=[inference_pb2.ChatMessage(role="user", content=next_prompt())], sampling=sampling)

    @task
    def request(self) -> None:
        if STOPPING:
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


# ---- HTTP (OpenAI-compatible) --------------------------------------------------------------------------------
class OpenAIUser(User):
    """A client of any OpenAI-compatible /v1/chat/completions (tokenmill's HTTP front, vLLM, llama.cpp's server).

    --host is the server's root or its /v1 base URL: http://127.0.0.1:8000 or http://127.0.0.1:8000/v1."""

    host = "http://127.0.0.1:8000"
    _model: str | None = None

    def wait_time(self) -> float:
        return _wait(self)

    def on_start(self) -> None:
        import requests  # gevent-patched by locust

        opts = self.environment.parsed_options
        self.session = requests.Session()
        base = self.host.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.timeout = opts.request_timeout if opts else 600.0
        key = opts.api_key if opts else ""
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        if OpenAIUser._model is None:
            OpenAIUser._model = (opts.model_name if opts else "") or self._first_model()

    def on_stop(self) -> None:
        self.session.close()

    def _first_model(self) -> str:
        try:
            data = self.session.get(self.base + "/models", timeout=30).json().get("data") or []
            return data[0]["id"] if data else ""
        except Exception as exc:  # the requests themselves will show what is wrong
            log.warning("could not list %s/models: %s", self.base, exc)
            return ""

    def _body(self, stream: bool) -> dict:
        opts = self.environment.parsed_options
        body = {"model": OpenAIUser._model or "default",
                "messages": [{"role": "user", "content": next_prompt()}],
                "max_tokens": opts.max_tokens if opts else 256, "temperature": opts.temperature if opts else 0.7}
        if opts and opts.ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    @task
    def request(self) -> None:
        if STOPPING:
            raise StopUser()
        opts = self.environment.parsed_options
        stream = random.random() < (opts.stream_ratio if opts else 0.5)
        o, t0 = _start("GenerateStream" if stream else "Generate", "http")
        try:
            resp = self.session.post(self.base + "/chat/completions", json=self._body(stream), stream=stream,
                                     timeout=self.timeout, headers={"X-Request-Id": o.request_id})
            if resp.status_code != 200:
                o.latency_ms = _elapsed_ms(t0)
                o.status, o.error = _http_failure(resp)
            elif stream:
                self._read_stream(resp, o, t0)
            else:
                body = resp.json()
                o.latency_ms = _elapsed_ms(t0)
                o.response_bytes = len(resp.content)
                choice = (body.get("choices") or [{}])[0]
                o.finish_reason = choice.get("finish_reason") or ""
                _usage(o, body.get("usage"))
        except Exception as exc:
            o.latency_ms = _elapsed_ms(t0)
            o.status, o.error = _exception_status(exc), f"{type(exc).__name__}: {exc}"
        RECORDER.record(self.environment, o)

    def _read_stream(self, resp, o: Outcome, t0: float) -> None:
        done = False
        for line in resp.iter_lines():
            if not line:
                continue
            o.response_bytes += len(line) + 1
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
                o.status = str(err.get("code") or err.get("type") or "STREAM_ERROR").upper()
                o.error = str(err.get("message", ""))
                continue
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if o.client_ttft_ms is None and (delta.get("content") or choice.get("text")):
                    o.client_ttft_ms = _elapsed_ms(t0)
                if choice.get("finish_reason"):
                    o.finish_reason = choice["finish_reason"]
            if event.get("usage"):
                _usage(o, event["usage"])
        o.latency_ms = _elapsed_ms(t0)
        o.ttft_ms = o.client_ttft_ms
        if o.status == "OK" and not done and not o.finish_reason:
            o.status, o.error = "INCOMPLETE", "stream ended without [DONE] or a finish_reason"


def _usage(o: Outcome, usage: dict | None) -> None:
    if not usage:
        return
    o.prompt_tokens = usage.get("prompt_tokens")
    o.completion_tokens = usage.get("completion_tokens")
    o.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")


def _http_failure(resp) -> tuple[str, str]:
    """`HTTP 429 rate_limit_error` and the message, from an OpenAI-shaped error body where there is one."""
    kind, message = "", resp.text[:500]
    try:
        err = resp.json().get("error")
        if isinstance(err, dict):
            kind, message = str(err.get("type") or err.get("code") or ""), str(err.get("message") or message)
        elif isinstance(err, str):
            message = err
    except Exception:
        pass
    return f"HTTP {resp.status_code} {kind}".strip(), message


def _exception_status(exc: Exception) -> str:
    import requests

    if isinstance(exc, requests.Timeout):
        return "TIMEOUT"
    if isinstance(exc, requests.ConnectionError):
        return "CONNECTION_ERROR"
    if isinstance(exc, ValueError):
        return "BAD_RESPONSE"
    return type(exc).__name__.upper()
