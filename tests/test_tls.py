"""TLS with a throwaway CA made here (openssl): both gateway fronts over TLS, mTLS between gateway and worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import chat_request, free_port

from services.common.pb import inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.tls import channel_credentials
from services.local import wait_serving

ROOT = Path(__file__).resolve().parents[1]


def make_pki(folder: Path) -> dict[str, str]:
    """A CA and one certificate for 127.0.0.1 that serves and authenticates as a client (EC P-256, 1 day)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=tokenmill test CA")
    run("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                    "extendedKeyUsage=serverAuth,clientAuth\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "node.pem", "-days", "1", "-extfile", "ext.cnf")
    return {"ca": str(folder / "ca.pem"), "cert": str(folder / "node.pem"), "key": str(folder / "node.key")}


@pytest.fixture(scope="module")
def tls(cluster, tmp_path_factory):
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    flags = ["--tls-cert", pki["cert"], "--tls-key", pki["key"], "--tls-ca", pki["ca"]]
    worker = cluster.start("worker", "--engine", "hf-static", *flags, wait=False)
    wait_serving([worker], 240, channel_credentials(pki["ca"], pki["cert"], pki["key"]))
    http_port = free_port()
    gw = cluster.gateway([worker], "--http-port", str(http_port), *flags, wait=False)
    wait_serving([gw], 240, channel_credentials(pki["ca"]))
    return {"pki": pki, "worker": worker.address, "grpc": gw.address, "https": f"https://127.0.0.1:{http_port}"}


def test_both_fronts_need_the_ca_and_work_with_it(tls):
    pki = tls["pki"]
    request = chat_request("Say hello.", max_tokens=4)
    for credentials in (None, grpc.ssl_channel_credentials()):  # plaintext; TLS trusting only the system's roots
        channel = grpc.secure_channel(tls["grpc"], credentials) if credentials else grpc.insecure_channel(tls["grpc"])
        with channel, pytest.raises(grpc.RpcError) as err:
            inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(tls["grpc"], channel_credentials(pki["ca"])) as channel:
        assert inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120).usage.completion_tokens > 0

    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    with pytest.raises(httpx.ConnectError):
        httpx.post(tls["https"] + "/v1/chat/completions", json=body, timeout=30)
    r = httpx.post(tls["https"] + "/v1/chat/completions", json=body, timeout=120, verify=pki["ca"])
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0

    command = [sys.executable, "-m", "services.cli", "generate", "--gateway", tls["grpc"], "--tls-ca", pki["ca"],
               "--max-tokens", "4", "--chat", "Say hello."]
    cli = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TOKENMILL_TLS_CA": ""})
    assert cli.returncode == 0 and cli.stdout.strip(), cli.stderr


def test_worker_refuses_a_client_without_a_certificate(tls):
    pki = tls["pki"]
    with grpc.secure_channel(tls["worker"], channel_credentials(pki["ca"])) as channel, \
            pytest.raises(grpc.RpcError) as err:
        worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(tls["worker"], channel_credentials(pki["ca"], pki["cert"], pki["key"])) as channel:
        assert worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=20).model == "smollm2-135m"
