"""Small synchronous client helpers for the Judge service (the CLI demo and scripts use them)."""

from __future__ import annotations

from typing import Any


def score(address: str, prompt: str, response: str, rubric: str = "", timeout: float = 300.0) -> Any:
    """One Score call; returns the judge_pb2.ScoreResponse (raises grpc.RpcError on a status)."""
    import grpc

    from services.common.pb import judge_pb2, judge_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = judge_pb2_grpc.JudgeStub(channel)
        return stub.Score(judge_pb2.ScoreRequest(prompt=prompt, response=response, rubric=rubric),
                          timeout=timeout, wait_for_ready=True)


def format_scores(res: Any) -> str:
    """A few aligned lines: one per dimension, the overall mean, fluency when measured."""
    width = max([len(s.name) for s in res.scores] + [len("overall")])
    lines = [f"  {s.name:<{width}}  {s.score:.3f}" for s in res.scores]
    lines.append(f"  {'overall':<{width}}  {res.overall:.3f}")
    if res.HasField("fluency"):
        lines.append(f"  {'fluency':<{width}}  {res.fluency:.3f} nats/token")
    lines.append(f"  ({res.backend} judge, rubric {res.rubric})")
    if res.rationale:
        lines.append(f"  rationale: {res.rationale}")
    return "\n".join(lines)


def score_text(address: str, prompt: str, response: str, rubric: str = "") -> str:
    """Score one response and format the result; a judge error becomes a one-line message, not a traceback."""
    import grpc

    try:
        return format_scores(score(address, prompt, response, rubric))
    except grpc.RpcError as exc:
        return f"  judge error: {exc.code().name}: {exc.details()}"
