"""OpenAI-compatible HTTP front on the gateway core: /v1/chat/completions, /v1/completions, /v1/models,
/health, /metrics. Bodies are validated by pydantic models of OpenAI's schema (openai_schema.py); every error
is OpenAI's error JSON with a 4xx for bad input, and anything unexpected is a JSON 500 logged with the
request's id (never aiohttp's plain-text page).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from aiohttp import web

from services.common.metrics import CONTENT_TYPE, exposition
from services.common.pb import inference_pb2
from services.common.sampling import InvalidRequest, SamplingParams
from services.gateway.core import Gateway, GatewayError
from services.gateway.openai_format import add_usage, chat_logprobs, completion_logprobs, usage
from services.gateway.openai_schema import ChatRequest, CompletionRequest, parse
from services.gateway.pending import Chunk, Pending
from services.gateway.tools import TOOL_ROLES, ToolOutput, render

log = logging.getLogger("tokenmill.http")

MAX_BODY_BYTES = 16 * 1024 * 1024  # larger than any prompt that fits: such bodies get a clear 400, not a 413
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def error_response(status: int, kind: str, message: str, code: str, request_id: str = "") -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers={"x-request-id": request_id} if request_id else None)


def status_response(code: grpc.StatusCode, message: str, request_id: str = "") -> web.Response:
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    return error_response(status, kind, message, code.name.lower(), request_id)


class OpenAIFront:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)  # vLLM's: token ids for logit_bias, counts before sending
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        rid = request["request_id"] = uuid.uuid4().hex[:24]
        key = self.gw.config.api_key
        if key and request.path.startswith("/v1/") and request.headers.get("Authorization") != f"Bearer {key}":
            return status_response(grpc.StatusCode.UNAUTHENTICATED,
                                   "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
        try:
            return await handler(request)
        except GatewayError as exc:
            return status_response(exc.code, exc.message, rid)
        except InvalidRequest as exc:
            return status_response(grpc.StatusCode.INVALID_ARGUMENT, str(exc), rid)
        except web.HTTPException as exc:  # aiohttp's own 404 / 405 / 413: the same JSON shape
            if exc.status < 400:
                raise
            return error_response(exc.status, "invalid_request_error", f"{exc.reason}: {request.method} "
                                  f"{request.path}", str(exc.status), rid)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("request %s (%s %s) failed", rid, request.method, request.path)
            return error_response(500, "internal_error", f"internal error; request id {rid} (in the gateway log)",
                                  "internal", rid)

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None

    async def _admit(self, request: web.Request, req: Any, sampling: SamplingParams, *,
                     prompt: str | list[int] = "", messages: list | None = None) -> Pending:
        # a conversation id pins its requests to one worker: the x-session-id header, else OpenAI's `user`
        session = request.headers.get("x-session-id") or req.user or ""
        return await self.gw.admit(request_id="", model=req.model, prompt=prompt, messages=messages or [],
                                   sampling=sampling, priority=0, streaming=req.stream, session_id=session,
                                   traceparent=request.headers.get("traceparent", ""))

    def _meta(self, chat: bool) -> dict:
        return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": self.gw.model}

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req = parse(ChatRequest, await self._body(request))
        sampling = req.to_sampling()
        mode, _ = req.tool_mode()
        tools = ToolOutput(mode, req.parallel_tool_calls is not False) if mode != "none" else None
        if tools is not None or any(m.has_tools for m in req.messages):  # the tools and tool turns rendered here
            p = await self._admit(request, req, sampling, prompt=await self._render(req, mode))
        else:
            p = await self._admit(request, req, sampling, messages=[(m.role, m.text()) for m in req.messages])
        meta, text = self._meta(chat=True), self.gw.token_text

        def choice(chunk: Chunk, first: bool, whole: bool) -> dict:
            o = p.output(chunk.index)
            body = "".join(o.text) if whole else chunk.text
            lps = (o.logprobs if whole else chunk.logprobs) if req.logprobs else None
            out = {"index": chunk.index, "logprobs": chat_logprobs(lps, text) if lps is not None else None,
                   "finish_reason": (o.finish_reason or chunk.finish_reason) if whole else chunk.finish_reason}
            if tools is not None and whole:
                message, out["finish_reason"] = tools.message(body, out["finish_reason"])
                return {**out, "message": message}
            if whole:
                return {**out, "message": {"role": "assistant", "content": body}}
            delta = {"content": body}
            if tools is not None:
                delta, out["finish_reason"] = tools.delta(chunk.index, body, chunk.finish_reason)
            return {**out, "delta": {"role": "assistant", **delta} if first else delta}

        if req.stream:
            return await self._stream(request, p, meta, "chat.completion.chunk", choice, req)
        chunk = await self.gw.final(p)
        choices = [choice(Chunk(finish_reason=chunk.finish_reason, index=i), True, True) for i in range(req.choices)]
        return web.json_response({**meta, "object": "chat.completion", "choices": choices, "usage": usage(p.usage)})

    async def _render(self, req: ChatRequest, mode: str) -> str:
        """The prompt of a conversation with tools or tool turns (tools.render), off the event loop."""
        validator = self.gw.validator
        if validator is None:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "gateway is starting: no worker has reported yet")
        for i, m in enumerate(req.messages):
            if m.role not in TOOL_ROLES:
                raise InvalidRequest(f"messages[{i}].role is {m.role!r}: use one of {', '.join(TOOL_ROLES)}")
        messages = [m.as_dict() for m in req.messages]
        tools = req.tool_dicts() if mode != "none" else None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.gw.tokenizer_pool, render, validator.tokenizer, messages, tools)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse(CompletionRequest, await self._body(request))
        prompts = req.prompts()
        if req.stream and len(prompts) > 1:
            raise InvalidRequest("stream takes one prompt; send several prompts without stream")
        pendings: list[Pending] = []
        sampling = req.to_sampling()  # the same for every prompt
        try:
            for prompt in prompts:
                pendings.append(await self._admit(request, req, sampling, prompt=prompt))
            meta = self._meta(chat=False)
            if req.stream:
                return await self._stream(request, pendings[0], meta, "text_completion",
                                          self._completion_choice(req, prompts[0], pendings[0]), req)
            finals = await asyncio.gather(*(self.gw.final(p) for p in pendings))
        finally:
            for p in pendings:
                self.gw.batcher.cancel(p)  # no-op for the finished; frees the others when one failed
        total = inference_pb2.Usage()
        choices = []
        for i, (prompt, p, chunk) in enumerate(zip(prompts, pendings, finals, strict=True)):
            add_usage(total, p.usage)
            for j in range(req.choices):  # OpenAI's order: prompt by prompt, n choices each
                whole = self._completion_choice(req, prompt, p)(Chunk(finish_reason=chunk.finish_reason, index=j),
                                                                 True, True)
                choices.append({**whole, "index": i * req.choices + j})
        return web.json_response({**meta, "object": "text_completion", "choices": choices, "usage": usage(total)})

    def _completion_choice(self, req: CompletionRequest, prompt: str | list[int], p: Pending
                           ) -> Callable[[Chunk, bool, bool], dict]:
        def choice(chunk: Chunk, first: bool, whole: bool) -> dict:
            o = p.output(chunk.index)
            text = "".join(o.text) if whole else chunk.text
            echo = ""
            if req.echo and first:
                echo = prompt if isinstance(prompt, str) else self.gw.validator.tokenizer.decode(prompt)
            lps = None
            if req.logprobs is not None:
                echoed = req.echo and first
                lps = completion_logprobs(p.prompt_ids if echoed else [], p.prompt_logprobs if echoed else [],
                                          o.logprobs if whole else chunk.logprobs, self.gw.token_text)
            return {"index": chunk.index, "text": echo + text, "logprobs": lps,
                    "finish_reason": (o.finish_reason or chunk.finish_reason) if whole else chunk.finish_reason}

        return choice

    async def _stream(self, request: web.Request, p: Pending, meta: dict, obj: str,
                      choice: Callable[[Chunk, bool, bool], dict], req: Any) -> web.StreamResponse:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
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

        try:
            chunk, seen = first, set()
            while chunk is not None:  # choices by index (n > 1): each one's first chunk carries the role
                await send({**meta, "object": obj, "choices": [choice(chunk, chunk.index not in seen, False)]})
                seen.add(chunk.index)
                chunk = None if chunk.final else await anext(chunks, None)
            if include_usage:
                await send({**meta, "object": obj, "choices": [], "usage": usage(p.usage)})
        except GatewayError as exc:
            await send({"error": {"message": exc.message, "type": "server_error", "code": exc.code.name.lower()}})
        except Exception:  # headers are out: the error goes in the stream
            log.exception("stream %s failed", request.get("request_id"))
            await send({"error": {"message": f"internal error; request id {request.get('request_id')}",
                                  "type": "server_error", "code": "internal"}})
        finally:
            await chunks.aclose()
        await send("[DONE]")
        await resp.write_eof()
        return resp

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: {"prompt": text} (add_special_tokens, default true) or {"messages": [...]} (the chat
        template applied, add_generation_prompt default true) -> {"tokens", "count", "max_model_len"}."""
        body = await self._body(request)
        validator = self.gw.validator
        if validator is None:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "gateway is starting: no worker has reported yet")
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
            raise InvalidRequest("send a JSON object with either prompt (a string) or messages (chat messages)")
        tok = validator.tokenizer
        if "prompt" in body:
            if not isinstance(body["prompt"], str) or not isinstance(body.get("add_special_tokens", True), bool):
                raise InvalidRequest("prompt must be a string (and add_special_tokens a boolean)")
            job = lambda: tok.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))  # noqa: E731
        else:
            req = parse(ChatRequest, {"messages": body["messages"]})
            chat = [m.as_dict() for m in req.messages]
            generation = body.get("add_generation_prompt", True)
            if not isinstance(generation, bool):
                raise InvalidRequest("add_generation_prompt must be a boolean")
            job = lambda: list(tok.apply_chat_template(chat, add_generation_prompt=generation, tokenize=True,  # noqa: E731
                                                       return_dict=False))
        tokens = await asyncio.get_running_loop().run_in_executor(self.gw.tokenizer_pool, job)
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": validator.context_length})

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
        body = await self._body(request)
        validator = self.gw.validator
        if validator is None:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "gateway is starting: no worker has reported yet")
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = len(validator.tokenizer)
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab for t in tokens):
            raise InvalidRequest(f"tokens must be a list of token ids in 0..{vocab - 1}")
        return web.json_response({"prompt": validator.tokenizer.decode(tokens)})

    async def models(self, request: web.Request) -> web.Response:
        info = self.gw.pool.info()  # the last worker seen while none is live: its model, with workers 0
        data = [{"id": info.model, "object": "model", "created": 0, "owned_by": "tokenmill",
                 "max_model_len": info.context_length, "workers": len(self.gw.pool.live())}] if info else []
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        live = len(self.gw.pool.live())
        ok = live > 0 and self.gw.validator is not None
        return web.json_response({"status": "ok" if ok else "unavailable", "workers": live}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE})


async def start_http(gateway: Gateway, host: str, port: int, ssl_context: ssl.SSLContext | None = None
                     ) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its request (and frees the worker's KV blocks)
    runner = web.AppRunner(OpenAIFront(gateway).app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return runner
