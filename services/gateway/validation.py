"""Edge validation and tokenisation: reject what cannot run before it is queued."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.sampling import InvalidRequest, SamplingParams

ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS_PER_TOKEN = 32  # a prompt this many times longer than the context cannot fit: skip tokenising it


@dataclass(slots=True)
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams


class Validator:
    def __init__(self, tokenizer: Any, model: str, context_length: int, default_max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.context_length = context_length
        self.default_max_tokens = default_max_tokens

    def check_model(self, requested: str) -> None:
        if requested and requested != self.model:
            raise InvalidRequest(f"unknown model {requested!r}: this deployment serves {self.model!r}")

    def prompt_ids(self, prompt: str | list[int], messages: Sequence[tuple[str, str]]) -> list[int]:
        if prompt and messages:
            raise InvalidRequest("send either prompt or messages, not both")
        if isinstance(prompt, list):  # already token ids (OpenAI's completions accept them)
            vocab = len(self.tokenizer)
            if prompt and not all(0 <= t < vocab for t in prompt):
                raise InvalidRequest(f"prompt token ids must be in 0..{vocab - 1}")
            return list(prompt) or self.prompt_ids("", ())
        if messages:
            for i, (role, _) in enumerate(messages):
                if role not in ROLES:
                    raise InvalidRequest(f"messages[{i}].role is {role!r}: use one of {', '.join(ROLES)}")
            self._check_size(sum(len(c) for _, c in messages))
            chat = [{"role": r, "content": c} for r, c in messages]
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        if not prompt:
            raise InvalidRequest("prompt is empty: send a non-empty prompt or at least one chat message")
        self._check_size(len(prompt))
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _check_size(self, chars: int) -> None:
        if chars > self.context_length * MAX_PROMPT_CHARS_PER_TOKEN:
            raise InvalidRequest(
                f"prompt is {chars} characters, far more than the model's context of {self.context_length} "
                "tokens can hold: shorten it")

    def prepare(self, model: str, prompt: str | list[int], messages: Sequence[tuple[str, str]],
                sampling: SamplingParams) -> Prepared:
        """Validate everything and tokenise; raises InvalidRequest with a message a person can act on."""
        self.check_model(model)
        params = sampling.checked(self.default_max_tokens)
        params.check_vocab(len(self.tokenizer))
        ids = self.prompt_ids(prompt, messages)
        if sampling.max_tokens is None:  # an unset default never makes a request fail
            params.max_tokens = max(1, min(params.max_tokens, self.context_length - len(ids)))
        params.check_fits(len(ids), self.context_length)
        return Prepared(ids, params)
