"""OpenAI's request bodies as pydantic models, and the plain sampling parameters they ask for: types are strict
(no "yes" for a boolean, no 2.5 for an integer), integers fit their wire fields, floats are finite and 32-bit as
on the worker's wire. A parameter tokenmill does not honour is refused by name (OPTIONAL_NEUTRAL lists those that
pass when they carry their no-op value), never ignored.
"""

from __future__ import annotations

import ctypes
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from services.common.sampling import MAX_TOP_LOGPROBS, InvalidRequest, SamplingParams, Structured
from services.gateway.tools import call_schema, check_tools


def float32(value: float) -> float:
    """The value as tokenmill.v1's float fields carry it: the core checks what the worker will get, as it does
    for a gRPC caller (a top_p of 1.00000001 is 1.0 there; 1e39 is inf)."""
    return ctypes.c_float(value).value


def wire_text(*texts: str) -> None:
    """Strings bound for the worker's proto must encode as UTF-8: JSON's lone surrogates ("\\ud800") fail here
    (a 500), not at dispatch, where they would take the request's batch down."""
    for text in texts:
        text.encode("utf-8")


INT32 = 2**31 - 1
MAX_PROMPTS = 64  # prompts in one /v1/completions call (each becomes a choice)
Int32 = Annotated[StrictInt, Field(ge=-INT32 - 1, le=INT32)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False), AfterValidator(float32)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]  # negative: its 64-bit two's complement
TopK = Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)]
# accepted only with these values, which change nothing; anything else is refused by name
OPTIONAL_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "functions": ([],), "function_call": ("none",),
    "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"), "suffix": ("",),
    "modalities": (["text"],),
}
TYPE_NAMES = {"str", "int", "bool", "float", "dict", "list", "none"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Part(Strict):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(Strict):
    name: StrictStr
    arguments: StrictStr = "{}"  # JSON text, as OpenAI sends it


class MessageToolCall(Strict):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: StrictStr
    content: StrictStr | list[Part] | None = None
    name: StrictStr | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: StrictStr | None = None  # a role "tool" turn: the call it answers

    @property
    def has_tools(self) -> bool:
        return self.role == "tool" or bool(self.tool_calls)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: StrictBool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: StrictStr


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: StrictBool = False


class JsonSchema(Strict):
    name: StrictStr = "output"
    description: StrictStr | None = None
    schema_: dict[str, Any] | StrictBool = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class Common(BaseModel):
    """Fields both endpoints take; unknown ones land in model_extra and are judged by `refuse_unsupported`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    model: StrictStr = ""
    max_tokens: Int32 | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int32 | None = None
    seed: Seed | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0, le=INT32)]] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    user: StrictStr | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictStr | None = None  # vLLM's extras
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    n: Int32 | None = None
    best_of: Int32 | None = None  # vLLM's / legacy OpenAI's: samples generated, the n best returned
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    repetition_penalty: Float | None = None  # vLLM's extras from here on
    min_p: Float | None = None
    logit_bias: dict[StrictStr, Float] | None = None  # token id (as a string, OpenAI's JSON) -> bias
    min_tokens: Int32 | None = None
    bad_words: list[StrictStr] | None = None

    @property
    def choices(self) -> int:
        return self.n or 1

    def refuse_unsupported(self) -> None:
        bad = sorted(k for k, v in (self.model_extra or {}).items()
                     if v is not None and v not in OPTIONAL_NEUTRAL.get(k, ()))
        if bad:
            them = "them" if len(bad) > 1 else "it"
            raise InvalidRequest(f"unsupported parameter{'s' if len(bad) > 1 else ''}: {', '.join(bad)} "
                                 f"(tokenmill does not honour {them}; leave {them} out)")

    def structured(self) -> Structured | None:
        """The output constraint of response_format or guided_* (one of them); None for an empty one."""
        kinds, out = [], None
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            out = Structured("json_object")
            kinds.append("response_format")
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InvalidRequest("response_format of type json_schema needs a json_schema object with a schema")
            out = Structured("json_schema", json.dumps(fmt.json_schema.schema_))
            kinds.append("response_format")
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                wire_text(schema)
            out = Structured("json_schema", schema if isinstance(schema, str) else json.dumps(schema))
            kinds.append("guided_json")
        if self.guided_regex is not None:
            wire_text(self.guided_regex)
            out = Structured("regex", self.guided_regex)
            kinds.append("guided_regex")
        if self.guided_choice is not None:
            if not self.guided_choice:
                raise InvalidRequest("guided_choice must list at least one string")
            wire_text(*self.guided_choice)
            out = Structured("choice", json.dumps(self.guided_choice))
            kinds.append("guided_choice")
        if len(kinds) > 1:
            raise InvalidRequest(f"{' and '.join(kinds)} each constrain the output: send one of them")
        return out if out is not None and (out.value or out.kind == "json_object") else None

    def penalties(self) -> dict[str, Any]:
        """Penalties, filters and n / best_of as SamplingParams fields (their ranges are checked with the rest of
        the sampling parameters: SamplingParams.validate)."""
        for name in ("n", "best_of"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be at least 1, got {getattr(self, name)}")
        logit_bias = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}") from None
            if not 0 <= token <= INT32:
                raise InvalidRequest(f"logit_bias token ids must be in 0..{INT32}, got {token}")
            logit_bias[token] = bias
        wire_text(*self.bad_words or [])
        if self.stream and (self.best_of or 1) > self.choices:
            raise InvalidRequest("best_of > n cannot be streamed: the n best are known only once every sample has "
                                 "finished; send stream: false, or best_of = n")
        given = {name: getattr(self, name) for name in ("presence_penalty", "frequency_penalty", "repetition_penalty",
                                                        "min_p", "min_tokens", "n", "best_of")}
        return {**{k: v for k, v in given.items() if v is not None}, "logit_bias": logit_bias,
                "bad_words": tuple(self.bad_words or ())}

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        """The sampling parameters as asked (max_tokens None: not given), checked by the core."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        wire_text(*stop)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,  # -1 = off, as vLLM has it
            seed=None if self.seed is None else self.seed % 2**64,
            stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            **self.penalties(), structured=self.structured())


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int32 | None = None
    logprobs: StrictBool | None = None
    top_logprobs: TopK | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    def tool_mode(self) -> tuple[str, str]:
        """(none | auto | required | named, the named function)."""
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        return check_tools(self.tool_dicts(), choice)

    def tool_dicts(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def to_sampling(self) -> SamplingParams:
        params = self.sampling(self.max_completion_tokens if self.max_completion_tokens is not None
                               else self.max_tokens)
        mode, name = self.tool_mode()
        if mode in ("required", "named"):  # enforced by structured output: the JSON of the call(s)
            if params.structured is not None:
                raise InvalidRequest(f"tool_choice {self.tool_choice if mode == 'required' else 'function'} "
                                     "constrains the output: send it without response_format / guided_*")
            parallel = self.parallel_tool_calls is not False
            params.structured = Structured("json_schema", call_schema(self.tool_dicts(), mode, name, parallel))
        params.logprobs = bool(self.logprobs)
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise InvalidRequest("top_logprobs needs logprobs: true")
            params.top_logprobs = self.top_logprobs
        return params


TokenIds = list[Annotated[StrictInt, Field(ge=0, le=INT32)]]


class CompletionRequest(Common):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: Int32 | None = 16  # OpenAI's default for completions
    logprobs: TopK | None = None  # legacy: the top-k to return; 0 = the chosen tokens' only
    echo: StrictBool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p or len(p) > MAX_PROMPTS:
            raise InvalidRequest(f"prompt must be a string, token ids, or a list of 1..{MAX_PROMPTS} of them")
        return list(p)

    def to_sampling(self) -> SamplingParams:
        params = self.sampling(self.max_tokens)
        if self.logprobs is not None:
            params.logprobs, params.top_logprobs = True, self.logprobs
            params.prompt_logprobs = self.echo
        return params


def parse(model: type[Common], body: Any) -> Common:
    """The request model from a decoded JSON body; InvalidRequest naming each bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        first: dict[str, str] = {}  # a union reports each alternative: say the first per field
        for e in exc.errors():
            first.setdefault(_where(e["loc"]), _describe(e))
        raise InvalidRequest("; ".join(list(first.values())[:5])) from None
    req.refuse_unsupported()
    return req


def _where(loc: tuple) -> str:
    """('messages', 0, 'role') -> messages.0.role, without the union branches pydantic names in between."""
    return ".".join(str(x) for x in loc if isinstance(x, int) or (x.isidentifier() and x not in TYPE_NAMES))


def _describe(error: dict) -> str:
    where = _where(error["loc"])
    value = error.get("input")
    shown = json.dumps(value)[:60] if isinstance(value, int | float | str | bool) else type(value).__name__
    if error["type"] == "extra_forbidden":
        return f"unsupported field '{where}'"
    return f"'{where or 'body'}': {error['msg']} (got {shown})"
