"""The worker's gRPC servicer: a thin layer over the engine (TGI style)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import grpc

from services.common import tracing
from services.common.config import WorkerConfig
from services.common.grpc_util import FINISH_REASONS, code_number
from services.common.pb import inference_pb2, worker_pb2, worker_pb2_grpc
from services.common.sampling import InvalidRequest, SamplingParams

log = logging.getLogger("tokenmill.worker")


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id or f"{config.host}:{config.port}"
        self.engine: Any = None  # AsyncEngine, set once the model is loaded
        self.loaded: Any = None

    async def load(self) -> None:
        """Load the model and build the engine on the engine's own thread (the event loop keeps answering
        health meanwhile; see AsyncEngine on why one thread does both)."""
        from services.worker.engine.async_engine import AsyncEngine

        front = AsyncEngine(lambda: build_engine(self.config, self), step_delay_s=self.config.step_delay_ms / 1000)
        await asyncio.wrap_future(front.ready)
        front.keep_phases = tracing.enabled()
        self.engine = front

    async def _require_engine(self, context: grpc.aio.ServicerContext) -> Any:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is still loading its model; retry shortly")
        return self.engine

    async def Submit(self, request: worker_pb2.SubmitRequest, context: grpc.aio.ServicerContext):
        from services.worker.engine.types import Request

        engine = await self._require_engine(context)
        reqs, rejected = [], []
        for r in request.requests:
            try:
                if not r.request_id:
                    raise InvalidRequest("request_id is required")
                params = SamplingParams.from_proto(r.sampling)
                req = Request(r.request_id, list(r.prompt_token_ids), params, r.priority)
                if params.structured is not None:
                    compile_grammar = getattr(engine.engine, "compile_grammar", None)
                    if compile_grammar is None:
                        raise InvalidRequest("structured output needs the paged engine; this worker runs "
                                             f"--engine {engine.engine.name}")
                    await asyncio.to_thread(compile_grammar, req)  # ms to seconds: not on the engine thread
                reqs.append(req)
            except InvalidRequest as exc:
                rejected.append(worker_pb2.WorkerEvent(
                    request_id=r.request_id, finish_reason=inference_pb2.FINISH_REASON_ERROR,
                    error_code=code_number("INVALID_ARGUMENT"), error_message=str(exc)))
        for event in rejected:
            yield event
        traces = tracing.parse_metadata(context.invocation_metadata()) if tracing.enabled() else {}
        try:
            async for ev in engine.generate(reqs):
                if ev.finish_reason is not None and ev.request_id in engine.phases:
                    self._trace(ev, engine.phases.pop(ev.request_id), traces.get(ev.request_id))
                yield worker_pb2.WorkerEvent(
                    request_id=ev.request_id,
                    token_ids=ev.token_ids,
                    text=ev.text,
                    finish_reason=FINISH_REASONS[ev.finish_reason],
                    usage=inference_pb2.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                                              cached_tokens=ev.cached_tokens),
                    batch_size=ev.batch_size,
                    error_code=code_number(ev.error_code) if ev.error_code else 0,
                    error_message=ev.error_message,
                    logprobs=logprobs_pb(ev.logprobs),
                    prompt_logprobs=logprobs_pb(ev.prompt_logprobs),
                    index=ev.index,
                )
        finally:
            if engine.keep_phases:  # a caller gone before the end: no span, and nothing kept for it
                for r in reqs:
                    engine.phases.pop(r.request_id, None)

    def _trace(self, ev: Any, phases: tuple[float, float, float, float], traceparent: str | None) -> None:
        """The worker's spans of a finished request, under the gateway's dispatch span: its time in the engine's
        queue, prefill (first step to first token) and decode (first token to its end)."""
        arrival, scheduled, first, end = phases
        root = tracing.record("worker.request", tracing.context_of(traceparent), arrival, end,
                              worker=self.worker_id, request_id=ev.request_id, finish_reason=ev.finish_reason,
                              prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                              cached_tokens=ev.cached_tokens)
        tracing.record("worker.queue", root, arrival, scheduled)
        tracing.record("worker.prefill", root, scheduled, first, prompt_tokens=ev.prompt_tokens)
        tracing.record("worker.decode", root, first, end, completion_tokens=ev.completion_tokens)

    async def Cancel(self, request: worker_pb2.CancelRequest, context: grpc.aio.ServicerContext):
        engine = await self._require_engine(context)
        return worker_pb2.CancelResponse(cancelled=engine.cancel(list(request.request_ids)))

    async def Load(self, request: worker_pb2.LoadRequest, context: grpc.aio.ServicerContext):
        engine = await self._require_engine(context)
        s = engine.stats()
        evicted, serial, truncated = recent_evictions(engine.engine, request.evictions_after)
        return worker_pb2.LoadResponse(
            running=s.running, waiting=s.waiting, free_kv_blocks=s.free_kv_blocks, total_kv_blocks=s.total_kv_blocks,
            capacity=s.capacity, prefix_cache_hit_rate=s.prefix_cache_hit_rate, outstanding_tokens=s.outstanding_tokens,
            evicted_block_hashes=evicted, eviction_serial=serial, evictions_truncated=truncated,
        )

    async def Info(self, request: worker_pb2.InfoRequest, context: grpc.aio.ServicerContext):
        engine = await self._require_engine(context)
        m = self.loaded
        return worker_pb2.InfoResponse(
            model=self.config.model, tokenizer=self.config.model, context_length=engine.engine.max_model_len,
            block_size=engine.engine.block_size, quantization=m.quantization, engine=engine.engine.name,
            device=m.device, dtype=str(m.dtype).removeprefix("torch."), worker_id=self.worker_id,
            eos_token_id=m.tokenizer.eos_token_id if m.tokenizer.eos_token_id is not None else -1,
            model_impl="native" if getattr(getattr(engine.engine, "runner", None), "native", False) else "transformers",
            prefix_caching=getattr(getattr(engine.engine, "block_manager", None), "enable_prefix_caching", False),
        )


def logprobs_pb(logprobs: list | None) -> list[inference_pb2.TokenLogprob]:
    """Engine Logprobs as wire messages (token texts are the gateway's to add: it has the tokenizer)."""
    return [inference_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=[
        inference_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in logprobs or ()]


def recent_evictions(engine: Any, after: int) -> tuple[list[int], int, bool]:
    """Hashes the prefix cache dropped after eviction serial `after`, the newest serial, and whether some
    are no longer in the log (or `after` is from before this worker restarted): the caller must resync."""
    bm = getattr(engine, "block_manager", None)
    if bm is None:
        return [], 0, False
    for _ in range(3):  # the engine thread appends while we copy; tuple() of a deque of int pairs rarely yields
        try:
            log = tuple(bm.evictions)
            break
        except RuntimeError:  # deque mutated during iteration
            continue
    else:
        return [], bm.num_evictions, True
    if not log:
        return [], bm.num_evictions, after > bm.num_evictions
    oldest, newest = log[0][0], log[-1][0]
    return [h for serial, h in log if serial > after], newest, after + 1 < oldest or after > newest


def build_engine(config: WorkerConfig, servicer: WorkerServicer | None = None) -> Any:
    """The worker's engine per --engine, loaded and warmed up (call it on the thread that will step it)."""
    import torch

    from services.worker.engine.build import build_engine as build

    if config.threads:
        torch.set_num_threads(config.threads)
    loaded, engine = build(config)
    if servicer is not None:
        servicer.loaded = loaded
    log.info("engine %s ready: model=%s device=%s dtype=%s quantization=%s (pid %d)", engine.name, config.model,
             loaded.device, loaded.dtype, loaded.quantization, os.getpid())
    return engine


def check_choices(config: WorkerConfig) -> None:
    """Refuse unknown values of the choice flags before anything loads, naming what is supported."""
    from services.worker.engine.build import ENGINES
    from services.worker.engine.models.engine_model import MODEL_IMPLS
    from services.worker.engine.models.weights import check_quantization

    def check(flag: str, value: str, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise SystemExit(f"worker: {flag} {value!r} is not supported; use one of: {', '.join(choices)}")

    check("--engine", config.engine, ENGINES)
    try:
        check_quantization(config.quantization, auto=True)
    except ValueError as exc:
        raise SystemExit(f"worker: {exc}") from None
    check("--model-impl", config.model_impl, MODEL_IMPLS)


def run(config: WorkerConfig) -> None:
    from services.common.log import setup_logging
    from services.common.server import serve, start_metrics_server
    from services.common.tls import server_credentials

    check_choices(config)
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_ca)
    setup_logging("worker")
    tracing.setup("tokenmill-worker", config.otlp_traces_endpoint)
    start_metrics_server(config.metrics_port, config.host)
    servicer = WorkerServicer(config)

    async def shutdown() -> None:
        if servicer.engine is not None:
            servicer.engine.shutdown()
        tracing.shutdown()

    asyncio.run(serve(
        name="worker", host=config.host, port=config.port,
        service_names=[worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name],
        register=lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server),
        prepare=servicer.load, grace_period_s=config.grace_period_s, on_shutdown=shutdown, credentials=credentials,
    ))
