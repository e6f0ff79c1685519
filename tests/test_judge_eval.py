"""`tokenmill eval` end to end: a real worker + gateway (the shared `suite`), a real judge, the real CLI.

Two held-out prompts go through the gateway's public gRPC API, the judge scores both, eval_results.json
and the summary table come out; an unreachable gateway is a clear message and exit code 2, not a hang.
The OpenAI-compatible judge backend is also pointed at the same gateway's HTTP endpoint (/v1/chat/completions),
whose hf-static worker cannot give it the structured output it asks for: a clear refusal.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from judge_support import ROOT, JudgeProcess, free_port

from services.common.pb import judge_pb2, judge_pb2_grpc
from services.judge.calibration import combine
from services.judge.eval import DEFAULT_DATA, load_eval_set
from services.judge.rubrics import RubricRegistry

DIMS = ["moral_clarity", "age_appropriateness", "narrative_coherence", "relevance"]


@pytest.fixture(scope="module")
def judge_address(tmp_path_factory):
    server = JudgeProcess(tmp_path_factory.mktemp("judge-eval"), "--threads", "1", "--device", "cpu")
    yield server.address
    server.stop()


def run_eval(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "eval", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_eval_set_shape(tmp_path):
    rows = load_eval_set()
    assert len(rows) == 30 and len({r["id"] for r in rows}) == 30
    template = ("Write a single paragraph moral story for children about a {character} who learns the value of "
                "{moral} in a {setting}.")
    for r in rows:
        assert r["prompt"] == template.format(**r)
        assert "\n" not in r["reference"] and 80 <= len(r["reference"].split()) <= 130
    assert len({r["character"] for r in rows}) == 30 and len({r["moral"] for r in rows}) == 30
    assert load_eval_set(DEFAULT_DATA, limit=3) == rows[:3]
    lines = tmp_path / "mine.jsonl"  # --data may also be JSON Lines
    lines.write_text("\n".join(json.dumps({"prompt": r["prompt"]}) for r in rows[:2]) + "\n")
    assert [r["id"] for r in load_eval_set(lines)] == ["item-01", "item-02"]


def test_eval_end_to_end(suite, judge_address, tmp_path):
    out = tmp_path / "eval"
    proc = run_eval("--gateway", suite["gateway"], "--judge", judge_address, "--out", str(out), "--limit", "2",
                    "--max-tokens", "16", "--references")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1/2]" in proc.stderr and "[2/2]" in proc.stderr  # progress while it runs
    for word in [*DIMS, "overall", "fluency", "2/2 items scored, 0 errors"]:
        assert word in proc.stdout, proc.stdout
    report = json.loads((out / "eval_results.json").read_text())
    rows = load_eval_set(limit=2)
    assert [it["prompt"] for it in report["items"]] == [r["prompt"] for r in rows]
    for item in report["items"]:
        assert item["response"].strip() and 0 < item["completion_tokens"] <= 16
        assert list(item["scores"]) == DIMS and all(0 <= v <= 1 for v in item["scores"].values())
        floor = RubricRegistry().get("children-story").calibration.overall_floor
        assert item["overall"] == pytest.approx(combine(list(item["scores"].values()), floor), abs=1e-3)
        assert item["fluency"] < 0 and item["judge_backend"] == "local"
        assert 0 <= item["reference_judge"]["overall"] <= 1
    summary = report["summary"]
    assert summary["scored"] == 2 and summary["errors"] == 0
    assert set(summary["metrics"]) >= {*DIMS, "overall", "fluency", "reference_overall"}
    print("\n" + proc.stdout)


def test_eval_unreachable_gateway_fails_fast(judge_address, tmp_path):
    proc = run_eval("--gateway", f"127.0.0.1:{free_port()}", "--judge", judge_address, "--out", str(tmp_path),
                    "--limit", "1", "--connect-timeout", "2", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot reach the gateway" in proc.stderr


@pytest.fixture(scope="module")
def gateway_judge(suite, tmp_path_factory):
    """A judge whose OpenAI-compatible backend is tokenmill's own gateway HTTP endpoint (model from /v1/models)."""
    server = JudgeProcess(tmp_path_factory.mktemp("judge-gw"), "--judge-backend", "openai",
                          "--judge-url", suite["http"] + "/v1", "--judge-max-tokens", "24")
    channel = grpc.insecure_channel(server.address)
    yield judge_pb2_grpc.JudgeStub(channel)
    channel.close()
    server.stop()


def test_openai_backend_against_a_gateway_that_cannot_constrain(gateway_judge):
    """The judge asks for its JSON with response_format; this suite's worker is hf-static, which has no
    structured output, so the gateway answers 400 and the judge passes it on as FAILED_PRECONDITION quoting
    the reason (through a paged worker the same judge scores: test_structured)."""
    row = load_eval_set(limit=1)[0]
    with pytest.raises(grpc.RpcError) as info:
        gateway_judge.Score(judge_pb2.ScoreRequest(prompt=row["prompt"], response=row["reference"]), timeout=300)
    print(f"\nhf-static behind the gateway: {info.value.code().name}: {info.value.details()}")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "HTTP 400" in info.value.details() and "structured output needs the paged engine" in info.value.details()
