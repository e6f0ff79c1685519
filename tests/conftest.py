"""Shared fixtures: real servers on 127.0.0.1 started as processes, real embedded model."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
