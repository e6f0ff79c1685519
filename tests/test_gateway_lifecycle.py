"""A draining worker stops getting requests at once; with none left, UNAVAILABLE at once and ListModels still
names the model (workers: 0); the metrics port listens on --host only."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import grpc
import httpx
import pytest
from conftest import chat_request, free_port

from services.common.metrics import sample_sum
from services.common.pb import inference_pb2, inference_pb2_grpc


def retries(metrics_url: str) -> float:
    return sample_sum(httpx.get(metrics_url, timeout=10).text, "tokenmill:gateway_retries_total")


def listens(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


def test_drained_worker_gets_nothing_new_and_no_worker_is_unavailable_at_once(cluster):
    # hf-static workers start in seconds; a draining one stays up (NOT_SERVING) while its request runs
    workers = [cluster.start("worker", "--engine", "hf-static") for _ in range(2)]
    metrics_port, http_port = free_port(), free_port()
    gw = cluster.gateway(workers, "--metrics-port", str(metrics_port), "--http-port", str(http_port))
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    assert listens("127.0.0.1", metrics_port) and not listens("127.0.0.2", metrics_port)  # bound to --host only

    with grpc.insecure_channel(gw.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        pinned = chat_request("Hello there.", max_tokens=2)
        pinned.session_id = "conversation-1"  # its requests follow one worker while that one is a candidate
        first = stub.Generate(pinned, timeout=120).timing.worker
        draining = next(w for w in workers if w.address == first)
        other = next(w for w in workers if w is not draining)

        long = chat_request("Tell me a very long story.", max_tokens=150, ignore_eos=True)
        long.session_id = "conversation-1"
        streaming = threading.Event()
        held = threading.Thread(target=lambda: list(_quietly(stub, long, streaming)), daemon=True)
        held.start()
        assert streaming.wait(120)  # the long request streams from the pinned worker now
        before = retries(metrics_url)
        os.kill(draining.proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        served = [stub.Generate(pinned, timeout=120).timing.worker for _ in range(3)]
        assert served == [other.address] * 3, served
        assert retries(metrics_url) == before  # not sent there and retried: never sent there at all

        os.kill(other.proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(chat_request("Anyone?", max_tokens=2), timeout=3)  # the old grace was 5 s
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models
        assert [(m.id, m.workers) for m in models] == [("smollm2-135m", 0)]
    listed = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["workers"]) for m in listed] == [("smollm2-135m", 0)]


def _quietly(stub, request, streaming: threading.Event):
    try:
        for response in stub.GenerateStream(request, timeout=300):
            streaming.set()
            yield response
    except grpc.RpcError:
        return
