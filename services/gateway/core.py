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
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from services.common.config import GatewayConfig
from services.common.sampling import InvalidRequest
from services.common.tls import channel_credentials
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
    """Everything behind the fronts: validation, admission, the request's life."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        workers = [a for a in config.workers.split(",") if a.strip()]
        index = PrefixIndex(config.routing_index_blocks) if config.routing == "prefix-aware" else None
        self.picker = Picker(config, index)
        # TLS to the workers when --tls-ca names their CA, with our certificate as the client's if we have one
        credentials = channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
        self.pool = WorkerPool(workers, config.workers_dns, index, credentials, config.tls_server_name)
        self.batcher = Batcher(self.pool, self.picker, config)
        self.validator: Validator | None = None
        self.tokenizer_pool = ThreadPoolExecutor(config.tokenizer_threads or os.cpu_count() or 1,
                                                 thread_name_prefix="tokenize")
        self._token_texts: dict[int, str] = {}

    async def start(self) -> None:
        """Find a worker, load its tokenizer, start dispatching (the gRPC server's `prepare`)."""
        from services.common.model_loader import load_tokenizer

        self.pool.start()
        self.batcher.start()
        await self.pool.first_info.wait()
        info = self.pool.info()
        tokenizer = await asyncio.to_thread(load_tokenizer, info.tokenizer)
        self.validator = Validator(tokenizer, info.model, info.context_length, self.config.default_max_tokens)
        log.info("serving model %s (context %d) from %d worker(s)", info.model, info.context_length,
                 len(self.pool.live()))

    async def close(self) -> None:
        await self.batcher.close()
        await self.pool.close()
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    async def admit(self, *, request_id: str, model: str, prompt: str | list[int],
                    messages: Sequence[tuple[str, str]], sampling: Any, priority: int, streaming: bool,
                    session_id: str = "") -> Pending:
        """Validate and tokenise (off the loop), then queue; raises GatewayError with the status to answer."""
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
