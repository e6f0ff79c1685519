"""Gateway over real workers on 127.0.0.1: OpenAI HTTP, bad input, backpressure, auth, routing, failover."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time

import grpc
import httpx
import openai
import pytest
from conftest import chat_request, free_port

from services.common.pb import inference_pb2, inference_pb2_grpc

STORY = "Write a single paragraph moral story for children about a clever crow who learns the value of sharing."


def chat(content: str = STORY, max_tokens: int = 12, **sampling) -> inference_pb2.GenerateRequest:
    return chat_request(content, max_tokens, **sampling)


@pytest.fixture(scope="module")
def workers(cluster):
    """Two workers with room for 8 sequences each (so a burst really queues at the gateway)."""
    return [cluster.start("worker", "--engine", "paged", "--max-num-seqs", "8") for _ in range(2)]


@pytest.fixture(scope="module")
def gateway(cluster, workers):
    http_port = free_port()
    gw = cluster.gateway(workers, "--http-port", str(http_port))
    return {"grpc": gw.address, "http": f"http://127.0.0.1:{http_port}"}


@pytest.fixture(scope="module")
def stub(gateway):
    with grpc.insecure_channel(gateway["grpc"]) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def test_openai_client_chat_stream_and_completions(gateway):
    client = openai.OpenAI(base_url=gateway["http"] + "/v1", api_key="unused")
    messages = [{"role": "user", "content": STORY}]
    reply = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 20

    stream = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == reply.choices[0].message.content
    assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens

    completion = client.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=8,
                                           temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    assert httpx.get(gateway["http"] + "/health").json()["workers"] == 2
    assert "tokenmill:gateway_queue_depth" in httpx.get(gateway["http"] + "/metrics").text


HI = [{"role": "user", "content": "hi"}]
BAD_HTTP = [  # (path, raw body, status, fragment of the message)
    ("chat", {"messages": []}, 400, "at least 1 item"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role is 'robot'"),
    ("chat", {"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "context"),
    ("chat", {"messages": HI, "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ("chat", {"messages": HI, "max_tokens": 2**40}, 400, "'max_tokens'"),
    ("chat", {"messages": HI, "top_k": 2**40}, 400, "'top_k'"),
    ("chat", {"messages": HI, "seed": 2**70}, 400, "'seed'"),
    ("chat", {"messages": HI, "max_tokens": 2.5}, 400, "'max_tokens'"),
    ("chat", {"messages": HI, "temperature": -1}, 400, "temperature must be >= 0"),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "'temperature'"),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400, "'temperature'"),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}', 400, "'top_p'"),
    ("chat", {"messages": HI, "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ("chat", {"messages": HI, "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("chat", {"messages": HI, "stop": ["x"] * 100}, 400, "stop strings"),
    ("chat", {"messages": HI, "stop": 5}, 400, "'stop'"),
    ("chat", {"messages": HI, "stream": "yes"}, 400, "'stream'"),
    ("chat", {"messages": HI, "temperature": "hot"}, 400, "'temperature'"),
    ("chat", {"messages": "hi"}, 400, "'messages'"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content"),
    ("chat", {"messages": HI, "functions": [{"name": "f"}], "store": True}, 400,
     "unsupported parameters: functions, store"),
    ("chat", {"messages": HI, "tools": [{"type": "function"}]}, 400, "'tools.0.function'"),
    ("chat", {"messages": HI, "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400,
     "'tools.0.function.name'"),
    ("chat", {"messages": HI, "tool_choice": "required"}, 400, "needs at least one function"),
    ("chat", {"messages": HI, "tool_choice": "sometimes"}, 400, "'tool_choice'"),
    ("chat", {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
              "guided_regex": "a"}, 400, "constrains the output"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}], "tools": [{"type": "function", "function": {
        "name": "f"}}]}, 400, "role is 'robot'"),
    ("chat", {"messages": HI, "n": 0}, 400, "n must be at least 1"),
    ("chat", {"messages": HI, "n": 65}, 400, "n must be in 1..64"),
    ("chat", {"messages": HI, "n": 2, "best_of": 1}, 400, "best_of must be in n..64"),
    ("chat", {"messages": HI, "n": 2, "best_of": 3, "stream": True}, 400, "best_of > n cannot be streamed"),
    ("chat", {"messages": HI, "n": "2"}, 400, "'n'"),
    ("chat", {"messages": HI, "presence_penalty": 2.5}, 400, "presence_penalty must be in -2..2"),
    ("chat", {"messages": HI, "frequency_penalty": -3}, 400, "frequency_penalty must be in -2..2"),
    ("chat", {"messages": HI, "frequency_penalty": "high"}, 400, "'frequency_penalty'"),
    ("chat", {"messages": HI, "repetition_penalty": 0}, 400, "repetition_penalty must be > 0"),
    ("chat", {"messages": HI, "min_p": 1.5}, 400, "min_p must be in [0, 1]"),
    ("chat", {"messages": HI, "logit_bias": {"5": 101}}, 400, "logit_bias of token 5 must be in -100..100"),
    ("chat", {"messages": HI, "logit_bias": {"owl": 1}}, 400, "logit_bias keys must be token ids"),
    ("chat", {"messages": HI, "logit_bias": {"99999999": 1}}, 400, "outside the vocabulary"),
    ("chat", {"messages": HI, "logit_bias": {"-1": 1}}, 400, "logit_bias token ids must be in"),
    ("chat", {"messages": HI, "logit_bias": {"5": "x"}}, 400, "'logit_bias'"),
    ("chat", {"messages": HI, "min_tokens": -1}, 400, "min_tokens must be >= 0"),
    ("chat", {"messages": HI, "max_tokens": 4, "min_tokens": 5}, 400, "must not exceed max_tokens"),
    ("chat", {"messages": HI, "bad_words": [" "]}, 400, "bad_words must list"),
    ("chat", {"messages": HI, "bad_words": "owl"}, 400, "'bad_words'"),
    ("chat", {"messages": HI, "best_of": "4"}, 400, "'best_of'"),
    ("chat", {"messages": HI, "n": 9}, 400, "exceeds the 8 sequences"),  # these workers run 8 at once
    ("chat", {"messages": HI, "presence_penalty": [1]}, 400, "'presence_penalty'"),
    ("chat", {"messages": HI, "repetition_penalty": "x"}, 400, "'repetition_penalty'"),
    ("chat", {"messages": HI, "min_p": -0.1}, 400, "min_p must be in [0, 1]"),
    ("chat", {"messages": HI, "min_p": "low"}, 400, "'min_p'"),
    ("chat", {"messages": HI, "min_tokens": 1.5}, 400, "'min_tokens'"),
    ("chat", {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}],
              "parallel_tool_calls": "yes"}, 400, "'parallel_tool_calls'"),
    ("completions", {"prompt": "hi", "n": 0}, 400, "n must be at least 1"),
    ("completions", {"prompt": "hi", "n": 2, "best_of": 3, "stream": True}, 400, "best_of > n cannot be streamed"),
    ("completions", {"prompt": "hi", "logit_bias": {"99999999": 1}}, 400, "outside the vocabulary"),
    ("chat", {"messages": HI, "frobnicate": True}, 400, "unsupported parameter: frobnicate"),
    ("chat", {"messages": HI, "top_logprobs": 3}, 400, "top_logprobs needs logprobs"),
    ("chat", {"messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "'top_logprobs'"),
    ("chat", {"messages": HI, "response_format": {"type": "xml"}}, 400, "'response_format.type'"),
    ("chat", {"messages": HI, "response_format": {"type": "json_schema"}}, 400, "needs a json_schema"),
    ("chat", {"messages": HI, "guided_choice": ["a"], "guided_regex": "b"}, 400, "send one of them"),
    ("chat", {"messages": [{"role": "user", "content": "x" * 10_000_000}]}, 400, "shorten it"),
    ("chat", [1, 2], 400, "must be a JSON object"),
    ("chat", "null", 400, "must be a JSON object"),
    ("chat", '"just a string"', 400, "must be a JSON object"),
    ("chat", "{not json", 400, "not valid JSON"),
    ("completions", {"prompt": 5}, 400, "'prompt'"),
    ("completions", {"prompt": [[1, 2], "text"]}, 400, "'prompt"),
    ("completions", {"prompt": [-1, 2]}, 400, "'prompt"),
    ("completions", {"prompt": [10**9]}, 400, "token ids must be in"),
    ("completions", {"prompt": "hi", "echo": 1}, 400, "'echo'"),
    ("completions", {"prompt": "hi", "logprobs": 50}, 400, "'logprobs'"),
    ("completions", {"prompt": "hi", "suffix": "x"}, 400, "unsupported parameter: suffix"),
    ("completions", {"prompt": ["a", "b"], "stream": True}, 400, "stream takes one prompt"),
    ("../tokenize", {"prompt": 5}, 400, "prompt must be a string"),
    ("../tokenize", {"prompt": "a", "messages": HI}, 400, "either prompt (a string) or messages"),
    ("../detokenize", {"tokens": [10**9]}, 400, "tokens must be a list of token ids"),
    ("nowhere", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, fragment", BAD_HTTP)
def test_bad_input_http_is_a_4xx_json_error(gateway, path, body, status, fragment):
    content = body if isinstance(body, str) else json.dumps(body)
    route = {"chat": "chat/completions"}.get(path, path)
    r = httpx.post(f"{gateway['http']}/v1/{route}", content=content, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error", error


def test_neutral_values_of_unsupported_parameters_pass(gateway):
    body = {"messages": HI, "max_tokens": 2, "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}, "seed": -5, "top_k": -1, "stream": False, "tools": [], "store": False}
    assert httpx.post(gateway["http"] + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_invalid_utf8_http_and_grpc(gateway):
    raw = b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'
    r = httpx.post(gateway["http"] + "/v1/chat/completions", content=raw, timeout=30)
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    bad = inference_pb2.GenerateRequest(prompt="AB").SerializeToString().replace(b"AB", b"\xff\xfe")
    with grpc.insecure_channel(gateway["grpc"]) as channel:
        call = channel.unary_unary("/tokenmill.v1.Inference/Generate", request_serializer=lambda b: b,
                                   response_deserializer=inference_pb2.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            call(bad, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in err.value.details()


@pytest.mark.parametrize("request_, fragment", [
    (inference_pb2.GenerateRequest(), "prompt is empty"),
    (inference_pb2.GenerateRequest(messages=[inference_pb2.ChatMessage(role="robot", content="x")]), "role"),
    (chat("word " * 9000), "context"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(temperature=-1.0), "temperature"),
    (chat(temperature=float("inf")), "temperature must be >= 0 and finite"),
    (chat(temperature=float("nan")), "temperature"),
    (chat(top_p=1.5), "top_p"),
    (chat(top_p=float("nan")), "top_p"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(structured=inference_pb2.StructuredOutput(regex="a", json_object=True)), "set exactly one"),
    (chat(structured=inference_pb2.StructuredOutput(json_schema="{not json")), "json_schema is not valid JSON"),
    (inference_pb2.GenerateRequest(prompt="hi", sampling=inference_pb2.SamplingParams(stop=["x"] * 100)), "stop"),
    (inference_pb2.GenerateRequest(prompt="x" * 10_000_000), "shorten it"),
])
def test_bad_input_grpc(stub, request_, fragment):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request_, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()
    assert stub.Generate(chat(max_tokens=2), timeout=60).usage.completion_tokens >= 1  # still serving


async def _burst(address: str, n: int, max_tokens: int, timeout: float = 300) -> collections.Counter:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(i: int) -> str:
            try:
                r = await stub.Generate(chat(f"{STORY} ({i})", max_tokens=max_tokens), timeout=timeout)
                return "OK" if r.usage.completion_tokens > 0 else "EMPTY"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        return collections.Counter(await asyncio.gather(*(one(i) for i in range(n))))


def test_queue_bound_answers_every_request(cluster, workers):
    gw = cluster.gateway(workers, "--max-queued-requests", "50")
    counts = asyncio.run(_burst(gw.address, 200, max_tokens=8))
    print(f"200 concurrent requests, queue bound 50: {dict(counts)}")
    assert sum(counts.values()) == 200
    assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, counts
    assert counts["OK"] >= 50 and counts["RESOURCE_EXHAUSTED"] > 0


def test_deadline_while_queued(cluster, workers):
    gw = cluster.gateway(workers, "--max-queued-requests", "500")

    async def run() -> str:
        background = asyncio.create_task(_burst(gw.address, 60, max_tokens=24))
        await asyncio.sleep(1.0)
        async with grpc.aio.insecure_channel(gw.address) as channel:
            try:
                await inference_pb2_grpc.InferenceStub(channel).Generate(chat(max_tokens=4), timeout=0.5)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
        counts = await background
        assert counts["OK"] == 60, counts
        return code

    assert asyncio.run(run()) == "DEADLINE_EXCEEDED"


def test_api_key(cluster, workers):
    http_port = free_port()
    gw = cluster.gateway(workers, "--api-key", "s3cret", "--http-port", str(http_port))
    with grpc.insecure_channel(gw.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(chat(max_tokens=2), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(chat(max_tokens=2), metadata=[("authorization", "Bearer wrong")], timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Generate(chat(max_tokens=2), metadata=[("authorization", "Bearer s3cret")], timeout=60)
        assert ok.usage.completion_tokens >= 1
    url = f"http://127.0.0.1:{http_port}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60).status_code == 200


def test_no_live_worker_is_503_in_openai_shape(cluster):
    http_port = free_port()
    gw = cluster.gateway([f"127.0.0.1:{free_port()}"], "--http-port", str(http_port), wait=False)
    url = f"http://127.0.0.1:{http_port}"
    for _ in range(200):
        try:
            health = httpx.get(url + "/health", timeout=2)
            break
        except httpx.TransportError:
            assert gw.proc.poll() is None, gw.log.read_text()
            asyncio.run(asyncio.sleep(0.1))
    assert health.status_code == 503
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable" and "worker" in r.json()["error"]["message"]


def test_slow_worker_gets_fewer_requests(cluster, workers):
    slow = cluster.start("worker", "--engine", "paged", "--max-num-seqs", "8", "--step-delay-ms", "3000")
    gw = cluster.gateway([*workers, slow])

    async def run() -> collections.Counter:
        served: collections.Counter = collections.Counter()
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            queue = list(range(48))

            async def client() -> None:
                while queue:
                    i = queue.pop()
                    r = await stub.Generate(chat(f"{STORY} ({i})", max_tokens=12), timeout=300)
                    served[r.timing.worker] += 1

            await asyncio.gather(*(client() for _ in range(9)))
        return served

    served = asyncio.run(run())
    print(f"requests per worker (slow = {slow.address}): {dict(served)}")
    fast = [served[w.address] for w in workers]
    assert sum(served.values()) == 48
    # "clearly fewer": below each fast worker, and at most two thirds of the fast workers' mean
    assert served[slow.address] < min(fast) and served[slow.address] * 1.5 <= sum(fast) / len(fast), served


def test_failover_when_a_worker_is_killed(cluster):
    a = cluster.start("worker", "--engine", "paged", "--max-num-seqs", "16")
    b = cluster.start("worker", "--engine", "paged", "--max-num-seqs", "16")
    gw = cluster.gateway([a, b])

    async def run() -> collections.Counter:
        outcomes: collections.Counter = collections.Counter()
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            first_tokens = asyncio.Event()

            async def one(i: int) -> None:
                streamed = 0
                try:
                    async for chunk in stub.GenerateStream(chat(f"{STORY} ({i})", max_tokens=24), timeout=300):
                        streamed += len(chunk.token_ids)
                        if streamed:
                            first_tokens.set()
                    outcomes["completed"] += 1
                except grpc.aio.AioRpcError as exc:
                    ok = exc.code() == grpc.StatusCode.UNAVAILABLE and streamed > 0
                    outcomes["unavailable after tokens" if ok else f"BAD {exc.code().name} after {streamed}"] += 1

            tasks = [asyncio.create_task(one(i)) for i in range(100)]
            await asyncio.wait_for(first_tokens.wait(), 120)
            os.kill(b.proc.pid, signal.SIGKILL)
            await asyncio.gather(*tasks)
        return outcomes

    outcomes = asyncio.run(run())
    print(f"100 streams, one of two workers SIGKILLed mid-run: {dict(outcomes)}")
    assert sum(outcomes.values()) == 100
    assert set(outcomes) <= {"completed", "unavailable after tokens"}, outcomes
    assert outcomes["completed"] > 0


def test_cancelled_stream_frees_worker_kv_blocks(cluster):
    """A client cancelling a streamed n = 4 request: the worker frees every sample's blocks."""
    from services.common.pb import worker_pb2, worker_pb2_grpc

    worker = cluster.start("worker", "--engine", "paged")
    gw = cluster.gateway([worker])
    with grpc.insecure_channel(worker.address) as wch, grpc.insecure_channel(gw.address) as gch:
        load = worker_pb2_grpc.WorkerStub(wch).Load
        total = load(worker_pb2.LoadRequest(), timeout=10).total_kv_blocks
        stream = inference_pb2_grpc.InferenceStub(gch).GenerateStream(
            chat(max_tokens=2000, ignore_eos=True, n=4, temperature=0.8), timeout=300)
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received >= 8:
                break
        held = load(worker_pb2.LoadRequest(), timeout=10)
        assert held.running == 4 and held.free_kv_blocks < total
        stream.cancel()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            after = load(worker_pb2.LoadRequest(), timeout=10)
            if after.running == 0 and after.free_kv_blocks == total:
                break
            time.sleep(0.02)
        assert (after.running, after.free_kv_blocks) == (0, total), after


def test_n_choices_and_penalties_over_http_and_grpc(gateway, stub):
    """n seeded choices: the openai client's non-streamed choices equal its streamed ones (chunks by index) and
    gRPC's per-choice responses; usage counts every sample; best_of returns n; a logit_bias means the same on
    both fronts."""
    client = openai.OpenAI(base_url=gateway["http"] + "/v1", api_key="unused")
    kw = dict(model="smollm2-135m", messages=[{"role": "user", "content": STORY}], max_tokens=8, temperature=0.9,
              seed=7, n=3, extra_body={"ignore_eos": True, "repetition_penalty": 1.2})
    reply = client.chat.completions.create(**kw)
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2] and len(set(texts)) >= 2
    assert reply.usage.completion_tokens == 3 * 8
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts

    request = chat(STORY, max_tokens=8, temperature=0.9, seed=7, n=3, ignore_eos=True, repetition_penalty=1.2)
    r = stub.Generate(request, timeout=120)
    assert [c.text for c in r.choices] == texts and r.text == texts[0] and r.usage.completion_tokens == 24
    by_index = collections.defaultdict(str)
    for part in stub.GenerateStream(request, timeout=120):
        by_index[part.index] += part.text
    assert [by_index[i] for i in range(3)] == texts

    best = client.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=6, n=2,
                                     extra_body={"best_of": 4, "ignore_eos": True}, seed=3, temperature=1.0)
    assert [c.index for c in best.choices] == [0, 1] and best.usage.completion_tokens == 4 * 6

    tokenized = httpx.post(gateway["http"] + "/tokenize", json={"prompt": " owl", "add_special_tokens": False},
                           timeout=30).json()
    owl = tokenized["tokens"][0]  # vLLM's /tokenize: the id a client needs for logit_bias
    assert tokenized["count"] == 1 and tokenized["max_model_len"] > 0
    assert httpx.post(gateway["http"] + "/detokenize", json={"tokens": [owl]}, timeout=30).json()["prompt"] == " owl"
    chat_count = httpx.post(gateway["http"] + "/tokenize", json={"messages": HI}, timeout=30).json()["count"]
    assert chat_count == stub.Generate(chat("hi", max_tokens=1), timeout=60).usage.prompt_tokens
    biased = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, temperature=0, logit_bias={str(owl): 100})
    g = stub.Generate(chat("hi", max_tokens=3, logit_bias={owl: 100.0}), timeout=60)
    assert list(g.token_ids) == [owl] * 3 and biased.choices[0].message.content == g.text


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": {"type": "object", "properties": {
                                               "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]


def test_openai_client_tool_calling_flow(gateway):
    """Two functions; tool_choice required and named (enforced, so the 135M model returns valid calls), streamed
    and not; a role "tool" reply and a second turn; auto with and without a call in the output."""
    client = openai.OpenAI(base_url=gateway["http"] + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="smollm2-135m", tools=TOOLS, max_tokens=60, temperature=0)
    named = client.chat.completions.create(messages=messages, **kw,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    assert named.choices[0].finish_reason == "stop" and named.choices[0].message.content is None

    required = client.chat.completions.create(messages=messages, tool_choice="required", **kw)
    calls = required.choices[0].message.tool_calls
    assert required.choices[0].finish_reason == "tool_calls" and calls
    assert all(c.function.name in ("get_weather", "get_time") and json.loads(c.function.arguments) for c in calls)
    streamed: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(messages=messages, tool_choice="required", stream=True, **kw):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                entry = streamed.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert [(e["name"], json.loads(e["arguments"])) for e in streamed.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in calls] and reasons[-1] == "tool_calls"

    history = [*messages, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    second = client.chat.completions.create(messages=history, tool_choice="none", **kw)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    plain = client.chat.completions.create(messages=history, **kw)  # auto: the model answers in words here
    assert plain.choices[0].finish_reason in ("stop", "length") or plain.choices[0].message.tool_calls

    forced = r'<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}\n</tool_call>'
    auto = client.chat.completions.create(messages=messages, **kw, extra_body={"guided_regex": forced})
    got = auto.choices[0].message.tool_calls  # a real output containing a Hermes call, parsed by `auto`
    assert auto.choices[0].finish_reason == "tool_calls" and got[0].function.name == "get_time"
    assert json.loads(got[0].function.arguments)["zone"] in ("UTC", "CET")
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(messages=messages, **kw,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_grpc_tool_calling(stub):
    pb = inference_pb2
    tools = [pb.Tool(name=t["function"]["name"], description=t["function"]["description"],
                     parameters=json.dumps(t["function"]["parameters"])) for t in TOOLS]
    ask = [pb.ChatMessage(role="user", content="What is the weather in Paris?")]
    sampling = pb.SamplingParams(max_tokens=60, temperature=0.0)
    r = stub.Generate(pb.GenerateRequest(messages=ask, sampling=sampling, tools=tools, tool_name="get_weather"),
                      timeout=120)
    assert [c.name for c in r.tool_calls] == ["get_weather"] and json.loads(r.tool_calls[0].arguments)["city"]
    calls = []
    for part in stub.GenerateStream(pb.GenerateRequest(messages=ask, sampling=sampling, tools=tools,
                                                       tool_choice="required"), timeout=120):
        calls += part.tool_calls
    assert calls and all(c.name in ("get_weather", "get_time") and json.loads(c.arguments) for c in calls)
    history = [*ask, pb.ChatMessage(role="assistant", tool_calls=r.tool_calls),
               pb.ChatMessage(role="tool", tool_call_id=r.tool_calls[0].id, content="18 degrees and sunny")]
    answer = stub.Generate(pb.GenerateRequest(messages=history, sampling=sampling, tools=tools, tool_choice="none"),
                           timeout=120)
    assert answer.text and not answer.tool_calls
    for bad, fragment in ((dict(tools=[pb.Tool(name="f", parameters="{oops")]), "not valid JSON"),
                          (dict(tools=tools, tool_name="nope"), "not in tools"),
                          (dict(tools=tools, tool_choice="maybe"), "tool_choice 'maybe'")):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(messages=ask, sampling=sampling, **bad), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()


def test_generate_cli_takes_the_sampling_flags(gateway):
    """`tokenmill generate` with n, a seed, penalties, min_p and a logit bias: n seeded choices, the same on a
    second run; a malformed --logit-bias is refused before anything is sent."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "services.cli", "generate", "--gateway", gateway["grpc"], "--max-tokens", "6",
           "--temperature", "0.8", "--seed", "3", "--n", "2", "--repetition-penalty", "1.2", "--presence-penalty",
           "0.5", "--min-p", "0.05", "--min-tokens", "2", "--logit-bias", "28=-100", "--chat", STORY]
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout.startswith("[0] ") and "\n[1] " in runs[0].stdout
    assert runs[0].stdout == runs[1].stdout
    bad = subprocess.run([*cmd[:-2], "--logit-bias", "x", "hi"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "TOKEN_ID=BIAS" in bad.stderr
