"""The gateway's public gRPC front (tokenmill.v1.Inference) over the gateway core (core.py)."""

from __future__ import annotations

import grpc

from services.common.grpc_util import FINISH_REASONS
from services.common.pb import inference_pb2, inference_pb2_grpc
from services.gateway.core import Gateway, GatewayError
from services.gateway.pending import Chunk, Pending


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def _admit(self, request: inference_pb2.GenerateRequest, context, streaming: bool) -> Pending:
        # the field, else the x-session-id metadata (which an L7 proxy in front of several gateways can hash on)
        session = request.session_id or dict(context.invocation_metadata() or ()).get("x-session-id", "")
        try:
            return await self.gw.admit(
                request_id=request.request_id, model=request.model, prompt=request.prompt,
                messages=[(m.role, m.content) for m in request.messages], sampling=request.sampling,
                priority=request.priority, streaming=streaming, session_id=session)
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)

    @staticmethod
    async def _check_stream(request: inference_pb2.GenerateRequest, context) -> None:
        s = request.sampling
        if s.best_of > max(s.n, 1):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "best_of > n cannot be streamed: the n best are "
                                "known only once every sample has finished; use Generate, or best_of = n")

    async def Generate(self, request, context):
        p = await self._admit(request, context, streaming=False)
        try:
            return self.response(p, await self.gw.final(p), whole=True, first=True)
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)

    async def GenerateStream(self, request, context):
        await self._check_stream(request, context)
        p = await self._admit(request, context, streaming=True)
        try:
            first = True
            async for chunk in self.gw.chunks(p):
                yield self.response(p, chunk, whole=False, first=first)
                first = False
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)

    def response(self, p: Pending, chunk: Chunk, whole: bool, first: bool) -> inference_pb2.GenerateResponse:
        final = chunk.final
        out = inference_pb2.GenerateResponse(
            request_id=p.request_id,
            text="".join(p.text) if whole else chunk.text,
            token_ids=p.token_ids if whole else chunk.token_ids,
            finish_reason=FINISH_REASONS[chunk.finish_reason],
            usage=p.usage if final else None,
            timing=p.timing() if final else None,
            model=self.gw.model,
            logprobs=self._named(p.logprobs if whole else chunk.logprobs),
            index=0 if whole else chunk.index,
        )
        if whole and len(p.outputs) > 1:  # sampling.n > 1: every choice
            out.finish_reason = FINISH_REASONS[p.outputs[0].finish_reason or chunk.finish_reason]
            out.choices.extend(inference_pb2.Choice(
                index=i, text="".join(o.text), token_ids=o.token_ids, logprobs=self._named(o.logprobs),
                finish_reason=FINISH_REASONS[o.finish_reason or chunk.finish_reason]) for i, o in enumerate(p.outputs))
        if first and p.params.prompt_logprobs:
            out.prompt_logprobs.extend(self._named(p.prompt_logprobs))
            out.prompt_token_ids.extend(p.prompt_ids)
        return out

    def _named(self, logprobs: list) -> list:
        """The worker's logprobs with each token's text filled in."""
        for lp in logprobs:
            lp.token = self.gw.token_text(lp.token_id)
            for top in lp.top:
                top.token = self.gw.token_text(top.token_id)
        return logprobs

    async def ListModels(self, request, context):
        info = self.gw.pool.info()  # the last worker seen, while none is live: its model with workers = 0
        models = []
        if info is not None:
            models.append(inference_pb2.ModelInfo(id=info.model, context_length=info.context_length,
                                                  quantization=info.quantization, workers=len(self.gw.pool.live())))
        return inference_pb2.ListModelsResponse(models=models)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every tokenmill.v1 call must carry `authorization: Bearer <key>`; health and reflection stay open."""

    def __init__(self, api_key: str) -> None:
        self.expected = f"Bearer {api_key}"

    async def intercept_service(self, continuation, details):
        if not details.method.startswith("/tokenmill."):
            return await continuation(details)
        if dict(details.invocation_metadata or ()).get("authorization") == self.expected:
            return await continuation(details)
        handler = await continuation(details)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send metadata 'authorization: Bearer <key>'")

        if handler.response_streaming:
            async def deny_stream(request, context):
                await deny(request, context)
                yield  # pragma: no cover - makes this an async generator

            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
