"""`tokenmill judge calibrate`: compute every signal on the labelled set, fit each dimension on the fit half.

Signals are computed for both halves in one batched run (they do not depend on labels) and cached in
`<out>/signals.json` with the throughput of that run, so `tokenmill judge report` grades the held-out half
without recomputing; the fit itself reads only the fit half.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from services.judge.calibration import Calibration, fit_dimension
from services.judge.labelled import Pair
from services.judge.rubrics import Rubric
from services.judge.types import ScoreItem

CACHE = "signals.json"


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


def labelled_rows(rubric: Rubric, pairs: list[Pair], signals: dict[str, Any], dim: str) -> tuple[list, list[int]]:
    """(signal values, label) per item for one dimension: a good story 1, a story with a defect the dimension
    is aimed at 0; the good story counts once per such defect so the two classes weigh the same."""
    defects = next(d.defects for d in rubric.dimensions if d.name == dim)
    rows, labels = [], []
    for p in pairs:
        if p.kind in defects:
            rows += [signals[item_key(p.prompt, p.better)][dim], signals[item_key(p.prompt, p.worse)][dim]]
            labels += [1, 0]
    return rows, labels


def fit(rubric: Rubric, pairs: list[Pair], signals: dict[str, Any], model: str, source: str) -> Calibration:
    cal = Calibration(rubric=rubric.name, model=model, source=source)
    for dim in rubric.dimensions:
        if not dim.defects:
            continue
        rows, labels = labelled_rows(rubric, [p for p in pairs if p.split == "fit"], signals, dim.name)
        cal.dimensions[dim.name] = fit_dimension([s.name for s in dim.signals], rows, labels)
        cal.counts[dim.name] = {"good": labels.count(1), "bad": labels.count(0)}
    return cal
