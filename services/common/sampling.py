"""Sampling parameters: one definition for the gateway (validation) and the worker (generation)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class InvalidRequest(ValueError):
    """Bad input: the caller answers INVALID_ARGUMENT with this message."""


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
        )
        params.validate()
        return params

    def to_proto(self, pb_cls):
        pb = pb_cls(
            max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            stop=list(self.stop), stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
        )
        if self.seed is not None:
            pb.seed = self.seed
        return pb

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also catches NaN
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
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
