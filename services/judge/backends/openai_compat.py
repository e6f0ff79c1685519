"""OpenAI-compatible backend: ask a chat-completions endpoint for JSON scores, as the seed did with gpt-5-mini.

Works against OpenAI itself, vLLM/TGI/llama.cpp servers, and tokenmill's own gateway (`/v1/chat/completions`),
so a tokenmill deployment of a larger model can judge a smaller one. The key comes from
TOKENMILL_JUDGE_API_KEY or OPENAI_API_KEY (none is fine for a local server).

- Transient failures (connection errors, connect timeouts, 408/409/425/429/5xx) are retried with exponential
  backoff and jitter, honouring Retry-After; when retries run out the status is UNAVAILABLE. A read timeout
  (the server took the request but is slow) is not retried: DEADLINE_EXCEEDED.
- Any other HTTP error (401, 404, 400 ...) is FAILED_PRECONDITION with the upstream message: fix the setup.
- The reply is parsed as raw JSON, else a fenced ```json block, else the first {...} object in the text,
  else `name: 4` patterns; a reply with no usable score for some dimension is FAILED_PRECONDITION,
  quoting the start of the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
from typing import Any

from services.common.config import JudgeConfig
from services.judge import metrics
from services.judge.rubrics import Dimension, Rubric
from services.judge.types import BackendError, DimScore, ItemScore, ScoreItem

log = logging.getLogger("tokenmill.judge.openai")

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 30.0
BACKOFF_S = 0.5  # first retry after ~0.5 s, then ~1, ~2, ... (x0.75-1.25 jitter)
SYSTEM = ("You are a careful, strict evaluator. You rate a response to a prompt on the dimensions of a rubric "
          "and reply with a single JSON object and nothing else.")


def api_key() -> str:
    return os.environ.get("TOKENMILL_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or ""


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


# ------------------------------------------------------------------ backend
class OpenAIBackend:
    name = "openai"

    def __init__(self, config: JudgeConfig) -> None:
        if not config.judge_url:
            raise SystemExit("--judge-backend openai needs --judge-url (e.g. http://127.0.0.1:8000/v1)")
        self.config = config
        self.url = config.judge_url.rstrip("/")
        self.model = config.judge_model
        self.timeout_s = config.judge_timeout_s
        self.max_retries = max(0, config.judge_max_retries)
        self.backoff_s = BACKOFF_S
        self.client: Any = None
        self.sem = asyncio.Semaphore(max(1, config.judge_concurrency))

    @property
    def model_name(self) -> str:
        return self.model

    @property
    def ready(self) -> bool:
        return self.client is not None

    async def start(self) -> None:
        import httpx

        headers = {"content-type": "application/json"}
        if key := api_key():
            headers["authorization"] = f"Bearer {key}"
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
                                        headers=headers)
        log.info("judge backend openai: %s model=%s (key %s)", self.url, self.model or "(from /models)",
                 "set" if api_key() else "not set")

    def check(self, item: ScoreItem) -> None:
        """Nothing model-specific to check before the call."""

    async def _resolve_model(self) -> str:
        if self.model:
            return self.model
        _status, body = await self._request("GET", "/models")
        try:
            self.model = body["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise BackendError("FAILED_PRECONDITION",
                               f"{self.url}/models lists no model; set --judge-model") from None
        log.info("judge model from %s/models: %s", self.url, self.model)
        return self.model

    async def _request(self, method: str, path: str, payload: dict | None = None) -> tuple[int, Any]:
        """One HTTP call with retries on transient failures; returns (status, decoded JSON body)."""
        import httpx

        last = ""
        for attempt in range(self.max_retries + 1):
            delay = self.backoff_s * (2 ** attempt) * (0.75 + 0.5 * random.random())
            try:
                resp = await self.client.request(method, self.url + path, json=payload)
            except httpx.ReadTimeout:
                # the server took the request and is still working on it: a retry would only add load
                raise BackendError("DEADLINE_EXCEEDED",
                                   f"the judge API at {self.url}{path} did not answer within {self.timeout_s:.0f}s "
                                   "(--judge-timeout-s; or lower --judge-max-tokens)") from None
            except httpx.HTTPError as exc:  # connection refused/reset, connect timeouts, broken responses
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    try:
                        return 200, resp.json()
                    except ValueError:
                        raise BackendError("FAILED_PRECONDITION",
                                           f"{self.url}{path} answered 200 with a body that is not JSON: "
                                           f"{resp.text[:200]!r}") from None
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code not in RETRY_STATUS:
                    hint = " (check TOKENMILL_JUDGE_API_KEY / OPENAI_API_KEY)" if resp.status_code in (401, 403) \
                        else " (check --judge-url and --judge-model)" if resp.status_code == 404 else ""
                    raise BackendError("FAILED_PRECONDITION",
                                       f"the judge API at {self.url}{path} refused the request: {last}{hint}")
                retry_after = resp.headers.get("retry-after")
                if retry_after:
                    with contextlib.suppress(ValueError):
                        delay = min(MAX_RETRY_AFTER_S, max(0.0, float(retry_after)))
            if attempt < self.max_retries:
                metrics.upstream_retries.inc()
                log.warning("judge API %s%s: %s; retry %d/%d in %.2fs", self.url, path, last, attempt + 1,
                            self.max_retries, delay)
                await asyncio.sleep(delay)
        raise BackendError("UNAVAILABLE",
                           f"the judge API at {self.url}{path} failed {self.max_retries + 1} times; last error: {last}")

    async def _score_one(self, item: ScoreItem) -> ItemScore:
        async with self.sem:
            model = await self._resolve_model()
            payload = {"model": model, "messages": build_messages(item), "temperature": 0,
                       "max_tokens": self.config.judge_max_tokens}
            _, body = await self._request("POST", "/chat/completions", payload)
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BackendError("FAILED_PRECONDITION",
                               f"the judge API's reply is not a chat completion (no choices[0].message.content): "
                               f"{json.dumps(body)[:200]}") from None
        scores, rationale = parse_scores(content if isinstance(content, str) else "", item.rubric)
        metrics.items.labels(self.name).inc()
        return ItemScore(id=item.id, scores=scores, rubric=item.rubric.name, backend=self.name,
                         rationale=rationale)

    async def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return list(await asyncio.gather(*(self._score_one(it) for it in items)))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
