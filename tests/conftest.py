"""Shared fixtures: real servers on 127.0.0.1 started as processes, real embedded model."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

import services as _services  # noqa: F401  (the OpenMP wait policy, set before torch loads libgomp)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Triton wraps its own @jit helpers (tl.sum, ...) when it is first imported, and importing torch._dynamo imports
# it (some tests' code paths do): the interpreter (the Triton tests' only backend here) must be on by then, else a
# Triton-path test after such an import fails ("Cannot call @triton.jit'd outside of the scope of a kernel"; seen:
# test_engine_behaviour.py then test_cuda_graphs.py). setdefault: TRITON_INTERPRET=0 keeps a GPU machine compiling.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Tests run several servers at once on 2 cores: one torch thread each beats two fighting over a core.
os.environ.setdefault("TOKENMILL_WORKER_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def chat_request(content: str, max_tokens: int = 12, **sampling):
    """A greedy chat GenerateRequest with one user message."""
    from services.common.pb import inference_pb2

    sampling.setdefault("temperature", 0.0)
    return inference_pb2.GenerateRequest(messages=[inference_pb2.ChatMessage(role="user", content=content)],
                                         sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, **sampling))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def loaded():
    """The embedded model (weights + tokenizer) in this process, once per test module."""
    from services.worker.engine.models.engine_model import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def served():
    """The embedded model as the worker serves it by default: tokenmill's forward over the GGUF's blocks."""
    from services.worker.engine.models.engine_model import load_engine_model

    return load_engine_model("smollm2-135m")


@pytest.fixture(scope="session")
def suite(tmp_path_factory):
    """One hf-static worker + gateway (+ HTTP front) for the whole session; yields their addresses."""
    from services.local import start_suite, stop_all

    ports = {"gateway": free_port(), "worker": free_port(), "http": free_port()}
    services = start_suite(workers=1, engine="hf-static", gateway_port=ports["gateway"], worker_port=ports["worker"],
                           http_port=ports["http"], judge=False, log_dir=tmp_path_factory.mktemp("suite-logs"))
    yield {"gateway": f"127.0.0.1:{ports['gateway']}", "worker": f"127.0.0.1:{ports['worker']}",
           "http": f"http://127.0.0.1:{ports['http']}", "services": services}
    stop_all(services)


@pytest.fixture(scope="session")
def inference(suite):
    import grpc

    from services.common.pb import inference_pb2_grpc

    channel = grpc.insecure_channel(suite["gateway"])
    yield inference_pb2_grpc.InferenceStub(channel)
    channel.close()


class Cluster:
    """Start tokenmill services as real processes on 127.0.0.1; stops them all at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.services: list = []

    def start(self, kind: str, *args: str, name: str | None = None, wait: bool = True):
        from services.local import launch, wait_serving

        port = free_port()
        name = name or f"{kind}-{port}"
        svc = launch(name, [kind, "--port", str(port), *args], f"127.0.0.1:{port}", self.log_dir)
        self.services.append(svc)
        if wait:
            wait_serving([svc], 240)
        return svc

    def gateway(self, workers: list, *args: str, wait: bool = True):
        addrs = ",".join(w.address if hasattr(w, "address") else w for w in workers)
        return self.start("gateway", "--workers", addrs, "--max-wait-ms", "5", *args, wait=wait)

    def stop(self) -> None:
        from services.local import stop_all

        stop_all(self.services)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()
