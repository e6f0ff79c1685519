"""Sampling parameters: one definition for the gateway (validation) and the worker (generation)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
MAX_CHOICES = 1024
STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice")


class InvalidRequest(ValueError):
    """Bad input: the caller answers INVALID_ARGUMENT with this message."""


@dataclass(slots=True, frozen=True)
class Structured:
    """A constraint on the output: `kind` in STRUCTURED_KINDS; `value` is the schema's JSON text, the regex,
    or the choices as a JSON list (empty for json_object)."""

    kind: str
    value: str = ""

    @classmethod
    def from_proto(cls, pb: Any) -> Structured | None:
        kinds = [k for k, v in (("json_schema", pb.json_schema), ("json_object", pb.json_object),
                                ("regex", pb.regex), ("choice", list(pb.choice))) if v]
        if not kinds:
            return None
        if len(kinds) > 1:
            raise InvalidRequest(f"structured output sets {' and '.join(kinds)}: set exactly one")
        kind = kinds[0]
        value = {"json_schema": pb.json_schema, "json_object": "", "regex": pb.regex,
                 "choice": json.dumps(list(pb.choice))}[kind]
        out = cls(kind, value)
        out.validate()
        return out

    def to_proto(self, pb: Any) -> None:
        if self.kind == "choice":
            pb.choice.extend(self.choices)
        elif self.kind == "json_object":
            pb.json_object = True
        else:
            setattr(pb, self.kind, self.value)

    @property
    def choices(self) -> list[str]:
        return json.loads(self.value) if self.kind == "choice" else []

    def validate(self) -> None:
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.value)
            except ValueError as exc:
                raise InvalidRequest(f"json_schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict | bool):
                raise InvalidRequest("json_schema must be a JSON object (a JSON schema)")
        elif self.kind == "choice":
            choices = self.choices
            if not 0 < len(choices) <= MAX_CHOICES or not all(isinstance(c, str) and c for c in choices):
                raise InvalidRequest(f"choice must list 1..{MAX_CHOICES} non-empty strings")


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    structured: Structured | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_proto(cls, pb, default_max_tokens: int = 256) -> SamplingParams:
        """From a tokenmill.v1.SamplingParams; raises InvalidRequest on values out of range."""
        params = cls(
            max_tokens=pb.max_tokens if pb.HasField("max_tokens") else default_max_tokens,
            temperature=pb.temperature if pb.HasField("temperature") else 1.0,
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
            top_k=pb.top_k if pb.HasField("top_k") else 0,
            seed=pb.seed if pb.HasField("seed") else None,
            stop=tuple(pb.stop),
            stop_token_ids=tuple(pb.stop_token_ids),
            ignore_eos=pb.ignore_eos,
            logprobs=pb.logprobs,
            top_logprobs=pb.top_logprobs,
            prompt_logprobs=pb.prompt_logprobs,
            structured=Structured.from_proto(pb.structured) if pb.HasField("structured") else None,
        )
        params.validate()
        return params

    def to_proto(self, pb_cls):
        pb = pb_cls(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            stop=list(self.stop), stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
            logprobs=self.logprobs, top_logprobs=self.top_logprobs, prompt_logprobs=self.prompt_logprobs,
        )
        if self.seed is not None:
            pb.seed = self.seed
        if self.structured is not None:
            self.structured.to_proto(pb.structured)
        return pb

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):  # also catches NaN
            raise InvalidRequest(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:  # NaN fails too
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_LENGTH:
                raise InvalidRequest(f"stop strings must be 1..{MAX_STOP_LENGTH} characters, got {len(s)}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be non-negative token ids")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.top_logprobs and not (self.logprobs or self.prompt_logprobs):
            raise InvalidRequest("top_logprobs needs logprobs (or prompt_logprobs) set")

    def check_fits(self, prompt_tokens: int, context_length: int) -> None:
        if prompt_tokens < 1:
            raise InvalidRequest("prompt is empty: send a non-empty prompt or at least one chat message")
        if prompt_tokens >= context_length:
            raise InvalidRequest(
                f"prompt has {prompt_tokens} tokens; the model's context is {context_length}: shorten the prompt"
            )
        if prompt_tokens + self.max_tokens > context_length:
            raise InvalidRequest(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({self.max_tokens}) exceeds the model's context "
                f"of {context_length} tokens: lower max_tokens to at most {context_length - prompt_tokens}"
            )
