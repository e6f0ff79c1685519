"""The gateway's core, shared by its fronts (gRPC in server.py, OpenAI HTTP in http.py): validation and
tokenisation, admission into the queue, and a request's chunks until it ends. The fronts import this module;
it imports neither of them.

Templating and tokenising run in a thread pool sized from the cores (HF's fast tokenizers release the GIL),
so a huge prompt never holds the event loop that streams every other request's tokens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from services.common import tracing
from services.common.config import GatewayConfig
from services.common.sampling import InvalidRequest, SamplingParams
from services.common.tls import channel_credentials
from services.gateway import metrics
from services.gateway.batcher import Batcher
from services.gateway.pending import Chunk, Pending, QueueFull, coalesce
from services.gateway.pool import WorkerPool
from services.gateway.prefix_index import PrefixIndex
from services.gateway.quality import QualitySampler, user_prompt
from services.gateway.routing import MAX_SESSION_ID_CHARS, routing_policy
from services.gateway.validation import Validator

log = logging.getLogger("tokenmill.gateway")


class GatewayError(Exception):
    """A request that ends with a status: gRPC aborts with it, HTTP maps it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Gateway:
    """Everything behind the fronts: validation, admission, the request's life."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        workers = [a for a in config.workers.split(",") if a.strip()]
        index = PrefixIndex(config.routing_index_blocks) if config.routing == "prefix-aware" else None
        self.routing = routing_policy(config, index)
        # TLS to the workers when --tls-ca names their CA, with our certificate as the client's if we have one
        credentials = channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
        self.pool = WorkerPool(workers, config.workers_dns, index, credentials, config.tls_server_name)
        self.batcher = Batcher(self.pool, self.routing, config)
        metrics.queue_capacity.set(config.max_queued_requests)
        self.quality = QualitySampler(config.judge_address, config.judge_sample_rate, config.judge_queue_size,
                                      config.judge_concurrency, config.judge_rubric, config.judge_timeout_s)
        self.validator: Validator | None = None
        self.tokenizer_pool = ThreadPoolExecutor(config.tokenizer_threads or os.cpu_count() or 1,
                                                 thread_name_prefix="tokenize")
        self._token_texts: dict[int, str] = {}

    async def start(self) -> None:
        """Find a worker, load its tokenizer, start dispatching (the gRPC server's `prepare`)."""
        from services.common.model_loader import load_tokenizer

        self.pool.start()
        self.batcher.start()
        self.quality.start()
        await self.pool.first_info.wait()
        info = self.pool.info()
        tokenizer = await asyncio.to_thread(load_tokenizer, info.tokenizer)
        self.validator = Validator(tokenizer, info.model, info.context_length, self.config.default_max_tokens)
        log.info("serving model %s (context %d) from %d worker(s)", info.model, info.context_length,
                 len(self.pool.live()))

    async def close(self) -> None:
        await self.quality.close()
        await self.batcher.close()
        await self.pool.close()
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    async def admit(self, *, request_id: str, model: str, prompt: str | list[int],
                    messages: Sequence[tuple[str, str]], sampling: SamplingParams, priority: int, streaming: bool,
                    session_id: str = "", traceparent: str = "") -> Pending:
        """Validate and tokenise (off the loop), then queue; raises GatewayError with the status to answer.
        `sampling`: as the caller sent it, unchecked (each front converts its wire format; validation is here).
        `traceparent`: the caller's W3C trace context (tracing on: the request's spans join its trace)."""
        if tracing.enabled():
            span = tracing.start("gateway.request", tracing.context_of(traceparent), streaming=streaming,
                                 request_id=request_id)
            admitted = time.monotonic()
            try:
                p = await self._admit(request_id, model, prompt, messages, sampling, priority, streaming, session_id)
            except GatewayError as exc:
                tracing.record("gateway.admit", span, admitted, time.monotonic(), error=exc.code.name)
                tracing.end(span, error=f"{exc.code.name}: {exc.message}")
                raise
            tracing.record("gateway.admit", span, admitted, p.received, prompt_tokens=len(p.prompt_ids))
            span.set_attribute("request_id", p.request_id)
            p.span = span
            return p
        return await self._admit(request_id, model, prompt, messages, sampling, priority, streaming, session_id)

    async def _admit(self, request_id: str, model: str, prompt: str | list[int], messages: Sequence[tuple[str, str]],
                     sampling: SamplingParams, priority: int, streaming: bool, session_id: str) -> Pending:
        validator = self.validator
        if validator is None:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "gateway is starting: no worker has reported yet")
        try:
            if len(session_id) > MAX_SESSION_ID_CHARS:
                raise InvalidRequest(f"session_id is {len(session_id)} characters; at most {MAX_SESSION_ID_CHARS} "
                                     "are allowed: send a shorter conversation id (a hash of it will do)")
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(self.tokenizer_pool, validator.prepare, model, prompt, messages,
                                                  sampling)
        except InvalidRequest as exc:
            metrics.requests.labels("INVALID_ARGUMENT").inc()
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if not self.pool.live():
            metrics.requests.labels("UNAVAILABLE").inc()
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "no worker is available; retry later")
        p = Pending(request_id or uuid.uuid4().hex, prepared.prompt_ids, prepared.params, priority, streaming,
                    session_id=session_id)
        if self.quality.on:
            p.source = (prompt, messages)
        try:
            self.batcher.submit(p)
        except QueueFull as exc:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        return p

    async def chunks(self, p: Pending) -> AsyncIterator[Chunk]:
        """The request's chunks up to and including its final one; cancels it if the caller leaves early."""
        error, ending, held = "", 0.0, None
        try:
            while True:
                chunk, held = coalesce(held or await p.out.get(), p.out)
                if chunk.error is not None:
                    error = f"{chunk.error[0].name}: {chunk.error[1]}"
                    raise GatewayError(*chunk.error)
                if chunk.final:
                    self._completed(p, chunk)
                    ending = time.monotonic()
                yield chunk
                if chunk.final:
                    return
        finally:
            self.batcher.cancel(p)  # no-op once it has finished
            if p.span is not None:
                if ending:  # the final chunk, from the worker's last event to the caller having it
                    tracing.record("gateway.stream_end", p.span, ending, time.monotonic())
                tracing.end(p.span, error=error, completion_tokens=len(p.token_ids),
                            worker=p.worker.address if p.worker else "")
                p.span = None

    def _completed(self, p: Pending, chunk: Chunk) -> None:
        """A request ended well: offer it to the judge (live quality; never blocks)."""
        if p.source is None or chunk.finish_reason not in ("stop", "length") or p.worker is None \
                or not self.quality.draw():
            return
        prompt, messages = p.source
        decode = self.validator.tokenizer.decode if self.validator is not None else None
        self.quality.put(user_prompt(prompt, messages, decode), "".join(p.text), self.model, p.worker.address)

    async def final(self, p: Pending) -> Chunk:
        """The request's final chunk (a non-streaming call's whole answer)."""
        async for chunk in self.chunks(p):
            if chunk.final:
                return chunk
        raise GatewayError(grpc.StatusCode.INTERNAL, "request ended without a result")

    @property
    def model(self) -> str:
        return self.validator.model if self.validator else ""

    def token_text(self, token_id: int) -> str:
        """A token's own text, as logprobs report it (cached: the vocabulary is small)."""
        text = self._token_texts.get(token_id)
        if text is None and self.validator is not None:
            text = self._token_texts[token_id] = self.validator.tokenizer.decode([token_id])
        return text or ""
