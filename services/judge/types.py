"""What a backend is given and what it returns; plain data, no torch, no gRPC."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.judge.rubrics import Rubric


@dataclass(slots=True)
class ScoreItem:
    id: str
    prompt: str
    response: str
    rubric: Rubric
    method: str = "geval"  # resolved: likelihood | geval


@dataclass(slots=True)
class CompareItem:
    """Two responses to one prompt, in the order the judge is shown them (`first`, `second`)."""

    id: str
    prompt: str
    first: str
    second: str
    rubric: Rubric
    method: str = "geval"

    def swapped(self) -> CompareItem:
        return CompareItem(self.id, self.prompt, self.second, self.first, self.rubric, self.method)


@dataclass(slots=True)
class DimScore:
    name: str
    score: float  # in [0, 1]
    rationale: str = ""
    signal: float | None = None  # likelihood method: the calibrated logit the score comes from


@dataclass(slots=True)
class ItemScore:
    id: str
    scores: list[DimScore]
    rubric: str
    backend: str
    rationale: str = ""
    fluency: float | None = None  # mean token log-likelihood of the response (nats/token); None = not measured
    extra: dict[str, float] = field(default_factory=dict)
    floor: float = 0.0  # the rubric calibration's overall floor (calibration.combine); 0 = the plain mean

    @property
    def overall(self) -> float:
        from services.judge.calibration import combine

        return combine([s.score for s in self.scores], self.floor)


@dataclass(slots=True)
class DimVerdict:
    name: str
    prob_first: float  # P(the response shown first is the better one on this dimension)
    rationale: str = ""


@dataclass(slots=True)
class PairVerdict:
    """One order's verdict: per dimension and overall, the probability that `first` is better."""

    dims: list[DimVerdict]
    overall: float
    backend: str
    rationale: str = ""


class BackendError(Exception):
    """The backend could not produce scores; `code` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
