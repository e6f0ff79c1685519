"""OpenAI-compatible HTTP front on the gateway: /v1/chat/completions, /v1/completions, /v1/models,
/health, /metrics. Same queue, batcher and validation as the gRPC API; errors in OpenAI's JSON shape."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.common.pb import inference_pb2
from services.gateway.server import Gateway, GatewayError

MAX_BODY_BYTES = 16 * 1024 * 1024  # larger than any prompt that fits: such bodies get a clear 400, not a 413
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def error_response(code: grpc.StatusCode, message: str) -> web.Response:
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    body = {"error": {"message": message, "type": kind, "param": None, "code": code.name.lower()}}
    return web.json_response(body, status=status)


def invalid(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _field(body: dict, name: str, kind: type | tuple, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None or value is default:
        return value
    if isinstance(value, bool) and kind is not bool:  # bool is an int in Python; not in JSON
        raise invalid(f"'{name}' must be a {getattr(kind, '__name__', 'number')}, got a boolean")
    if not isinstance(value, kind):
        raise invalid(f"'{name}' has the wrong type: got {type(value).__name__}")
    return value


def sampling_from_json(body: dict) -> inference_pb2.SamplingParams:
    number = (int, float)
    pb = inference_pb2.SamplingParams(ignore_eos=bool(_field(body, "ignore_eos", bool, False)))
    max_tokens = _field(body, "max_completion_tokens", int) or _field(body, "max_tokens", int)
    if max_tokens is not None:
        pb.max_tokens = max_tokens
    for name in ("temperature", "top_p"):
        value = _field(body, name, number)
        if value is not None:
            setattr(pb, name, float(value))
    if (top_k := _field(body, "top_k", int)) is not None:
        pb.top_k = max(0, top_k) if top_k != -1 else 0
    if (seed := _field(body, "seed", int)) is not None:
        pb.seed = seed & 0xFFFFFFFFFFFFFFFF
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("'stop' must be a string or a list of strings")
    pb.stop.extend(stop or [])
    if _field(body, "n", int, 1) != 1:
        raise invalid("only n=1 is supported")
    return pb


class OpenAIFront:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        key = self.gw.config.api_key
        if key and request.path.startswith("/v1/") and request.headers.get("Authorization") != f"Bearer {key}":
            return error_response(grpc.StatusCode.UNAUTHENTICATED,
                                  "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
        try:
            return await handler(request)
        except GatewayError as exc:
            return error_response(exc.code, exc.message)

    async def _body(self, request: web.Request) -> dict:
        raw = await request.read()
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise invalid(f"request body is not valid UTF-8 (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise invalid(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        return body

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid("'messages' must be a non-empty list of {role, content} objects")
        pairs = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str) or not isinstance(m.get("role"), str):
                raise invalid(f"messages[{i}] must have a string 'role' and a string 'content'")
            pairs.append((m["role"], content))
        return await self._run(request, body, prompt="", messages=pairs, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise invalid("'prompt' must be a string")
        body.setdefault("max_tokens", 16)  # OpenAI's default for completions
        return await self._run(request, body, prompt=prompt, messages=[], chat=False)

    async def _run(self, request: web.Request, body: dict, *, prompt: str, messages: list, chat: bool):
        stream = bool(body.get("stream", False))
        # a conversation id pins its requests to one worker: the x-session-id header, else OpenAI's `user`
        session = request.headers.get("x-session-id") or _field(body, "user", str, "") or ""
        p = self.gw.admit(request_id="", model=_field(body, "model", str, "") or "", prompt=prompt,
                          messages=messages, sampling=sampling_from_json(body), priority=0, streaming=stream,
                          session_id=session)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": ident, "created": int(time.time()), "model": self.gw.validator.model}
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, p, meta, chat, include_usage)
        async for chunk in self.gw.chunks(p):
            if chunk.final:
                text = "".join(p.text)
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                          else {"index": 0, "text": text, "logprobs": None})
                choice["finish_reason"] = chunk.finish_reason
                return web.json_response({**meta, "object": "chat.completion" if chat else "text_completion",
                                          "choices": [choice], "usage": _usage(p.usage)})
        raise GatewayError(grpc.StatusCode.INTERNAL, "request ended without a result")

    async def _stream(self, request, p, meta: dict, chat: bool, include_usage: bool) -> web.StreamResponse:
        obj = "chat.completion.chunk" if chat else "text_completion"
        chunks = self.gw.chunks(p)
        try:
            first = await anext(chunks)  # errors before the first token still get a proper HTTP status
        except StopAsyncIteration:
            first = None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await resp.write(f"data: {data}\n\n".encode())

        def choice(text: str, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text} if role else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        try:
            chunk, role = first, True
            while chunk is not None:
                await send({**meta, "object": obj, "choices": [choice(chunk.text, chunk.finish_reason, role)]})
                role = False
                chunk = None if chunk.final else await anext(chunks, None)
            if include_usage:
                await send({**meta, "object": obj, "choices": [], "usage": _usage(p.usage)})
        except GatewayError as exc:
            await send({"error": {"message": exc.message, "type": "server_error", "code": exc.code.name.lower()}})
        finally:
            await chunks.aclose()
        await send("[DONE]")
        await resp.write_eof()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        info = self.gw.pool.info()
        data = [{"id": info.model, "object": "model", "created": 0, "owned_by": "tokenmill",
                 "max_model_len": info.context_length}] if info else []
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        live = len(self.gw.pool.live())
        ok = live > 0 and self.gw.validator is not None
        return web.json_response({"status": "ok" if ok else "unavailable", "workers": live}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _usage(u: inference_pb2.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


async def start_http(gateway: Gateway, host: str, port: int) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its request (and frees the worker's KV blocks)
    runner = web.AppRunner(OpenAIFront(gateway).app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
