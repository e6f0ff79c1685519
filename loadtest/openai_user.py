"""The HTTP user: a client of any OpenAI-compatible /v1/chat/completions, unary or SSE, each request recorded."""

from __future__ import annotations

import json
import random

from locust import User, task
from locust.exception import StopUser

from loadtest.hooks import RUN, log
from loadtest.options import think_time
from loadtest.recorder import RECORDER, Outcome, elapsed_ms, start


class OpenAIUser(User):
    """A client of any OpenAI-compatible /v1/chat/completions (tokenmill's HTTP front, vLLM, llama.cpp's server).

    --host is the server's root or its /v1 base URL: http://127.0.0.1:8000 or http://127.0.0.1:8000/v1."""

    host = "http://127.0.0.1:8000"
    _model: str | None = None

    def wait_time(self) -> float:
        return think_time(self)

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
                "messages": [{"role": "user", "content": RUN.next_prompt()}],
                "max_tokens": opts.max_tokens if opts else 256, "temperature": opts.temperature if opts else 0.7}
        if opts and opts.ignore_eos:
            body["ignore_eos"] = True
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    @task
    def request(self) -> None:
        if RUN.stopping:
            raise StopUser()
        opts = self.environment.parsed_options
        stream = random.random() < (opts.stream_ratio if opts else 0.5)
        o, t0 = start("GenerateStream" if stream else "Generate", "http")
        try:
            resp = self.session.post(self.base + "/chat/completions", json=self._body(stream), stream=stream,
                                     timeout=self.timeout, headers={"X-Request-Id": o.request_id})
            if resp.status_code != 200:
                o.latency_ms = elapsed_ms(t0)
                o.status, o.error = _http_failure(resp)
            elif stream:
                self._read_stream(resp, o, t0)
            else:
                body = resp.json()
                o.latency_ms = elapsed_ms(t0)
                o.response_bytes = len(resp.content)
                choice = (body.get("choices") or [{}])[0]
                o.finish_reason = choice.get("finish_reason") or ""
                _usage(o, body.get("usage"))
        except Exception as exc:
            o.latency_ms = elapsed_ms(t0)
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
                    o.client_ttft_ms = elapsed_ms(t0)
                if choice.get("finish_reason"):
                    o.finish_reason = choice["finish_reason"]
            if event.get("usage"):
                _usage(o, event["usage"])
        o.latency_ms = elapsed_ms(t0)
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
