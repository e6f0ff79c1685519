"""Calibration: a dimension's signals -> P(the response is good on this dimension), by logistic regression.

Fitted by `tokenmill judge calibrate` on the fit half of the labelled set (good stories = 1, stories with
a defect the dimension is aimed at = 0, equal numbers of each per prompt kind), stored as JSON beside the
rubric file (`children-story.yaml` -> `children-story.calibration.json`), so 0.5 means "as likely good as
bad" for the judge model it was fitted with. Features are standardised with the fit half's mean and
spread; an L2 penalty keeps the weights finite when the fit half separates perfectly (its strength chosen
by leave-one-prompt-out log-loss on the fit half).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SUFFIX = ".calibration.json"


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def logit(p: float, eps: float = 1e-6) -> float:
    p = min(1 - eps, max(eps, p))
    return math.log(p / (1 - p))


def pair_probability(a: float, b: float) -> float:
    """P(a better than b) from two calibrated probabilities: Bradley-Terry on their logits."""
    return sigmoid(logit(a) - logit(b))


@dataclass(slots=True)
class DimCalibration:
    features: list[str]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float

    def logit(self, values: dict[str, float]) -> float:
        z = [(values[f] - m) / s for f, m, s in zip(self.features, self.mean, self.scale, strict=True)]
        return self.bias + sum(w * v for w, v in zip(self.weights, z, strict=True))


@dataclass(slots=True)
class Calibration:
    rubric: str
    model: str
    source: str
    dimensions: dict[str, DimCalibration] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per dimension: good / bad items fitted
    l2: dict[str, float] = field(default_factory=dict)  # per dimension: the L2 strength chosen
    # `overall`: the mean of the dimensions, scaled by score/floor for each dimension below the floor
    # (combine()); chosen on the fit half (calibrate.choose_floor). 0 = the plain mean.
    overall_floor: float = 0.0

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        raw = json.loads(path.read_text(encoding="utf-8"))
        dims = {k: DimCalibration(**v) for k, v in raw.pop("dimensions").items()}
        return cls(dimensions=dims, **raw)


def combine(scores: list[float], floor: float = 0.0) -> float:
    """The overall score of one response from its dimensions' P(good): their mean, multiplied by score/floor for
    every dimension under `floor`. A response that fails one dimension (an off-topic story with a clear moral)
    cannot outscore one that passes them all by excelling at the others: relevance 0.1 under a floor of 0.4
    takes a quarter of the mean. floor 0 is the plain mean."""
    if not scores:
        return 0.0
    out = sum(scores) / len(scores)
    if floor > 0:
        for x in scores:
            if x < floor:
                out *= max(x, 0.0) / floor
    return out


def path_for(rubric_file: Path) -> Path:
    return rubric_file.with_name(rubric_file.stem + SUFFIX)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> tuple[np.ndarray, float]:
    """Weights and bias of P(y=1) = sigmoid(b + x.w), by Newton's method with an L2 penalty on w."""
    n, d = x.shape
    a = np.hstack([np.ones((n, 1)), x])
    theta = np.zeros(d + 1)
    penalty = np.diag([0.0] + [l2] * d)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = a.T @ (p - y) + penalty @ theta
        hess = a.T @ (a * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta[1:], float(theta[0])


def fit_dimension(features: list[str], rows: list[dict[str, float]], labels: list[int],
                  l2: float = 1.0) -> DimCalibration:
    x = np.array([[r[f] for f in features] for r in rows], dtype=float)
    y = np.array(labels, dtype=float)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    w, b = fit_logistic((x - mean) / scale, y, l2)
    return DimCalibration(features, [round(float(v), 6) for v in mean], [round(float(v), 6) for v in scale],
                          [round(float(v), 6) for v in w], round(b, 6))


def expected_calibration_error(probs: list[float], labels: list[int], bins: int = 10) -> tuple[float, list[dict]]:
    """ECE over equal-width bins, and the bins (count, mean predicted, observed rate) for a reliability plot."""
    p, y = np.asarray(probs, dtype=float), np.asarray(labels, dtype=float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            conf, acc = float(p[sel].mean()), float(y[sel].mean())
            ece += sel.sum() / len(p) * abs(conf - acc)
            table.append({"bin": b, "count": int(sel.sum()), "predicted": conf, "observed": acc})
    return float(ece), table
