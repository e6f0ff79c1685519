"""Sampling parameters: one definition for the gateway (validation) and the worker (generation)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
MAX_CHOICES = 1024
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: -2..2
MAX_LOGIT_BIAS = 100.0  # OpenAI's: each bias in -100..100
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_BAD_WORDS = 128
MAX_SAMPLES = 64  # n and best_of: at most this many samples per request
STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice")


class InvalidRequest(ValueError):
    """Bad input: the caller answers INVALID_ARGUMENT with this message."""


@dataclass(slots=True, frozen=True)
class Structured:
    """A constraint on the output: `kind` in STRUCTURED_KINDS; `value` is the schema's JSON text, the regex,
    or the choices as a JSON list (empty for json_object)."""

    kind: str
    value: str = ""
    also: tuple[str, ...] = ()  # further kinds a message set besides `kind`: validate() refuses them

    @classmethod
    def from_proto(cls, pb: Any) -> Structured | None:
        """The message's constraint as sent, unchecked (validate() checks it)."""
        kinds = [k for k, v in (("json_schema", pb.json_schema), ("json_object", pb.json_object),
                                ("regex", pb.regex), ("choice", list(pb.choice))) if v]
        if not kinds:
            return None
        kind = kinds[0]
        value = {"json_schema": pb.json_schema, "json_object": "", "regex": pb.regex,
                 "choice": json.dumps(list(pb.choice))}[kind]
        return cls(kind, value, tuple(kinds[1:]))

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
        if self.also:
            raise InvalidRequest(f"structured output sets {' and '.join((self.kind, *self.also))}: set exactly one")
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
    max_tokens: int | None = 256  # None: not given (the gateway's default, capped to what fits the context)
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    bad_words: tuple[str, ...] = ()
    n: int = 1
    best_of: int = 0  # samples generated (0 = n); the n best (cumulative logprob) are returned

    def __post_init__(self) -> None:
        if not self.best_of:
            self.best_of = self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """Any of the logit processors (penalties, bias, min_tokens, bad words) is on."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.bad_words)

    @classmethod
    def from_proto(cls, pb, default_max_tokens: int = 256) -> SamplingParams:
        """From a tokenmill.v1.SamplingParams; raises InvalidRequest on values out of range."""
        return cls.from_proto_unchecked(pb).checked(default_max_tokens)

    @classmethod
    def from_proto_unchecked(cls, pb) -> SamplingParams:
        """A tokenmill.v1.SamplingParams's values as sent (max_tokens None when unset), for checked() later."""
        return cls(
            max_tokens=pb.max_tokens if pb.HasField("max_tokens") else None,
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
            presence_penalty=pb.presence_penalty,
            frequency_penalty=pb.frequency_penalty,
            repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
            min_p=pb.min_p,
            logit_bias=dict(pb.logit_bias),
            min_tokens=pb.min_tokens,
            bad_words=tuple(pb.bad_words),
            n=pb.n or 1,
            best_of=pb.best_of,
        )

    def checked(self, default_max_tokens: int = 256) -> SamplingParams:
        """A validated copy, max_tokens default_max_tokens where it is None; raises InvalidRequest."""
        params = replace(self, max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens)
        params.validate()
        return params

    def to_proto(self, pb_cls):
        pb = pb_cls(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            stop=list(self.stop), stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
            logprobs=self.logprobs, top_logprobs=self.top_logprobs, prompt_logprobs=self.prompt_logprobs,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, min_p=self.min_p,
            logit_bias=self.logit_bias, min_tokens=self.min_tokens, bad_words=list(self.bad_words),
            n=self.n if self.n != 1 else 0, best_of=self.best_of if self.best_of != self.n else 0,
        )
        if self.repetition_penalty != 1.0:
            pb.repetition_penalty = self.repetition_penalty
        if self.seed is not None:
            pb.seed = self.seed
        if self.structured is not None:
            self.structured.to_proto(pb.structured)
        return pb

    def validate(self) -> None:
        if self.structured is not None:
            self.structured.validate()
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:  # NaN fails too
                raise InvalidRequest(f"{name} must be in -{MAX_PENALTY:g}..{MAX_PENALTY:g}, got {value}")
        if not (self.repetition_penalty > 0.0 and math.isfinite(self.repetition_penalty)):
            raise InvalidRequest(f"repetition_penalty must be > 0 and finite (1 = off), got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequest(f"logit_bias may list at most {MAX_LOGIT_BIAS_ENTRIES} tokens, "
                                 f"got {len(self.logit_bias)}")
        for token, bias in self.logit_bias.items():
            if token < 0:
                raise InvalidRequest(f"logit_bias token ids must be non-negative, got {token}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequest(f"logit_bias of token {token} must be in -100..100, got {bias}")
        if self.min_tokens < 0:
            raise InvalidRequest(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if len(self.bad_words) > MAX_BAD_WORDS or not all(w.strip() for w in self.bad_words):
            raise InvalidRequest(f"bad_words must list at most {MAX_BAD_WORDS} non-blank strings")
        if not 1 <= self.n <= MAX_SAMPLES:
            raise InvalidRequest(f"n must be in 1..{MAX_SAMPLES}, got {self.n}")
        if not self.n <= self.best_of <= MAX_SAMPLES:
            raise InvalidRequest(f"best_of must be in n..{MAX_SAMPLES} (n = {self.n}), got {self.best_of}")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids of logit_bias (and stop_token_ids) must name tokens of the model's vocabulary."""
        bad = sorted(t for t in self.logit_bias if t >= vocab_size)
        if bad:
            raise InvalidRequest(f"logit_bias names token id {bad[0]}, outside the vocabulary (0..{vocab_size - 1})")

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
