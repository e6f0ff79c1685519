"""`tokenmill judge ...`: serve (the default when no subcommand is named), calibrate, report, compare."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from services.common.config import JudgeConfig, typer_command
from services.judge.labelled import DATA
from services.judge.rubrics import DEFAULT_RUBRIC


class ServeByDefault(TyperGroup):
    """`tokenmill judge --port 1` means `tokenmill judge serve --port 1` (the k8s manifests run `judge`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args != ["--help"] and args != ["-h"] and (not args or args[0] not in self.commands):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=ServeByDefault, help="The judge: serve it (default), calibrate it, report on it, compare "
                  "two responses.", context_settings={"help_option_names": ["-h", "--help"]})


def _serve(config: JudgeConfig) -> None:
    from services.judge.server import run

    run(config)


app.command("serve", help="Run the judge service (what `tokenmill judge` with no subcommand does).")(
    typer_command(JudgeConfig, "judge", _serve))

RUBRIC = typer.Option(DEFAULT_RUBRIC, help="Rubric to calibrate (built-in name, or a rubric file path).")
DATA_OPT = typer.Option(DATA, help="Labelled set (services/judge/data/labelled_stories.yaml layout).")
MODEL = typer.Option("smollm2-135m", help="Judge model: what `tokenmill judge --model` will run.")
OUT = typer.Option(Path("results/judge"), help="Folder for signals.json, report.md/json, reliability.png.")
THREADS = typer.Option(0, help="torch threads; 0 = torch's default.")


def _rubric(rubric: str) -> Any:
    from services.judge.rubrics import RubricRegistry, load_rubric_file

    if rubric.endswith((".yaml", ".yml", ".json")):
        return load_rubric_file(Path(rubric))
    return RubricRegistry().get(rubric)


def _scorer(model: str, threads: int) -> Any:
    import torch

    from services.judge.scorer import LocalScorer
    from services.worker.engine.models.engine_model import load_model

    if threads:
        torch.set_num_threads(threads)
    return LocalScorer(load_model(model))


def _signals(rubric: Any, pairs: list, model: str, threads: int, out: Path, reuse: bool) -> dict[str, Any]:
    """The labelled set's signals: from <out>/signals.json when reusable, else computed (loading the model)."""
    from services.judge.calibrate import CACHE, compute_signals, load_cached

    cached = load_cached(out, rubric, model) if reuse else None
    if cached:
        print(f"reusing signals from {out / CACHE}")
        return cached
    scorer = _scorer(model, threads)
    print(f"computing signals of rubric {rubric.name} on {len(pairs)} pairs with {model} ...")
    result = {"model": model, **compute_signals(scorer, rubric, pairs)}
    out.mkdir(parents=True, exist_ok=True)
    (out / CACHE).write_text(json.dumps(result) + "\n")
    return result


@app.command("calibrate")
def calibrate(rubric: str = RUBRIC, data: Path = DATA_OPT, model: str = MODEL, out: Path = OUT,
              threads: int = THREADS, reuse: bool = typer.Option(False, help="Reuse <out>/signals.json if it "
                                                                              "matches the rubric and model.")) -> None:
    """Fit each dimension's calibration on the labelled set's fit half; write it beside the rubric file."""
    from services.judge.calibrate import fit
    from services.judge.calibration import path_for
    from services.judge.labelled import load_pairs

    r = _rubric(rubric)
    pairs = load_pairs(data)
    signals = _signals(r, pairs, model, threads, out, reuse)
    cal = fit(r, pairs, signals["items"], model, f"{data.name} (fit half)")
    target = path_for(r.path)
    cal.save(target)
    for name, dc in cal.dimensions.items():
        weights = ", ".join(f"{f} {w:+.2f}" for f, w in zip(dc.features, dc.weights, strict=True))
        print(f"  {name}: {weights}, bias {dc.bias:+.2f}, L2 {cal.l2[name]} ({cal.counts[name]['good']} good / "
              f"{cal.counts[name]['bad']} bad items)")
    print(f"wrote {target}")


@app.command("report")
def report(rubric: str = RUBRIC, data: Path = DATA_OPT, model: str = MODEL, out: Path = OUT, threads: int = THREADS,
           reuse: bool = typer.Option(True, help="Reuse <out>/signals.json when it matches.")) -> None:
    """Discrimination per dimension and defect kind, ECE and a reliability diagram, on fit and held-out halves."""
    from services.judge import report as rep
    from services.judge.labelled import load_pairs

    r = _rubric(rubric)
    if r.calibration is None:
        raise SystemExit(f"rubric {r.name} has no calibration: run tokenmill judge calibrate first")
    pairs = load_pairs(data)
    signals = _signals(r, pairs, model, threads, out, reuse)
    result = rep.evaluate(r, pairs, signals["items"])
    command = "tokenmill judge " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("report"):])
    text = rep.markdown(result, r, signals["timing"], command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps({**result, "timing": signals["timing"], "model": model}, indent=1))
    rep.plot(result, out / "reliability.png")
    print(text)
    print(f"\nwrote {out / 'report.md'}, report.json, reliability.png")


@app.command("compare")
def compare(prompt: str = typer.Argument(..., help="The prompt both responses answer."),
            response_a: str = typer.Argument(..., help="Response A (text, or @file to read it from a file)."),
            response_b: str = typer.Argument(..., help="Response B (text, or @file)."),
            judge: str = typer.Option("127.0.0.1:50071", help="Judge address (host:port)."),
            rubric: str = typer.Option("", help="Rubric name; empty = children-story."),
            method: str = typer.Option("", help="likelihood | geval; empty = the rubric's own.")) -> None:
    """Ask a running judge which of two responses is better, per dimension (both orders evaluated)."""
    from services.judge.client import compare_text

    def text(v: str) -> str:
        return Path(v[1:]).read_text() if v.startswith("@") else v

    typer.echo(compare_text(judge, prompt, text(response_a), text(response_b), rubric, method))
