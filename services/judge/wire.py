"""Between the wire (judge_pb2) and the judge's plain types; and the two-order combination of Compare."""

from __future__ import annotations

from typing import Any

from services.common.pb import judge_pb2
from services.judge.rubrics import DEFAULT_SCALE, Dimension, Rubric
from services.judge.types import ItemScore, PairVerdict

TIE_MARGIN = 0.05  # |P(A better) - 0.5| below this is a tie


def dimensions_from_proto(dims: Any) -> list[Dimension]:
    out = []
    for d in dims:
        lo, hi = (d.scale_min, d.scale_max) if (d.scale_min or d.scale_max) else DEFAULT_SCALE
        out.append(Dimension(name=d.name, description=d.description or d.name, scale_min=lo, scale_max=hi))
    return out


def rubric_to_proto(r: Rubric) -> judge_pb2.Rubric:
    return judge_pb2.Rubric(name=r.name, dimensions=[
        judge_pb2.Dimension(name=d.name, description=d.description, scale_min=d.scale_min, scale_max=d.scale_max)
        for d in r.dimensions])


def result_to_proto(res: ItemScore, method: str) -> judge_pb2.ScoreResponse:
    pb = judge_pb2.ScoreResponse(
        id=res.id, overall=round(res.overall, 6), rationale=res.rationale, backend=res.backend, rubric=res.rubric,
        method=method, scores=[judge_pb2.DimensionScore(name=s.name, score=s.score, rationale=s.rationale,
                                                        signal=s.signal) for s in res.scores])
    if res.fluency is not None:
        pb.fluency = res.fluency
    return pb


def winner(prob_a: float) -> str:
    return "tie" if abs(prob_a - 0.5) < TIE_MARGIN else "a" if prob_a > 0.5 else "b"


def combine_orders(a_first: PairVerdict, b_first: PairVerdict, req: judge_pb2.CompareRequest, rubric: str,
                   method: str) -> judge_pb2.CompareResponse:
    """Average the verdict with A shown first and the one with B shown first (turned into P(A better))."""
    dims = []
    for x, y in zip(a_first.dims, b_first.dims, strict=True):
        first, second = x.prob_first, 1.0 - y.prob_first
        prob = round((first + second) / 2, 6)
        why = "; ".join(r for r in (f"A first: {x.rationale}" if x.rationale else "",
                                    f"B first: {y.rationale}" if y.rationale else "") if r)
        dims.append(judge_pb2.DimensionVerdict(name=x.name, prob_a=prob, winner=winner(prob), rationale=why,
                                               prob_a_shown_first=round(first, 6),
                                               prob_a_shown_second=round(second, 6)))
    first, second = a_first.overall, 1.0 - b_first.overall
    prob = round((first + second) / 2, 6)
    why = " | ".join(r for r in (a_first.rationale, b_first.rationale) if r)
    return judge_pb2.CompareResponse(id=req.id, dimensions=dims, prob_a=prob, winner=winner(prob),
                                     position_bias=round(first - second, 6), backend=a_first.backend, rubric=rubric,
                                     method=method, rationale=why)
