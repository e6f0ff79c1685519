"""Judge backends: `local` (a causal LM in-process, G-Eval scoring) and `openai` (an OpenAI-compatible API).

A backend has `name`, `methods` (the rubric methods it can judge by, preferred first), `model_name`, `ready`,
`async start()`, `check(item)` (raises InvalidRequest), `async score(items) -> list[ItemScore]` and
`async compare(pairs) -> list[PairVerdict]` (one order per pair; both raise BackendError), `async close()`.
"""

from __future__ import annotations

from typing import Any

from services.common.config import JudgeConfig

BACKENDS = ("local", "openai")


def build_backend(config: JudgeConfig, rubrics: list | None = None) -> Any:
    if config.judge_backend == "local":
        from services.judge.backends.local import LocalBackend

        return LocalBackend(config, rubrics)
    if config.judge_backend == "openai":
        from services.judge.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(config)
    raise SystemExit(f"unknown --judge-backend {config.judge_backend!r}: use {' or '.join(BACKENDS)}")
