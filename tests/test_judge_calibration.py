"""Judge calibration, labelled set and report, without a model: the numbers they work on are made here.

- a logistic fit recovers the direction of a signal, and a calibration saved beside a rubric file comes back
  from the rubric registry giving the same scores (the round trip `tokenmill judge calibrate` relies on);
- the committed calibration of the built-in rubric covers its dimensions with their signals, for the model
  the judge runs by default;
- the labelled set has >= 80 pairs over six defect kinds, split by prompt, the derived defects are what they
  say (a shuffle has the same sentences, a truncation ends mid-sentence);
- the report's pair accuracy, ECE and reliability plot on known scores.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.judge.calibrate import item_key
from services.judge.calibration import (
    Calibration,
    combine,
    expected_calibration_error,
    fit_dimension,
    path_for,
    sigmoid,
)
from services.judge.labelled import KINDS, load_pairs, load_stories
from services.judge.report import evaluate, plot
from services.judge.rubrics import BUILTIN_DIR, RubricRegistry
from services.judge.signals import sentences


def synthetic(n: int, seed: int) -> tuple[list[dict[str, float]], list[int]]:
    """Signal `a` separates good (1) from bad (0) with noise; `b` is noise."""
    rng = random.Random(seed)
    rows, labels = [], []
    for i in range(n):
        y = i % 2
        rows.append({"a": (1.5 if y else -1.5) + rng.gauss(0, 1), "b": rng.gauss(0, 1)})
        labels.append(y)
    return rows, labels


def test_fit_recovers_the_signal_direction():
    rows, labels = synthetic(200, 0)
    cal = fit_dimension(["a", "b"], rows, labels)
    assert cal.weights[0] > 1.0 and abs(cal.weights[1]) < 0.5 * cal.weights[0]
    probs = [sigmoid(cal.logit(r)) for r in rows]
    assert np.mean([(p > 0.5) == bool(y) for p, y in zip(probs, labels, strict=True)]) > 0.85
    ece, bins = expected_calibration_error(probs, labels)
    assert ece < 0.1 and sum(b["count"] for b in bins) == len(rows)


def test_calibration_round_trip_beside_a_rubric(tmp_path):
    shutil.copy(BUILTIN_DIR / "children-story.yaml", tmp_path / "children-story.yaml")
    rubric = RubricRegistry([tmp_path]).get("children-story")
    rows, labels = synthetic(60, 1)
    cal = Calibration(rubric="children-story", model="test-model", source="synthetic")
    for dim in rubric.dimensions:
        feats = [s.name for s in dim.signals]
        cal.dimensions[dim.name] = fit_dimension(feats, [{f: r["a"] + k for k, f in enumerate(feats)} for r in rows],
                                                 labels)
    cal.save(path_for(tmp_path / "children-story.yaml"))
    loaded = RubricRegistry([tmp_path]).get("children-story").calibration
    assert loaded is not None and loaded.model == "test-model"
    for dim in rubric.dimensions:
        values = {s.name: 0.3 for s in dim.signals}
        assert loaded.dimensions[dim.name].logit(values) == pytest.approx(cal.dimensions[dim.name].logit(values))

    (tmp_path / "children-story.calibration.json").write_text(
        (tmp_path / "children-story.calibration.json").read_text().replace('"relevance"', '"no_such_dimension"'))
    with pytest.raises(ValueError, match="no_such_dimension"):
        RubricRegistry([tmp_path])


def test_committed_calibration_matches_the_rubric():
    rubric = RubricRegistry().get("children-story")
    assert rubric.method == "likelihood" and rubric.calibration is not None
    assert rubric.calibration.model == "smollm2-135m"
    for dim in rubric.dimensions:
        assert rubric.calibration.dimensions[dim.name].features == [s.name for s in dim.signals]
        assert dim.defects and set(dim.defects) <= set(KINDS)
    assert RubricRegistry().get("helpfulness").method == "geval"  # no signals: G-Eval


def test_labelled_set():
    stories, pairs = load_stories(), load_pairs()
    assert len(pairs) >= 80 and {p.kind for p in pairs} == set(KINDS)
    for split in ("fit", "held-out"):
        assert {p.kind for p in pairs if p.split == split} == set(KINDS)
    fit_prompts = {p.prompt for p in pairs if p.split == "fit"}
    assert not fit_prompts & {p.prompt for p in pairs if p.split == "held-out"}
    assert len({s["prompt"] for s in stories}) == len(stories)
    for p in pairs:
        assert p.better != p.worse
        if p.kind == "shuffled":
            assert sorted(sentences(p.worse)) == sorted(sentences(p.better))
        if p.kind == "truncated":
            assert p.better.startswith(p.worse) and p.worse[-1] not in ".!?\"'"
        if p.kind == "off_topic":
            assert p.worse in {s["good"] for s in stories if s["prompt"] != p.prompt}


def test_report_on_known_scores(tmp_path):
    rubric = RubricRegistry().get("children-story")
    pairs = load_pairs()
    rng = random.Random(2)
    signals = {}
    for p in pairs:  # each dimension's signals: high for good stories, low for the defects it is aimed at
        for text, good in ((p.better, True), (p.worse, False)):
            signals[item_key(p.prompt, text)] = {
                d.name: {s.name: rng.gauss(2.0 if good or p.kind not in d.defects else -2.0, 0.5) for s in d.signals}
                for d in rubric.dimensions}
    result = evaluate(rubric, pairs, signals)
    held = result["held-out"]
    assert held["pairs"] == len([p for p in pairs if p.split == "held-out"])
    assert set(held["targeted"]) == set(KINDS) and all(v is not None for v in held["targeted"].values())
    assert held["compare_symmetry"] < 1e-9
    assert held["accuracy"]["compare"]["all"] == held["accuracy"]["overall"]["all"]
    plot(result, tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_judge_cli_serves_by_default():
    """`tokenmill judge [flags]` still serves (the k8s manifests run it so); the subcommands are listed."""
    def helped(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "services.cli", "judge", *args, "--help"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    group = helped()
    assert all(c in group for c in ("serve", "calibrate", "report", "compare"))
    assert "--max-batch-items" in helped("--threads", "1")  # = judge serve --threads 1


def test_overall_respects_a_failed_dimension():
    """Issue 27: an off-topic story with a clear moral must not outscore a plain on-topic one. The mean lets it;
    the floor does not, and a story with no dimension under the floor keeps its mean."""
    on_topic, off_topic = [0.7, 0.7, 0.7, 0.7], [0.95, 0.95, 0.95, 0.1]
    assert combine(off_topic, 0.0) > combine(on_topic, 0.0)  # the old overall: the mean
    assert combine(off_topic, 0.4) < combine(on_topic, 0.4)
    assert combine(on_topic, 0.4) == pytest.approx(0.7)
    assert combine(off_topic, 0.4) == pytest.approx(0.7375 * 0.1 / 0.4)
    assert combine([], 0.4) == 0.0


def test_committed_floor_on_the_labelled_signals():
    """The committed calibration's floor, graded on the committed signals of the labelled set (no model run):
    the held-out half's per-kind accuracy docs/judge.md reports."""
    import json

    rubric = RubricRegistry().get("children-story")
    assert rubric.calibration.overall_floor == 0.4
    signals = json.loads((Path(__file__).resolve().parents[1] / "docs/judge-report/signals.json").read_text())
    held = evaluate(rubric, load_pairs(), signals["items"])["held-out"]["accuracy"]
    assert held["overall"] == {"off_topic": 1.0, "shuffled": 1.0, "opposite_moral": 1.0, "violent": 0.9,
                               "truncated": 1.0, "repetitive": 1.0, "all": 0.9833}
    assert held["mean"]["all"] == 1.0 and held["vs rival"]["all"] == 0.9833
