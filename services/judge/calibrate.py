"""`tokenmill judge calibrate`: compute every signal on the labelled set, fit each dimension on the fit half.

Signals are computed for both halves in one batched run (they do not depend on labels) and cached in
`<out>/signals.json` with the throughput of that run, so `tokenmill judge report` grades the held-out half
without recomputing; the fit itself, and the choice of its L2 strength (leave one prompt out), read only
the fit half.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from services.judge.calibration import Calibration, combine, fit_dimension, logit, sigmoid
from services.judge.labelled import Pair
from services.judge.rubrics import Rubric
from services.judge.types import ScoreItem

CACHE = "signals.json"
L2_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
FLOOR_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def item_key(prompt: str, response: str) -> str:
    return hashlib.sha1(f"{prompt}\x00{response}".encode()).hexdigest()[:16]


def rubric_digest(rubric: Rubric) -> str:
    """Changes when any signal definition changes (then cached signals are stale)."""
    spec = [(d.name, [repr(s) for s in d.signals]) for d in rubric.dimensions] + [rubric.pattern, rubric.defaults]
    return hashlib.sha1(repr(spec).encode()).hexdigest()[:16]


def compute_signals(scorer: Any, rubric: Rubric, pairs: list[Pair], batch: int = 32) -> dict[str, Any]:
    """Signals of every distinct (prompt, response) of the pairs; timing of the batched run included."""
    items = {item_key(p.prompt, t): (p.prompt, t) for p in pairs for t in (p.better, p.worse)}
    keys = list(items)
    out: dict[str, dict[str, dict[str, float]]] = {}
    t0, tokens = time.perf_counter(), 0
    for start in range(0, len(keys), batch):
        part = keys[start: start + batch]
        plans = [scorer.plan(ScoreItem(k, *items[k], rubric, "likelihood")) for k in part]
        results = scorer.lm.run([q for p in plans for q in p.queries])
        at = 0
        for key, plan in zip(part, plans, strict=True):
            n = len(plan.queries)
            out[key] = plan.features(results[at: at + n])
            out[key]["_fluency"] = {"fluency": float(results[at].span.mean())}
            tokens += sum(len(q.prefix) + sum(len(c.tokens) for c in q.conts) for q in plan.queries)
            at += n
        print(f"  signals: {min(start + batch, len(keys))}/{len(keys)} items", flush=True)
    seconds = time.perf_counter() - t0
    return {"rubric": rubric.name, "digest": rubric_digest(rubric), "items": out,
            "timing": {"items": len(keys), "seconds": round(seconds, 2), "tokens": tokens,
                       "items_per_s": round(len(keys) / seconds, 3), "tokens_per_item": round(tokens / len(keys), 1)}}


def load_cached(out: Path, rubric: Rubric, model: str) -> dict[str, Any] | None:
    path = out / CACHE
    if not path.exists():
        return None
    cached = json.loads(path.read_text())
    ok = cached.get("digest") == rubric_digest(rubric) and cached.get("model") == model
    return cached if ok else None


def labelled_rows(rubric: Rubric, pairs: list[Pair], signals: dict[str, Any], dim: str,
                  groups: list[str] | None = None) -> tuple[list, list[int]]:
    """(signal values, label) per item for one dimension: a good story 1, a story with a defect the dimension
    is aimed at 0; the good story counts once per such defect so the two classes weigh the same. `groups`,
    when given, receives each row's prompt."""
    defects = next(d.defects for d in rubric.dimensions if d.name == dim)
    rows, labels = [], []
    for p in pairs:
        if p.kind in defects:
            rows += [signals[item_key(p.prompt, p.better)][dim], signals[item_key(p.prompt, p.worse)][dim]]
            labels += [1, 0]
            if groups is not None:
                groups += [p.prompt, p.prompt]
    return rows, labels


def choose_l2(features: list[str], rows: list, labels: list[int], groups: list[str]) -> float:
    """The L2 strength with the least log-loss when each prompt of the fit half is left out in turn."""
    best, best_loss = L2_GRID[0], math.inf
    for l2 in L2_GRID:
        loss = 0.0
        for g in sorted(set(groups)):
            train = [i for i, x in enumerate(groups) if x != g]
            cal = fit_dimension(features, [rows[i] for i in train], [labels[i] for i in train], l2)
            for i in (i for i, x in enumerate(groups) if x == g):
                p = min(1 - 1e-6, max(1e-6, sigmoid(cal.logit(rows[i]))))
                loss -= math.log(p if labels[i] else 1 - p)
        if loss < best_loss:
            best, best_loss = l2, loss
    return best


def fit(rubric: Rubric, pairs: list[Pair], signals: dict[str, Any], model: str, source: str) -> Calibration:
    """Each aimed dimension's logistic regression on the fit half, its L2 strength by leave-one-prompt-out."""
    cal = Calibration(rubric=rubric.name, model=model, source=source)
    for dim in rubric.dimensions:
        if not dim.defects:
            continue
        groups: list[str] = []
        rows, labels = labelled_rows(rubric, [p for p in pairs if p.split == "fit"], signals, dim.name, groups)
        features = [s.name for s in dim.signals]
        l2 = choose_l2(features, rows, labels, groups)
        cal.dimensions[dim.name] = fit_dimension(features, rows, labels, l2)
        cal.counts[dim.name] = {"good": labels.count(1), "bad": labels.count(0)}
        cal.l2[dim.name] = l2
    if len(cal.dimensions) == len(rubric.dimensions):
        cal.overall_floor = choose_floor(rubric, cal, [p for p in pairs if p.split == "fit"], signals)
    return cal


def floor_pairs(rubric: Rubric, cal: Calibration, pairs: list[Pair], signals: dict[str, Any]
                ) -> list[tuple[str, list[float], list[float], list[float]]]:
    """Per pair: its kind, the better story's dimension scores, the worse one's, and a harder rival: a story as
    good as the better of the two on every dimension except the ones aimed at the pair's defect, where it has
    the worse story's score (the off-topic story with a clear moral that a mean lets win)."""
    names = [d.name for d in rubric.dimensions]
    aimed = {d.name: set(d.defects) for d in rubric.dimensions}
    out = []
    for p in pairs:
        a, b = ([sigmoid(cal.dimensions[n].logit(signals[item_key(p.prompt, t)][n])) for n in names]
                for t in (p.better, p.worse))
        rival = [y if p.kind in aimed[n] else max(x, y) for n, x, y in zip(names, a, b, strict=True)]
        out.append((p.kind, a, b, rival))
    return out


def choose_floor(rubric: Rubric, cal: Calibration, fit_pairs: list[Pair], signals: dict[str, Any]) -> float:
    """The overall floor (calibration.combine) that ranks the fit half's pairs best: most pairs right, then most
    pairs right against the harder rival (floor_pairs), then the least Bradley-Terry log-loss of the pairs."""
    rows = floor_pairs(rubric, cal, fit_pairs, signals)

    def key(floor: float) -> tuple[float, float, float]:
        right = rival = loss = 0.0
        for _, a, b, r in rows:
            oa, ob, orv = combine(a, floor), combine(b, floor), combine(r, floor)
            right += 1.0 if oa > ob else 0.5 if oa == ob else 0.0
            rival += 1.0 if oa > orv else 0.5 if oa == orv else 0.0
            loss -= math.log(max(1e-12, sigmoid(logit(oa) - logit(ob))))
        return (-right, -rival, loss)

    return min(FLOOR_GRID, key=key)
