"""Rubrics are data: one YAML or JSON file per rubric, a list of dimensions with a description and a scale.

    name: children-story
    description: ...
    method: likelihood            # or geval: the judge model's 1..5 digit (G-Eval); a request may override
    variables: {pattern: 'learns the value of (?P<moral>.+?) in', defaults: {moral: kindness}}
    dimensions:
      - name: moral_clarity
        description: The story has a clear moral lesson ...
        scale: [1, 5]             # geval (and the OpenAI backend)
        defects: [opposite_moral] # labelled-set kinds this dimension is aimed at (calibration labels)
        signals: [...]            # likelihood: see services/judge/signals.py

The built-in rubrics live next to this file in `rubrics/`; `--rubrics DIR` adds (or overrides) more.
A rubric's calibration (`<name>.calibration.json`, written by `tokenmill judge calibrate`) sits beside it.
A request names a rubric or passes its dimensions inline; both are validated here.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.sampling import InvalidRequest
from services.judge.calibration import SUFFIX as CALIBRATION_SUFFIX
from services.judge.calibration import Calibration, path_for
from services.judge.signals import Signal, check_signals, signal_from_dict

log = logging.getLogger("tokenmill.judge.rubrics")

BUILTIN_DIR = Path(__file__).resolve().parent / "rubrics"
DEFAULT_RUBRIC = "children-story"
INLINE_RUBRIC = "inline"
DEFAULT_SCALE = (1, 5)
MAX_DIMENSIONS = 16
MAX_NAME_CHARS = 64
MAX_DESCRIPTION_CHARS = 1000
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
METHODS = ("likelihood", "geval")


@dataclass(frozen=True, slots=True)
class Dimension:
    name: str
    description: str
    scale_min: int = DEFAULT_SCALE[0]
    scale_max: int = DEFAULT_SCALE[1]
    signals: tuple[Signal, ...] = ()
    defects: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        """The name as words, for prompts: moral_clarity -> moral clarity."""
        return self.name.replace("_", " ").replace("-", " ")

    def normalise(self, value: float) -> float:
        """A value on the scale -> [0, 1] (clamped)."""
        x = (value - self.scale_min) / (self.scale_max - self.scale_min)
        return min(1.0, max(0.0, x))


@dataclass(frozen=True, slots=True)
class Rubric:
    name: str
    dimensions: tuple[Dimension, ...]
    description: str = ""
    method: str = "geval"
    pattern: str = ""  # regex with named groups read from the prompt (probe statement variables)
    defaults: tuple[tuple[str, str], ...] = ()  # values of those variables when the prompt does not say
    calibration: Calibration | None = None
    path: Path | None = None

    def resolve_method(self, requested: str) -> str:
        """The method a request gets: its own when given, else the rubric's; raises InvalidRequest."""
        method = requested or self.method
        if method not in METHODS:
            raise InvalidRequest(f"unknown method {method!r}: use one of {', '.join(METHODS)} (or leave it empty "
                                 f"for the rubric's own, {self.method})")
        if method == "likelihood":
            bare = [d.name for d in self.dimensions if not d.signals]
            if bare:
                raise InvalidRequest(
                    f"method likelihood needs signals for every dimension, and {', '.join(bare)} of rubric "
                    f"{self.name!r} has none: use method geval, or add signals to the rubric file")
        return method


def check_dimensions(dims: list[Dimension], where: str) -> tuple[Dimension, ...]:
    """Validate a list of dimensions; raises InvalidRequest naming what is wrong and where."""
    if not dims:
        raise InvalidRequest(f"{where}: no dimensions; give at least one (name, description, scale)")
    if len(dims) > MAX_DIMENSIONS:
        raise InvalidRequest(f"{where}: {len(dims)} dimensions; at most {MAX_DIMENSIONS}")
    seen: set[str] = set()
    for i, d in enumerate(dims):
        if not d.name:
            raise InvalidRequest(f"{where}: dimension {i} has no name")
        if len(d.name) > MAX_NAME_CHARS or not NAME_RE.match(d.name):
            raise InvalidRequest(
                f"{where}: dimension name {d.name[:80]!r} must be 1..{MAX_NAME_CHARS} letters, digits, '_' or '-', "
                "starting with a letter")
        if d.name in seen:
            raise InvalidRequest(f"{where}: dimension {d.name!r} appears twice")
        seen.add(d.name)
        if len(d.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidRequest(
                f"{where}: description of {d.name!r} has {len(d.description)} characters; at most "
                f"{MAX_DESCRIPTION_CHARS}")
        if not d.scale_min < d.scale_max:
            raise InvalidRequest(
                f"{where}: scale of {d.name!r} is {d.scale_min}..{d.scale_max}; scale_min must be below scale_max "
                "(or leave both 0 for 1..5)")
        if d.scale_min < 0 or d.scale_max > 100:
            raise InvalidRequest(f"{where}: scale of {d.name!r} must lie within 0..100, got "
                                 f"{d.scale_min}..{d.scale_max}")
    return tuple(dims)


def dimension_from_dict(raw: dict[str, Any], where: str) -> Dimension:
    if not isinstance(raw, dict) or "name" not in raw:
        raise InvalidRequest(f"{where}: each dimension needs at least a name, got {raw!r}")
    scale = raw.get("scale", DEFAULT_SCALE)
    if "scale_min" in raw or "scale_max" in raw:
        scale = (raw.get("scale_min", DEFAULT_SCALE[0]), raw.get("scale_max", DEFAULT_SCALE[1]))
    if not (isinstance(scale, list | tuple) and len(scale) == 2 and all(isinstance(v, int) for v in scale)):
        raise InvalidRequest(f"{where}: scale of {raw['name']!r} must be two integers [min, max], got {scale!r}")
    name = str(raw["name"])
    try:
        signals = check_signals([signal_from_dict(r, f"{where}: {name}") for r in raw.get("signals") or []], where)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return Dimension(name=name, description=str(raw.get("description") or name), scale_min=scale[0],
                     scale_max=scale[1], signals=signals, defects=tuple(str(d) for d in raw.get("defects") or ()))


def load_rubric_file(path: Path) -> Rubric:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a rubric file holds a mapping with name, description, dimensions")
    name = str(data.get("name") or path.stem)
    variables = data.get("variables") or {}
    try:
        dims = check_dimensions([dimension_from_dict(d, f"rubric file {path}") for d in data.get("dimensions") or []],
                                f"rubric file {path}")
        pattern = str(variables.get("pattern") or "")
        re.compile(pattern)
        rubric = Rubric(name=name, dimensions=dims, description=str(data.get("description") or ""),
                        method=str(data.get("method") or ("likelihood" if all(d.signals for d in dims) else "geval")),
                        pattern=pattern, defaults=tuple((str(k), str(v)) for k, v in
                                                        (variables.get("defaults") or {}).items()), path=path)
        rubric.resolve_method("")
    except (InvalidRequest, re.error) as exc:
        raise ValueError(f"rubric file {path}: {exc}") from None
    cal_path = path_for(path)
    if cal_path.exists():
        cal = Calibration.load(cal_path)
        unknown = set(cal.dimensions) - {d.name for d in dims}
        if unknown:
            raise ValueError(f"{cal_path}: calibrates {sorted(unknown)}, which {path} does not define; "
                             "refit with tokenmill judge calibrate")
        object.__setattr__(rubric, "calibration", cal)
    return rubric


class RubricRegistry:
    """Rubrics by name: the built-in folder, then any extra folders (a later file overrides an earlier one)."""

    def __init__(self, extra_dirs: list[Path] | None = None) -> None:
        self.rubrics: dict[str, Rubric] = {}
        for folder in [BUILTIN_DIR, *(extra_dirs or [])]:
            if not folder.is_dir():
                raise ValueError(f"rubric folder {folder} does not exist")
            for path in sorted(folder.iterdir()):
                if path.suffix in (".yaml", ".yml", ".json") and not path.name.endswith(CALIBRATION_SUFFIX):
                    rubric = load_rubric_file(path)
                    self.rubrics[rubric.name] = rubric
        if DEFAULT_RUBRIC not in self.rubrics:
            raise ValueError(f"the default rubric {DEFAULT_RUBRIC!r} is missing from {BUILTIN_DIR}")

    @property
    def names(self) -> list[str]:
        return sorted(self.rubrics)

    def get(self, name: str) -> Rubric:
        name = name or DEFAULT_RUBRIC
        try:
            return self.rubrics[name]
        except KeyError:
            raise InvalidRequest(
                f"unknown rubric {name!r}: use one of {', '.join(self.names)}, or pass dimensions inline") from None

    def resolve(self, name: str, inline: list[Dimension]) -> Rubric:
        """The request's rubric: inline dimensions when given (named `name` or 'inline'; G-Eval), else by name."""
        if inline:
            label = name or INLINE_RUBRIC
            return Rubric(name=label, dimensions=check_dimensions(inline, "inline dimensions"))
        return self.get(name)
