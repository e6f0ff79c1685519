"""`tokenmill judge report`: how well the calibrated rubric ranks and how well its probabilities are calibrated.

For the fit and the held-out half separately: the share of pairs in which each dimension (and `overall`,
and pairwise Compare) scores the better story higher, per defect kind; expected calibration error per
dimension over the labelled items; and a reliability diagram (PNG). Ties count half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.judge.calibrate import floor_pairs, item_key, labelled_rows
from services.judge.calibration import combine, expected_calibration_error, pair_probability, sigmoid
from services.judge.labelled import KINDS, SPLITS, Pair
from services.judge.rubrics import Rubric


def item_scores(rubric: Rubric, values: dict[str, dict[str, float]], floor: float | None = None
                ) -> dict[str, float]:
    """Calibrated score per dimension and the overall (calibration.combine), from one item's signal values;
    `floor` overrides the calibration's overall floor (0 = the plain mean)."""
    cal = rubric.calibration
    out = {d.name: sigmoid(cal.dimensions[d.name].logit(values[d.name])) for d in rubric.dimensions}
    out["overall"] = combine(list(out.values()), cal.overall_floor if floor is None else floor)
    return out


def _rate(wins: list[float]) -> float | None:
    return round(sum(wins) / len(wins), 4) if wins else None


NAMES = ("overall", "mean", "vs rival", "compare")  # rows after the dimensions


def evaluate(rubric: Rubric, pairs: list[Pair], signals: dict[str, Any]) -> dict[str, Any]:
    scores = {k: item_scores(rubric, v) for k, v in signals.items()}
    for k, v in signals.items():
        scores[k]["mean"] = item_scores(rubric, v, floor=0.0)["overall"]
    floor = rubric.calibration.overall_floor
    names = [d.name for d in rubric.dimensions] + list(NAMES)
    aimed = {k: [d.name for d in rubric.dimensions if k in d.defects] for k in KINDS}
    out: dict[str, Any] = {"aimed_at": aimed}
    for split in SPLITS:
        ps = [p for p in pairs if p.split == split]
        table: dict[str, dict[str, float | None]] = {n: {} for n in names}
        symmetry = 0.0
        rivals = {id(p): r for p, r in zip(ps, floor_pairs(rubric, rubric.calibration, ps, signals), strict=True)}
        for name in names:
            for kind in [*KINDS, "all"]:
                wins = []
                for p in ps:
                    if kind not in ("all", p.kind):
                        continue
                    a, b = scores[item_key(p.prompt, p.better)], scores[item_key(p.prompt, p.worse)]
                    if name == "compare":
                        ab = pair_probability(a["overall"], b["overall"])
                        ba = pair_probability(b["overall"], a["overall"])
                        symmetry = max(symmetry, abs(ab + ba - 1))
                        wins.append(float((ab + 1 - ba) / 2 > 0.5))
                    elif name == "vs rival":
                        _, good, _, rival = rivals[id(p)]
                        x, y = combine(good, floor), combine(rival, floor)
                        wins.append(1.0 if x > y else 0.5 if x == y else 0.0)
                    else:
                        wins.append(1.0 if a[name] > b[name] else 0.5 if a[name] == b[name] else 0.0)
                table[name][kind] = _rate(wins)
        ece = {}
        for dim in rubric.dimensions:
            rows, labels = labelled_rows(rubric, ps, signals, dim.name)
            probs = [sigmoid(rubric.calibration.dimensions[dim.name].logit(r)) for r in rows]
            value, bins = expected_calibration_error(probs, labels)
            ece[dim.name] = {"ece": round(value, 4), "bins": bins, "items": len(labels)}
        targeted = {k: table[aimed[k][0]][k] for k in KINDS if aimed[k]}
        out[split] = {"pairs": len(ps), "accuracy": table, "targeted": targeted, "ece": ece, "overall_floor": floor,
                      "compare_symmetry": round(symmetry, 6)}
    return out


def markdown(result: dict[str, Any], rubric: Rubric, timing: dict[str, Any], command: str) -> str:
    names = [d.name for d in rubric.dimensions] + list(NAMES)
    lines = [f"Made by: `{command}`", "",
             f"overall = the mean of the dimensions x score/{rubric.calibration.overall_floor:.2f} for each one under "
             "that floor (chosen on the fit half); `mean` = the plain mean; `vs rival` = overall of the better story "
             "against a rival as good on every dimension but the one(s) aimed at the defect, where it has the worse "
             "story's score", ""]
    for split in SPLITS:
        r = result[split]
        lines += [f"### {split} half ({r['pairs']} pairs): share of pairs where the better story scores higher", "",
                  "| signal | " + " | ".join(KINDS) + " | all |", "|---" * (len(KINDS) + 2) + "|"]
        for n in names:
            cells = [_cell(r["accuracy"][n][k], n in result["aimed_at"].get(k, [])) for k in [*KINDS, "all"]]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "Aimed dimension per kind: " + ", ".join(
            f"{k} ({result['aimed_at'][k][0]}) {v:.2f}" for k, v in r["targeted"].items()),
            "ECE per dimension: " + ", ".join(f"{k} {v['ece']:.3f} ({v['items']} items)" for k, v in r["ece"].items()),
            f"Compare, both orders: P(A>B) + P(B>A) - 1 at most {r['compare_symmetry']:.2g}", ""]
    t = timing
    lines.append(f"Signals of {t['items']} items in {t['seconds']:.0f} s batched: {t['items_per_s']:.2f} items/s "
                 f"({t['tokens_per_item']:.0f} tokens per item through the model)")
    return "\n".join(lines)


def _cell(value: float | None, aimed: bool) -> str:
    if value is None:
        return "–"
    return f"**{value:.2f}**" if aimed else f"{value:.2f}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = list(result["held-out"]["ece"])
    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 4), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
        for split, style in (("fit", "o--"), ("held-out", "s-")):
            bins = result[split]["ece"][dim]["bins"]
            ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], style,
                    label=f"{split} (ECE {result[split]['ece'][dim]['ece']:.2f})")
        ax.set(title=dim, xlabel="predicted P(good)", ylabel="observed share good", xlim=(0, 1), ylim=(-0.02, 1.02))
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("Reliability of the calibrated local judge (labelled set)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
