"""The worker's gRPC servicer on the paged engine, in-process over grpc.aio on 127.0.0.1."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from engine_support import one_thread  # noqa: F401  (module fixture)

from services.common.config import WorkerConfig
from services.common.pb import inference_pb2, worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.usefixtures("one_thread")


def wreq(rid: str, ids: list[int], max_tokens: int, **kw) -> worker_pb2.WorkerRequest:
    return worker_pb2.WorkerRequest(request_id=rid, prompt_token_ids=ids, sampling=inference_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, **kw))


async def collect(stub, reqs) -> dict[str, list]:
    got: dict[str, list] = {}
    async for ev in stub.Submit(worker_pb2.SubmitRequest(requests=reqs)):
        got.setdefault(ev.request_id, []).append(ev)
    return got


@pytest.fixture(scope="module")
def worker():
    """(event loop, stub, servicer) of a paged worker with a 32 MiB KV pool (45 blocks of 16 tokens)."""
    from services.worker.server import WorkerServicer

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # grpc.aio binds to the current loop
    config = WorkerConfig(engine="paged", kv_cache_memory="32MiB", port=0)
    servicer = WorkerServicer(config)

    async def start():
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.load()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return server, channel

    server, channel = loop.run_until_complete(start())
    yield loop, worker_pb2_grpc.WorkerStub(channel), servicer
    servicer.engine.shutdown()
    loop.run_until_complete(channel.close())
    loop.run_until_complete(server.stop(0))
    asyncio.set_event_loop(None)
    loop.close()


def test_info_and_load(worker):
    loop, stub, _ = worker
    info = loop.run_until_complete(stub.Info(worker_pb2.InfoRequest()))
    assert info.engine == "paged" and info.block_size == 16 and info.context_length == 8192
    load = loop.run_until_complete(stub.Load(worker_pb2.LoadRequest()))
    assert load.total_kv_blocks > 10 and load.free_kv_blocks == load.total_kv_blocks and load.capacity == 64


def test_submit_streams_tokens_and_rejects_what_cannot_fit(worker):
    loop, stub, servicer = worker
    tok = servicer.loaded.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me about foxes."}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    pool = loop.run_until_complete(stub.Load(worker_pb2.LoadRequest())).total_kv_blocks * 16
    got = loop.run_until_complete(collect(stub, [
        wreq("a", ids, 8), wreq("b", ids, 5, stop_token_ids=[]),
        wreq("huge", [5] * (pool + 1), 4),  # larger than the whole KV pool
    ]))
    assert got["huge"][-1].finish_reason == inference_pb2.FINISH_REASON_ERROR
    assert got["huge"][-1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "KV cache" in got["huge"][-1].error_message
    a = got["a"]
    assert len(a) == 8 and a[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert a[-1].usage.completion_tokens == 8 and a[-1].usage.prompt_tokens == len(ids)
    text = "".join(ev.text for ev in a)
    assert text == tok.decode([t for ev in a for t in ev.token_ids], skip_special_tokens=True)
    assert [t for ev in got["b"] for t in ev.token_ids] == [t for ev in a for t in ev.token_ids][:5]
    assert max(ev.batch_size for ev in a) == 2
    # the same prompt again: its full blocks come from the prefix cache
    again = loop.run_until_complete(collect(stub, [wreq("c", ids, 2)]))
    assert again["c"][-1].usage.cached_tokens == (len(ids) - 1) // 16 * 16 > 0
    load = loop.run_until_complete(stub.Load(worker_pb2.LoadRequest()))
    assert load.free_kv_blocks == load.total_kv_blocks and load.prefix_cache_hit_rate > 0


def test_cancel_frees_blocks(worker):
    loop, stub, _ = worker

    async def scenario():
        stream = stub.Submit(worker_pb2.SubmitRequest(requests=[wreq("long", [7] * 40, 400, ignore_eos=True)]))
        events = []
        async for ev in stream:
            events.append(ev)
            if len(events) == 3:
                mid = await stub.Load(worker_pb2.LoadRequest())
                assert mid.running == 1 and mid.free_kv_blocks < mid.total_kv_blocks
                assert (await stub.Cancel(worker_pb2.CancelRequest(request_ids=["long", "unknown"]))).cancelled == 1
        return events

    events = loop.run_until_complete(scenario())
    assert events[-1].finish_reason == inference_pb2.FINISH_REASON_CANCELLED and len(events) < 400
    load = loop.run_until_complete(stub.Load(worker_pb2.LoadRequest()))
    assert load.running == 0 and load.free_kv_blocks == load.total_kv_blocks
