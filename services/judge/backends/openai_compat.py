"""OpenAI-compatible backend: ask a chat-completions endpoint for JSON scores, as the seed did with gpt-5-mini.

Works against OpenAI itself, vLLM/TGI/llama.cpp servers, and tokenmill's own gateway (`/v1/chat/completions`),
so a tokenmill deployment of a larger model can judge a smaller one. The key comes from
TOKENMILL_JUDGE_API_KEY or OPENAI_API_KEY (none is fine for a local server).

- Transient failures (connection errors, connect timeouts, 408/409/425/429/5xx) are retried with exponential
  backoff and jitter, honouring Retry-After; when retries run out the status is UNAVAILABLE. A read timeout
  (the server took the request but is slow) is not retried: DEADLINE_EXCEEDED.
- Any other HTTP error (401, 404, 400 ...) is FAILED_PRECONDITION with the upstream message: fix the setup.
- Score asks for JSON scores per dimension (method geval); Compare asks for a JSON verdict per dimension
  (A, B or tie, with a confidence). Both send a JSON schema as `response_format`; a server that refuses the
  field with 400 is asked again without it (remembered), and the reply is parsed leniently either way
  (services/judge/backends/openai_json.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from typing import Any

from services.common.config import JudgeConfig
from services.judge import metrics
from services.judge.backends.openai_json import (
    build_messages,
    build_pair_messages,
    parse_scores,
    parse_verdict,
    score_schema,
    verdict_schema,
)
from services.judge.types import BackendError, CompareItem, ItemScore, PairVerdict, ScoreItem

__all__ = ["OpenAIBackend", "api_key", "parse_scores"]

log = logging.getLogger("tokenmill.judge.openai")

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 30.0
BACKOFF_S = 0.5  # first retry after ~0.5 s, then ~1, ~2, ... (x0.75-1.25 jitter)


def api_key() -> str:
    return os.environ.get("TOKENMILL_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or ""


# ------------------------------------------------------------------ backend
class OpenAIBackend:
    name = "openai"
    methods = ("geval",)  # an API gives no likelihood of a given text: the model is asked

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
        self.structured = True  # send response_format until the server refuses it

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

    def check(self, item: ScoreItem | CompareItem) -> None:
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

    async def _chat(self, messages: list[dict[str, str]], schema: dict[str, Any]) -> str:
        """One chat completion's text; asks for `schema` as structured output where the server takes it."""
        async with self.sem:
            model = await self._resolve_model()
            payload = {"model": model, "messages": messages, "temperature": 0,
                       "max_tokens": self.config.judge_max_tokens}
            body = None
            if self.structured:
                try:
                    _, body = await self._request("POST", "/chat/completions", {**payload, "response_format": schema})
                except BackendError as exc:
                    if "HTTP 400" not in str(exc) or "response_format" not in str(exc):
                        raise
                    self.structured = False
                    log.warning("%s refuses response_format; asking for JSON in words only", self.url)
            if body is None:
                _, body = await self._request("POST", "/chat/completions", payload)
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BackendError("FAILED_PRECONDITION",
                               f"the judge API's reply is not a chat completion (no choices[0].message.content): "
                               f"{json.dumps(body)[:200]}") from None
        return content if isinstance(content, str) else ""

    async def _score_one(self, item: ScoreItem) -> ItemScore:
        scores, rationale = parse_scores(await self._chat(build_messages(item), score_schema(item.rubric)),
                                         item.rubric)
        metrics.items.labels(self.name).inc()
        return ItemScore(id=item.id, scores=scores, rubric=item.rubric.name, backend=self.name,
                         rationale=rationale)

    async def score(self, items: list[ScoreItem]) -> list[ItemScore]:
        return list(await asyncio.gather(*(self._score_one(it) for it in items)))

    async def _compare_one(self, item: CompareItem) -> PairVerdict:
        verdict = parse_verdict(await self._chat(build_pair_messages(item), verdict_schema(item.rubric)), item.rubric)
        metrics.items.labels(self.name).inc()
        return verdict

    async def compare(self, items: list[CompareItem]) -> list[PairVerdict]:
        return list(await asyncio.gather(*(self._compare_one(it) for it in items)))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
