"""OpenAI's response shapes for what the gateway core returns: logprobs (chat and legacy completions), usage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from services.common.pb import inference_pb2

TokenText = Callable[[int], str]


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(logprobs: Sequence[inference_pb2.TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    """choices[].logprobs of a chat completion (or of one streamed chunk)."""
    return {"content": [
        {**_entry(token_text(lp.token_id), lp.logprob),
         "top_logprobs": [_entry(token_text(t.token_id), t.logprob) for t in lp.top]}
        for lp in logprobs]}


def completion_logprobs(prompt_ids: Sequence[int], prompt: Sequence[inference_pb2.TokenLogprob],
                        generated: Sequence[inference_pb2.TokenLogprob], token_text: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """choices[].logprobs of a legacy completion: tokens, token_logprobs, top_logprobs, text_offset. With echo
    the prompt's tokens come first, the very first without a logprob (null), as OpenAI and vLLM return it.
    Each top_logprobs dict also holds the chosen token (vLLM's shape: up to k + 1 entries)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    if prompt_ids:
        tokens.append(token_text(prompt_ids[0]))
        values.append(None)
        tops.append(None)
    for lp in [*prompt, *generated]:
        text = token_text(lp.token_id)
        tokens.append(text)
        values.append(lp.logprob)
        top = {token_text(t.token_id): t.logprob for t in lp.top}
        top.setdefault(text, lp.logprob)
        tops.append(top)
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def usage(u: inference_pb2.Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def add_usage(total: inference_pb2.Usage, u: inference_pb2.Usage) -> None:
    total.prompt_tokens += u.prompt_tokens
    total.completion_tokens += u.completion_tokens
    total.cached_tokens += u.cached_tokens
