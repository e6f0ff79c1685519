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


@dataclass(slots=True)
class DimScore:
    name: str
    score: float  # in [0, 1]
    rationale: str = ""


@dataclass(slots=True)
class ItemScore:
    id: str
    scores: list[DimScore]
    rubric: str
    backend: str
    rationale: str = ""
    fluency: float | None = None  # mean token log-likelihood of the response (nats/token); None = not measured
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def overall(self) -> float:
        return sum(s.score for s in self.scores) / len(self.scores) if self.scores else 0.0


class BackendError(Exception):
    """The backend could not produce scores; `code` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
