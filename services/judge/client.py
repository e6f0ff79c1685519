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
    lines.append(f"  ({res.backend} judge, rubric {res.rubric}, method {res.method})")
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


def compare(address: str, prompt: str, response_a: str, response_b: str, rubric: str = "", method: str = "",
            timeout: float = 300.0) -> Any:
    """One Compare call; returns the judge_pb2.CompareResponse (raises grpc.RpcError on a status)."""
    import grpc

    from services.common.pb import judge_pb2, judge_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = judge_pb2_grpc.JudgeStub(channel)
        return stub.Compare(judge_pb2.CompareRequest(prompt=prompt, response_a=response_a, response_b=response_b,
                                                     rubric=rubric, method=method), timeout=timeout,
                            wait_for_ready=True)


def format_verdict(res: Any) -> str:
    """One line per dimension: P(A better), the winner, and each order's verdict; then the overall."""
    width = max([len(d.name) for d in res.dimensions] + [len("overall")])
    lines = [f"  {'':<{width}}  P(A better)  winner  (A shown first / B shown first)"]
    lines += [f"  {d.name:<{width}}  {d.prob_a:11.3f}  {d.winner:<6}  ({d.prob_a_shown_first:.3f} / "
              f"{d.prob_a_shown_second:.3f})" for d in res.dimensions]
    lines.append(f"  {'overall':<{width}}  {res.prob_a:11.3f}  {res.winner:<6}  position bias {res.position_bias:+.3f}")
    lines.append(f"  ({res.backend} judge, rubric {res.rubric}, method {res.method})")
    return "\n".join(lines)


def compare_text(address: str, prompt: str, response_a: str, response_b: str, rubric: str = "",
                 method: str = "") -> str:
    import grpc

    try:
        return format_verdict(compare(address, prompt, response_a, response_b, rubric, method))
    except grpc.RpcError as exc:
        return f"  judge error: {exc.code().name}: {exc.details()}"
