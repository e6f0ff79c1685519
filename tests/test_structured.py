"""Structured output with the embedded 135M model: 50 constrained requests (JSON schemas with nested objects,
enums and arrays; a regex; a choice) all parse and validate, greedy and at temperature 0.8, on a worker
without and one with speculative decoding (which constrained requests do not use); bad constraints are
refused with the grammar library's reason; and the judge's OpenAI backend, pointed at this gateway, scores.
"""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import httpx
import pytest
from conftest import free_port
from judge_support import JudgeProcess

from services.common.pb import inference_pb2, inference_pb2_grpc, judge_pb2, judge_pb2_grpc

PET = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "kind": {"type": "string", "enum": ["cat", "dog", "owl"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 30},
    "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "city": {"type": "string", "maxLength": 20}},
              "required": ["name", "city"]},
    "toys": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "kind", "age", "owner", "toys"]}
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"
MOODS = ["happy", "sad", "sleepy"]


def valid(kind: str, text: str) -> bool:
    if kind == "choice":
        return text in MOODS
    if kind == "regex":
        return re.fullmatch(DATE, text) is not None
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    if kind == "json_object":
        return isinstance(doc, dict)
    owner, toys = doc.get("owner"), doc.get("toys")
    return (set(doc) == set(PET["properties"]) and doc["kind"] in ("cat", "dog", "owl") and 0 <= doc["age"] <= 30
            and isinstance(owner, dict) and set(owner) == {"name", "city"} and isinstance(toys, list)
            and all(isinstance(t, str) for t in toys))


def structured(kind: str) -> inference_pb2.StructuredOutput:
    return {"json_schema": inference_pb2.StructuredOutput(json_schema=json.dumps(PET)),
            "json_object": inference_pb2.StructuredOutput(json_object=True),
            "regex": inference_pb2.StructuredOutput(regex=DATE),
            "choice": inference_pb2.StructuredOutput(choice=MOODS)}[kind]


PROMPTS = {"json_schema": "Describe a pet as JSON.",
           "json_object": "Return a JSON object with two keys, name and colour, for an apple.",
           "regex": "When is the next holiday? Answer with a date.", "choice": "How does the cat feel?"}


@pytest.fixture(scope="module")
def gateways(cluster):
    plain = cluster.start("worker", "--engine", "paged")
    spec = cluster.start("worker", "--engine", "paged", "--speculative", "ngram")
    http_port = free_port()
    return {"plain": cluster.gateway([plain], "--http-port", str(http_port)).address,
            "spec": cluster.gateway([spec]).address, "http": f"http://127.0.0.1:{http_port}"}


async def _run(address: str, jobs: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(kind: str, temperature: float, seed: int) -> tuple[str, str]:
            sampling = inference_pb2.SamplingParams(max_tokens=160, temperature=temperature, seed=seed,
                                                    structured=structured(kind))
            request = inference_pb2.GenerateRequest(
                messages=[inference_pb2.ChatMessage(role="user", content=PROMPTS[kind])], sampling=sampling)
            r = await stub.Generate(request, timeout=600)
            return kind, r.text

        return await asyncio.gather(*(one(*job) for job in jobs))


def test_fifty_constrained_requests_all_valid(gateways):
    kinds = ["json_schema"] * 4 + ["json_object", "regex", "regex", "choice"]
    jobs = [(kinds[i % len(kinds)], (0.0, 0.8)[i // len(kinds) % 2], i) for i in range(25)]  # each kind at both
    outputs = asyncio.run(_run(gateways["plain"], jobs)) + asyncio.run(_run(gateways["spec"], jobs))
    bad = [(kind, text) for kind, text in outputs if not valid(kind, text)]
    print(f"{len(outputs)} constrained outputs, e.g. {outputs[0][1]!r} / {outputs[5][1]!r} / {outputs[7][1]!r}")
    assert len(outputs) == 50 and not bad, bad


@pytest.mark.parametrize("body, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strnig"}}}}}}, "json_schema"),
    ({"guided_regex": "(unclosed"}, "regex"),
])
def test_invalid_constraint_is_400_with_the_library_reason(gateways, body, fragment):
    r = httpx.post(gateways["http"] + "/v1/chat/completions", timeout=120,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert fragment in message and "cannot be used for structured output:" in message, message
    with grpc.insecure_channel(gateways["plain"]) as channel, pytest.raises(grpc.RpcError) as err:
        sampling = inference_pb2.SamplingParams(max_tokens=4, structured=inference_pb2.StructuredOutput(
            regex="(unclosed"))
        inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(prompt="hi", sampling=sampling), timeout=120)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "regex" in err.value.details()


def test_judge_openai_backend_scores_through_our_gateway(gateways, tmp_path):
    judge = JudgeProcess(tmp_path, "--judge-backend", "openai", "--judge-url", gateways["http"] + "/v1",
                         "--judge-max-tokens", "160", "--judge-timeout-s", "300")
    try:
        with grpc.insecure_channel(judge.address) as channel:
            reply = judge_pb2_grpc.JudgeStub(channel).Score(judge_pb2.ScoreRequest(
                id="own", rubric="helpfulness", prompt="How do I boil an egg?",
                response="Put the egg in boiling water for eight minutes, then cool it in cold water."), timeout=300)
    finally:
        judge.stop()
    assert reply.scores and all(0.0 <= s.score <= 1.0 for s in reply.scores), reply
