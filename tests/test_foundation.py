"""Foundation: stubs, config, a real request through gateway -> worker over gRPC, health, bad input."""

from __future__ import annotations

import subprocess
import sys
import time

import conftest
import grpc
import pytest
from conftest import ROOT, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import GatewayConfig, WorkerConfig, env_name, from_env
from services.common.pb import inference_pb2, worker_pb2, worker_pb2_grpc

STORY = "Write a single paragraph moral story for children about a brave owl who learns the value of patience."


def chat_request(content: str = STORY, max_tokens: int = 24, **sampling) -> inference_pb2.GenerateRequest:
    return conftest.chat_request(content, max_tokens, **sampling)


def test_generated_stubs_are_fresh(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_proto import DEFAULT_OUT, generate

    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    committed = {p.name: p.read_text() for p in DEFAULT_OUT.iterdir() if p.is_file()}
    assert fresh.keys() == committed.keys(), "stub files differ: run python scripts/gen_proto.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated stubs {stale}: run python scripts/gen_proto.py and commit"


def test_config_precedence():
    env = {env_name("gateway", "max_batch_size"): "7", env_name("gateway", "max_wait_ms"): "3.5"}
    cfg = from_env(GatewayConfig, "gateway", env, max_wait_ms=9.0)
    assert cfg.max_batch_size == 7 and cfg.max_wait_ms == 9.0
    assert from_env(WorkerConfig, "worker", {env_name("worker", "prefix_cache"): "false"}).prefix_cache is False
    assert from_env(WorkerConfig, "worker", {}).model == "smollm2-135m"


def test_cli_help_everywhere():
    for cmd in ([], ["worker"], ["gateway"], ["judge"], ["up"], ["generate"], ["config"]):
        out = subprocess.run([sys.executable, "-m", "services.cli", *cmd, "--help"], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
        assert out.returncode == 0, (cmd, out.stderr)
        assert "Usage" in out.stdout


def test_generate_round_trip(inference):
    resp = inference.Generate(chat_request(), timeout=120)
    assert resp.text.strip()
    assert resp.finish_reason in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)
    assert resp.usage.completion_tokens == len(resp.token_ids) > 0
    assert resp.usage.prompt_tokens > 20
    assert resp.timing.worker and resp.timing.total_ms > 0 and resp.timing.batch_size >= 1
    assert resp.model == "smollm2-135m"


def test_stream_concatenates_to_unary(inference):
    unary = inference.Generate(chat_request(max_tokens=32), timeout=120)
    chunks = list(inference.GenerateStream(chat_request(max_tokens=32), timeout=120))
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == unary.finish_reason
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert chunks[-1].timing.ttft_ms > 0


def test_list_models(inference):
    models = inference.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models
    assert [m.id for m in models] == ["smollm2-135m"] and models[0].context_length == 8192


@pytest.mark.parametrize("request_, fragment", [
    (inference_pb2.GenerateRequest(prompt=""), "prompt is empty"),
    (chat_request(max_tokens=0), "max_tokens must be at least 1"),
    (chat_request(max_tokens=-5), "max_tokens must be at least 1"),
    (chat_request(max_tokens=9000), "exceeds the model's context"),
    (chat_request(temperature=-0.5), "temperature must be >= 0"),
    (inference_pb2.GenerateRequest(model="gpt-17", prompt="hi"), "unknown model 'gpt-17'"),
])
def test_bad_input_is_invalid_argument(inference, request_, fragment):
    with pytest.raises(grpc.RpcError) as err:
        inference.Generate(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()


def test_health_turns_serving_only_after_model_loaded(tmp_path):
    """The server answers health at once with NOT_SERVING, refuses work, and turns SERVING once loaded."""
    port = free_port()
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "worker", "--port", str(port), "--engine",
                             "hf-static"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seen: list[int] = []
    refused_while_loading = None
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        worker = worker_pb2_grpc.WorkerStub(channel)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                time.sleep(0.05)
                continue
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == health_pb2.HealthCheckResponse.NOT_SERVING and refused_while_loading is None:
                with pytest.raises(grpc.RpcError) as err:
                    worker.Info(worker_pb2.InfoRequest(), timeout=5)
                refused_while_loading = err.value.code()
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.05)
        assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
        assert refused_while_loading == grpc.StatusCode.UNAVAILABLE
        info = worker.Info(worker_pb2.InfoRequest(), timeout=5)
        assert info.engine == "hf-static" and info.context_length == 8192
        channel.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()[-2000:]
