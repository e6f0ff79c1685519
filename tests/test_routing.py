"""Prefix-cache-aware routing over real workers on 127.0.0.1: conversations keep their worker, sessions pin,
an overloaded worker is passed over despite its cache, a dead worker leaves the index, the index stays bounded."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from conftest import chat_request, free_port

from services.common.metrics import sample_sum
from services.common.pb import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

SYSTEM = ("You are a storyteller for children. Every story you tell has a clear moral, a gentle tone, a named "
          "animal hero, a setting a child can picture, and an ending that shows what the hero learned. ") * 3
WORKER_ARGS = ("--engine", "paged", "--max-num-seqs", "8", "--kv-cache-memory", "64MiB")  # 91 blocks of 16


def metric(http: str, name: str, **labels: str) -> float:
    return sample_sum(httpx.get(http + "/metrics", timeout=10).text, name, **labels)


def wait_for(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def converse(stub, turns: list[str], system: str = "", session_id: str = "") -> list:
    """One conversation, turn by turn: each request carries the whole history so far."""
    messages = [inference_pb2.ChatMessage(role="system", content=system)] if system else []
    replies = []
    for turn in turns:
        messages.append(inference_pb2.ChatMessage(role="user", content=turn))
        r = stub.Generate(inference_pb2.GenerateRequest(
            messages=messages, session_id=session_id,
            sampling=inference_pb2.SamplingParams(max_tokens=12, temperature=0.0)), timeout=120)
        messages.append(inference_pb2.ChatMessage(role="assistant", content=r.text))
        replies.append(r)
    return replies


@pytest.fixture(scope="module")
def workers(cluster):
    return [cluster.start("worker", *WORKER_ARGS, wait=False) for _ in range(2)]


@pytest.fixture(scope="module")
def gw(cluster, workers):
    from services.local import wait_serving

    wait_serving(workers, 240)
    http_port = free_port()
    g = cluster.gateway(workers, "--routing", "prefix-aware", "--http-port", str(http_port))
    with grpc.insecure_channel(g.address) as channel:
        yield {"stub": inference_pb2_grpc.InferenceStub(channel), "http": f"http://127.0.0.1:{http_port}"}


def test_conversation_turns_stay_on_their_worker(gw):
    predicted = metric(gw["http"], "tokenmill:routing_predicted_cached_tokens_total")
    cached = metric(gw["http"], "tokenmill:routing_cached_tokens_total")
    for topic in ("a brave owl", "a kind whale"):
        replies = converse(gw["stub"], [f"Tell me a story about {topic}.", "Make it shorter.", "Give it a title."])
        assert len({r.timing.worker for r in replies}) == 1, [r.timing.worker for r in replies]
        for prev, r in itertools.pairwise(replies):  # the history so far came from the cache
            assert r.usage.cached_tokens >= prev.usage.prompt_tokens - 16, (prev.usage, r.usage)
    # the gateway's index predicted exactly what the workers found: same hashes, same block size
    gained = metric(gw["http"], "tokenmill:routing_cached_tokens_total") - cached
    assert gained > 0 and metric(gw["http"], "tokenmill:routing_predicted_cached_tokens_total") - predicted == gained


def test_session_id_pins_grpc_and_http(gw):
    before = metric(gw["http"], "tokenmill:routing_prefix_hits_total", reason="session")
    served = set()
    for i in range(3):
        request = chat_request(f"Name {i + 2} colours of the rainbow.", 4)
        request.session_id = "alice"
        served.add(gw["stub"].Generate(request, timeout=120).timing.worker)
        metadata = [("x-session-id", "dave")]  # as metadata, for a proxy that hashes on it
        gw["stub"].Generate(chat_request(f"Count to {i + 2}.", 4), metadata=metadata, timeout=120)
    assert len(served) == 1
    url = gw["http"] + "/v1/chat/completions"
    for i in range(3):
        body = {"messages": [{"role": "user", "content": f"Count to {i + 3}."}], "max_tokens": 4, "user": "bob"}
        assert httpx.post(url, json=body, timeout=120).status_code == 200
        body.pop("user")
        assert httpx.post(url, json=body, headers={"x-session-id": "carol"}, timeout=120).status_code == 200
    # the first request of each session is scored; the 2 after it follow their session (4 sessions)
    assert metric(gw["http"], "tokenmill:routing_prefix_hits_total", reason="session") - before == 8

    too_long = "s" * 300
    with pytest.raises(grpc.RpcError) as err:
        gw["stub"].Generate(inference_pb2.GenerateRequest(prompt="hi", session_id=too_long), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in err.value.details()
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}], "user": too_long}, timeout=30)
    assert r.status_code == 400 and "session_id" in r.json()["error"]["message"]


def test_overloaded_worker_is_passed_over_despite_its_prefix(gw, workers):
    first = converse(gw["stub"], ["Tell me about a turtle who learns patience."], SYSTEM)[0]
    again = converse(gw["stub"], ["Tell me about a rabbit who learns to listen."], SYSTEM)[0]
    holder = first.timing.worker
    assert again.timing.worker == holder and again.usage.cached_tokens >= 64  # the shared system prompt
    balance = metric(gw["http"], "tokenmill:routing_prefix_hits_total", reason="balance")
    # load the holder directly (as another gateway would), beyond the guard's 4 requests
    with grpc.insecure_channel(holder) as channel:
        flood = worker_pb2_grpc.WorkerStub(channel).Submit(worker_pb2.SubmitRequest(requests=[
            worker_pb2.WorkerRequest(request_id=f"flood-{i}", prompt_token_ids=[1, 2, 3, 4 + i],
                                     sampling=inference_pb2.SamplingParams(max_tokens=200, ignore_eos=True))
            for i in range(6)]), timeout=300)
        wait_for(lambda: metric(gw["http"], "tokenmill:routing_worker_load", worker=holder) >= 6, "the load report")
        third = converse(gw["stub"], ["Tell me about a mouse who learns courage."], SYSTEM)[0]
        flood.cancel()
    assert third.timing.worker != holder
    assert metric(gw["http"], "tokenmill:routing_prefix_hits_total", reason="balance") - balance == 1


def test_index_is_bounded_and_follows_worker_evictions(cluster, gw, workers):
    http_port = free_port()
    small = cluster.gateway(workers, "--http-port", str(http_port), "--routing-index-blocks", "12")
    small_http = f"http://127.0.0.1:{http_port}"

    async def flood() -> None:  # distinct prompts of ~7 blocks: more than both workers' 2 x 91 blocks hold
        async with grpc.aio.insecure_channel(small.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            await asyncio.gather(*(stub.Generate(inference_pb2.GenerateRequest(
                prompt=" ".join(f"{w}{i}" for w in ("apple", "river", "stone", "cloud", "maple", "ember") * 6),
                sampling=inference_pb2.SamplingParams(max_tokens=1)), timeout=120) for i in range(28)))

    asyncio.run(flood())
    for w in workers:
        assert 0 < metric(small_http, "tokenmill:routing_index_blocks", worker=w.address) <= 12
    assert metric(small_http, "tokenmill:routing_index_evictions_total", cause="lru") > 0
    # the first gateway's blocks from earlier tests were evicted by the workers, which told it so
    wait_for(lambda: metric(gw["http"], "tokenmill:routing_index_evictions_total", cause="worker") > 0,
             "the workers' eviction reports")
    for w in workers:
        assert metric(gw["http"], "tokenmill:routing_index_blocks", worker=w.address) <= 91


@pytest.mark.parametrize("args, fragment", [
    (["--routing", "round-robin"], "unknown --routing 'round-robin'"),
    (["--routing-balance-rel", "0.5"], "--routing-balance-rel >= 1"),
    (["--routing-index-blocks", "0"], "--routing-index-blocks must be at least 1"),
])
def test_bad_routing_settings_stop_the_gateway_with_a_reason(args, fragment):
    done = subprocess.run([sys.executable, "-m", "services.cli", "gateway", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and fragment in done.stderr, done.stderr[-2000:]


def test_index_memory_stays_bounded_under_10k_prompts():
    """The index alone (no servers): 10k distinct prompts over 4 workers never hold more than the bound,
    and its memory stops growing once the bound is reached."""
    import random
    import tracemalloc

    from services.common.prefix_hash import block_hashes
    from services.gateway.prefix_index import PrefixIndex

    bound, workers = 2048, [f"w{i}" for i in range(4)]
    index = PrefixIndex(bound)
    rng = random.Random(0)
    shared = [rng.randrange(49152) for _ in range(160)]  # a system prompt many prompts start with
    tracemalloc.start()
    try:
        for i in range(10_000):
            tokens = (shared if i % 3 == 0 else []) + [rng.randrange(49152) for _ in range(rng.randint(20, 400))]
            index.add(workers[i % 4], block_hashes(tokens, 16))
            assert len(index) <= bound * len(workers)
            if i == 4_999:
                half = tracemalloc.get_traced_memory()[0]
        full = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert all(index.size(w) == bound for w in workers)
    assert full < half * 1.05 + 64 * 1024, (half, full)  # bounded: the second 5k prompts added nothing lasting
    assert full < bound * len(workers) * 200  # and small: ~100 bytes per remembered block


def test_dead_worker_leaves_the_index(gw, workers):
    """Kills one of the module's workers: keep it after every other test that uses them."""
    served = converse(gw["stub"], ["Tell me a story about a brave owl."], SYSTEM)[0].timing.worker
    assert metric(gw["http"], "tokenmill:routing_index_blocks", worker=served) > 0
    down = metric(gw["http"], "tokenmill:routing_index_evictions_total", cause="down")
    os.kill(next(w for w in workers if w.address == served).proc.pid, signal.SIGKILL)
    wait_for(lambda: metric(gw["http"], "tokenmill:routing_index_blocks", worker=served) == 0, "the drop")
    assert metric(gw["http"], "tokenmill:routing_index_evictions_total", cause="down") > down
