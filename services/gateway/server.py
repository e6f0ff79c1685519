"""The gateway's public gRPC front (tokenmill.v1.Inference) over the gateway core (core.py)."""

from __future__ import annotations

import asyncio

import grpc

from services.common.grpc_util import FINISH_REASONS
from services.common.pb import inference_pb2, inference_pb2_grpc
from services.common.sampling import InvalidRequest, SamplingParams, Structured
from services.gateway.core import Gateway, GatewayError
from services.gateway.pending import Chunk, Pending
from services.gateway.tools import ToolOutput, call_schema, from_proto, messages_from_proto, render


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def _inputs(self, request: inference_pb2.GenerateRequest, context) -> tuple[str, list, SamplingParams]:
        """(prompt, messages, sampling) to admit: with tools or tool turns, the prompt rendered here (tools.py)
        and required / named calls enforced by a JSON schema."""
        try:
            sampling = SamplingParams.from_proto_unchecked(request.sampling)
            tooled = from_proto(request)
            if tooled is None:
                return request.prompt, [(m.role, m.content) for m in request.messages], sampling
            tools, mode, name, parallel = tooled
            if mode in ("required", "named"):
                if request.sampling.HasField("structured"):
                    raise InvalidRequest("a required or named tool call constrains the output: send it without "
                                         "sampling.structured")
                sampling.structured = Structured("json_schema", call_schema(tools, mode, name, parallel))
            validator = self.gw.validator
            if validator is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway is starting: no worker has reported yet")
            prompt = await asyncio.get_running_loop().run_in_executor(
                self.gw.tokenizer_pool, render, validator.tokenizer, messages_from_proto(request.messages),
                tools if mode != "none" else None)
            return prompt, [], sampling
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    @staticmethod
    def _tools(request: inference_pb2.GenerateRequest) -> ToolOutput | None:
        try:
            tooled = from_proto(request)
        except InvalidRequest:
            return None
        return ToolOutput(tooled[1], tooled[3]) if tooled is not None and tooled[1] != "none" else None

    async def _admit(self, request: inference_pb2.GenerateRequest, context, streaming: bool) -> Pending:
        prompt, messages, sampling = await self._inputs(request, context)
        # the field, else the x-session-id metadata (which an L7 proxy in front of several gateways can hash on)
        metadata = dict(context.invocation_metadata() or ())
        session = request.session_id or metadata.get("x-session-id", "")
        try:
            return await self.gw.admit(
                request_id=request.request_id, model=request.model, prompt=prompt, messages=messages,
                sampling=sampling,
                priority=request.priority, streaming=streaming, session_id=session,
                traceparent=metadata.get("traceparent", ""))
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
            return self.response(p, await self.gw.final(p), whole=True, first=True, tools=self._tools(request))
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)

    async def GenerateStream(self, request, context):
        await self._check_stream(request, context)
        p = await self._admit(request, context, streaming=True)
        try:
            first, tools = True, self._tools(request)
            async for chunk in self.gw.chunks(p):
                yield self.response(p, chunk, whole=False, first=first, tools=tools)
                first = False
        except GatewayError as exc:
            await context.abort(exc.code, exc.message)

    def response(self, p: Pending, chunk: Chunk, whole: bool, first: bool, tools: ToolOutput | None = None
                 ) -> inference_pb2.GenerateResponse:
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
        if tools is not None:  # calls parsed out of the text (whole, or this choice's delta)
            if whole:  # out mirrors choice 0
                for i, o in enumerate(p.outputs):
                    msg, _ = tools.message("".join(o.text), None)
                    text, calls = msg["content"] or "", _calls_pb(msg.get("tool_calls", []))
                    for target in ([out] if i == 0 else []) + ([out.choices[i]] if out.choices else []):
                        target.text = text
                        target.tool_calls.extend(calls)
            else:
                delta, _ = tools.delta(chunk.index, chunk.text, chunk.finish_reason)
                out.text = delta["content"]
                out.tool_calls.extend(_calls_pb(delta.get("tool_calls", [])))
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


def _calls_pb(calls: list[dict]) -> list[inference_pb2.ToolCall]:
    return [inference_pb2.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
            for c in calls]


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
