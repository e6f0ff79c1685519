"""What the OpenAI-compatible judge asks for and how its replies are read: rubric scores and pairwise verdicts.

Replies are parsed as raw JSON, else a fenced ```json block, else the first {...} object in the text, else
`name: 4` patterns; a reply with no usable answer for some dimension is FAILED_PRECONDITION, quoting it.
Requests carry a JSON schema (`response_format`) so a server with structured output constrains the reply
(scores as integer enums of each scale, confidences as numbers).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from typing import Any

from services.judge.rubrics import Dimension, Rubric
from services.judge.types import BackendError, CompareItem, DimScore, DimVerdict, PairVerdict, ScoreItem

SYSTEM = ("You are a careful, strict evaluator. You rate a response to a prompt on the dimensions of a rubric "
          "and reply with a single JSON object and nothing else.")
PAIR_SYSTEM = ("You are a careful, impartial evaluator. You compare two responses to the same prompt on the "
               "dimensions of a rubric, ignoring their order and length, and reply with a single JSON object.")


def build_messages(item: ScoreItem) -> list[dict[str, str]]:
    dims = "\n".join(f"- {d.name} ({d.scale_min} to {d.scale_max}): {d.description}" for d in item.rubric.dimensions)
    example = ", ".join(f'"{d.name}": {d.scale_max}' for d in item.rubric.dimensions)
    user = (
        f"Rubric: {item.rubric.name}\nDimensions (name, scale, meaning):\n{dims}\n\n"
        f"Prompt:\n<<<\n{item.prompt}\n>>>\n\nResponse:\n<<<\n{item.response}\n>>>\n\n"
        "Rate the response on every dimension with a number on that dimension's scale "
        "(the lowest value is very poor, the highest is excellent). Reply with one JSON object and nothing else, "
        f'in this shape: {{"scores": {{{example}}}, "rationale": "one or two sentences"}}'
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# ------------------------------------------------------------------ parsing
_THINK_RE = re.compile(r"<think>.*?</think>", re.S | re.I)
_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)
_NUMBER = r"(-?\d+(?:\.\d+)?)"


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _json_objects(text: str) -> list[Any]:
    """JSON values found in the text: the whole text, fenced blocks, then every {...} that decodes."""
    found: list[Any] = []
    for candidate in [text, *_FENCE_RE.findall(text)]:
        with contextlib.suppress(ValueError):
            found.append(json.loads(candidate.strip()))
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        found.append(obj)
    return [f for f in found if isinstance(f, dict)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        m = re.match(r"\s*" + _NUMBER + r"(?:\s*/\s*\d+(?:\.\d+)?)?\s*$", value)
        return float(m.group(1)) if m else None
    if isinstance(value, dict):
        for key in ("score", "value", "rating"):
            if key in value:
                return _number(value[key])
    return None


def _rationale_of(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("rationale", "reason", "explanation", "justification"):
            if isinstance(value.get(key), str):
                return value[key]
    return ""


def _scores_from_object(obj: dict, dims: tuple[Dimension, ...]) -> tuple[dict[str, tuple[float, str]], str]:
    """{dimension: (value, rationale)} and the overall rationale from one decoded JSON object."""
    table: dict[str, Any] = {}
    scores = obj.get("scores", obj.get("ratings", obj))
    if isinstance(scores, list):  # [{"name": ..., "score": ...}, ...]
        for entry in scores:
            if isinstance(entry, dict) and isinstance(entry.get("name") or entry.get("dimension"), str):
                table[_norm(entry.get("name") or entry["dimension"])] = entry
    elif isinstance(scores, dict):
        table = {_norm(k): v for k, v in scores.items()}
    out = {}
    for d in dims:
        value = table.get(_norm(d.name))
        number = _number(value)
        if number is not None:
            out[d.name] = (number, _rationale_of(value))
    rationale = obj.get("rationale") or obj.get("reason") or obj.get("explanation") or ""
    return out, rationale if isinstance(rationale, str) else json.dumps(rationale)


def _scores_from_text(text: str, dims: tuple[Dimension, ...]) -> dict[str, tuple[float, str]]:
    """Last resort: `moral_clarity: 4`, `**Moral clarity**: 4/5`, `"relevance" = 5`."""
    out = {}
    for d in dims:
        words = [re.escape(w) for w in re.split(r"[_\-\s]+", d.name) if w]
        name = r"[\s_\-]*".join(words)
        m = re.search(r"(?i)(?<![A-Za-z])" + name + r"(?![A-Za-z])[\"'*\s]*(?:[:=\-]|is|of)?[\"'*\s]*"
                      + _NUMBER + r"(?:\s*/\s*(\d+))?", text)
        if m:
            out[d.name] = (float(m.group(1)), "")
    return out


def parse_scores(text: str, rubric: Rubric) -> tuple[list[DimScore], str]:
    """The reply's scores normalised to [0, 1]; raises BackendError(FAILED_PRECONDITION) when unusable."""
    dims = rubric.dimensions
    body = _THINK_RE.sub("", text or "")
    best: dict[str, tuple[float, str]] = {}
    rationale = ""
    for obj in _json_objects(body):
        got, why = _scores_from_object(obj, dims)
        if len(got) > len(best):
            best, rationale = got, why
        if len(best) == len(dims):
            break
    if len(best) < len(dims):
        for name, value in _scores_from_text(body, dims).items():
            best.setdefault(name, value)
    if not best and len(dims) == 1:  # one question, one number on the scale: "The response is 4." / "4/5"
        d = dims[0]
        out_of = {float(a) for a, b in re.findall(_NUMBER + r"\s*/\s*(\d+)", body) if int(b) == d.scale_max}
        numbers = out_of or {float(n) for n in re.findall(r"(?<![\w.])" + _NUMBER + r"(?![\w.]*\d)", body)}
        numbers = {n for n in numbers if min(0.0, d.scale_min) <= n <= d.scale_max}
        if len(numbers) == 1:
            best[d.name] = (numbers.pop(), "")
    missing = [d.name for d in dims if d.name not in best]
    if missing:
        excerpt = " ".join(body.split())[:200] or "(empty)"
        raise BackendError(
            "FAILED_PRECONDITION",
            f"the judge model's reply has no usable score for {', '.join(missing)} (expected JSON like "
            f'{{"scores": {{"{dims[0].name}": {dims[0].scale_max}}}}}); reply began: {excerpt!r}. '
            "Use a model that follows the JSON instruction, or check --judge-model")
    scores = []
    for d in dims:
        value, why = best[d.name]
        if value < d.scale_min and 0.0 <= value <= 1.0 and d.scale_min >= 1:
            score = value  # the model answered with a fraction (as the seed asked): already in [0, 1]
        else:
            score = d.normalise(value)
        scores.append(DimScore(d.name, round(score, 6), why))
    return scores, rationale


def score_schema(rubric: Rubric) -> dict[str, Any]:
    # whole numbers on each dimension's scale: a server that constrains decoding (tokenmill's gateway, vLLM)
    # then cannot answer out of range, nor ramble through an endless number
    props = {d.name: {"type": "integer", "enum": list(range(d.scale_min, d.scale_max + 1))}
             for d in rubric.dimensions}
    return _schema("rubric_scores", {"scores": {"type": "object", "properties": props, "required": list(props),
                                                "additionalProperties": False}, "rationale": {"type": "string"}})


def verdict_schema(rubric: Rubric) -> dict[str, Any]:
    one = {"type": "object", "properties": {"better": {"type": "string", "enum": ["A", "B", "tie"]},
                                            "confidence": {"type": "number"}},
           "required": ["better", "confidence"], "additionalProperties": False}
    props = {d.name: one for d in rubric.dimensions}
    return _schema("pairwise_verdict", {"verdicts": {"type": "object", "properties": props, "required": list(props),
                                                     "additionalProperties": False}, "rationale": {"type": "string"}})


def _schema(name: str, props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": {
        "type": "object", "properties": props, "required": list(props), "additionalProperties": False}}}


def build_pair_messages(item: CompareItem) -> list[dict[str, str]]:
    dims = "\n".join(f"- {d.name}: {d.description}" for d in item.rubric.dimensions)
    example = ", ".join(f'"{d.name}": {{"better": "A", "confidence": 0.8}}' for d in item.rubric.dimensions)
    user = (f"Rubric: {item.rubric.name}\nDimensions:\n{dims}\n\nPrompt:\n<<<\n{item.prompt}\n>>>\n\n"
            f"Response A:\n<<<\n{item.first}\n>>>\n\nResponse B:\n<<<\n{item.second}\n>>>\n\n"
            "For every dimension say which response is better (A, B, or tie) and how sure you are (0.5 = a guess, "
            "1 = certain). Reply with one JSON object and nothing else, in this shape: "
            f'{{"verdicts": {{{example}}}, "rationale": "one or two sentences"}}')
    return [{"role": "system", "content": PAIR_SYSTEM}, {"role": "user", "content": user}]


def _verdict_prob(value: Any) -> tuple[float, str] | None:
    """P(A better) from {"better": "A", "confidence": 0.8} (or a bare "A" / "B" / "tie")."""
    better, conf, why = value, 1.0, ""
    if isinstance(value, dict):
        better = value.get("better", value.get("winner"))
        conf = _number(value.get("confidence", 1.0))
        why = _rationale_of(value)
    if not isinstance(better, str) or conf is None:
        return None
    conf = min(1.0, max(0.5, conf))
    choice = better.strip().strip(".").lower()
    prob = {"a": conf, "response a": conf, "b": 1 - conf, "response b": 1 - conf, "tie": 0.5}.get(choice)
    return None if prob is None else (prob, why)


def parse_verdict(text: str, rubric: Rubric) -> PairVerdict:
    """The reply's per-dimension P(A better); raises BackendError(FAILED_PRECONDITION) when unusable."""
    body = _THINK_RE.sub("", text or "")
    best: dict[str, tuple[float, str]] = {}
    rationale = ""
    for obj in _json_objects(body):
        table = obj.get("verdicts", obj)
        table = {_norm(k): v for k, v in table.items()} if isinstance(table, dict) else {}
        got = {d.name: v for d in rubric.dimensions if (v := _verdict_prob(table.get(_norm(d.name)))) is not None}
        if len(got) > len(best):
            best, rationale = got, str(obj.get("rationale") or "")
    missing = [d.name for d in rubric.dimensions if d.name not in best]
    if missing:
        excerpt = " ".join(body.split())[:200] or "(empty)"
        raise BackendError("FAILED_PRECONDITION",
                           f"the judge model's reply has no usable verdict for {', '.join(missing)} (expected JSON "
                           f'like {{"verdicts": {{"{rubric.dimensions[0].name}": {{"better": "A", "confidence": '
                           f'0.8}}}}}}); reply began: {excerpt!r}. Use a model that follows the JSON instruction')
    dims = [DimVerdict(d.name, round(best[d.name][0], 6), best[d.name][1]) for d in rubric.dimensions]
    return PairVerdict(dims, round(sum(v.prob_first for v in dims) / len(dims), 6), "openai", rationale)
