"""Tool calling, shared by both fronts: rendering the tools and the tool turns of a conversation, the JSON
schema that enforces `tool_choice` required / a named function, and parsing Hermes-style calls.

Rendering: a model whose chat template has a tools section (Qwen2.5's) gets the tools through it
(`apply_chat_template(tools=...)`), with assistant `tool_calls` and `role: tool` messages as the template
takes them. A template without one (the embedded SmolLM2's) gets DEFAULT_TOOL_PROMPT — the Hermes prompt
Qwen2.5's template writes — appended to the system message, assistant calls written as
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` and tool results as a user turn of
`<tool_response>...</tool_response>`, the same text Qwen2.5's template renders.

`tool_choice`: `none` renders no tools; `auto` parses `<tool_call>{...}</tool_call>` blocks out of the output
(`message.tool_calls`, finish_reason `tool_calls`); `required` and a named function constrain the output with
structured output to the JSON of the call(s) (a list of calls with `parallel_tool_calls`, else one), so even
the 135M model returns a valid call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.common.sampling import InvalidRequest

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
DEFAULT_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")
DEFAULT_SYSTEM = "You are a helpful assistant."
TOOL_ROLES = ("system", "user", "assistant", "tool")


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


def check_tools(tools: list[dict[str, Any]], choice: str | dict | None) -> tuple[str, str]:
    """(mode, name): mode in none | auto | required | named; name of the named function. InvalidRequest on a
    choice that names no given function or needs tools that were not sent."""
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: function names must be unique")
    if choice is None:
        return ("auto" if tools else "none"), ""
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name", "")
        if name not in names:
            raise InvalidRequest(f"tool_choice names function {name!r}, which is not in tools")
        return "named", name
    if choice in ("auto", "required") and not tools:
        raise InvalidRequest(f"tool_choice {choice!r} needs at least one function in tools")
    return choice, ""


def call_schema(tools: list[dict[str, Any]], mode: str, name: str, parallel: bool) -> str:
    """The JSON schema of the output that `required` / a named function forces: {"name", "arguments"} per
    call; a list of them (at least one) for `required` with parallel_tool_calls."""
    def one(fn: dict[str, Any]) -> dict[str, Any]:
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"], "additionalProperties": False}

    fns = [t["function"] for t in tools if mode != "named" or t["function"]["name"] == name]
    call = one(fns[0]) if len(fns) == 1 else {"anyOf": [one(f) for f in fns]}
    if mode == "required" and parallel:
        return json.dumps({"type": "array", "items": call, "minItems": 1})
    return json.dumps(call)


def forced_calls(text: str) -> list[ToolCall]:
    """The calls of a `required` / named output (JSON of one call or a list of them)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    return [ToolCall(c["name"], json.dumps(c.get("arguments", {}), ensure_ascii=False))
            for c in items if isinstance(c, dict) and isinstance(c.get("name"), str)]


def parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    """(content outside the calls, the calls) of an `auto` output; a block that is not a JSON call stays text."""
    calls: list[ToolCall] = []
    content: list[str] = []
    rest = text
    while (start := rest.find(TOOL_CALL_OPEN)) != -1:
        end = rest.find(TOOL_CALL_CLOSE, start)
        body = rest[start + len(TOOL_CALL_OPEN) : end if end != -1 else len(rest)]
        found = forced_calls(body.strip())
        if not found:
            break
        content.append(rest[:start])
        calls += found
        rest = rest[end + len(TOOL_CALL_CLOSE) :] if end != -1 else ""
    content.append(rest)
    return "".join(content).strip() if calls else text, calls


class HermesStream:
    """Streaming `auto`: content deltas pass through, except text that may open a <tool_call>, which waits;
    each complete block comes out as its ToolCall."""

    def __init__(self) -> None:
        self.buffer = ""
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            start = self.buffer.find(TOOL_CALL_OPEN)
            if start == -1:
                keep = _partial_suffix(self.buffer, TOOL_CALL_OPEN)
                out.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            end = self.buffer.find(TOOL_CALL_CLOSE, start)
            if end == -1:
                out.append(self.buffer[:start])
                self.buffer = self.buffer[start:]
                break
            found = forced_calls(self.buffer[start + len(TOOL_CALL_OPEN) : end].strip())
            out.append(self.buffer[:start] if found else self.buffer[: end + len(TOOL_CALL_CLOSE)])
            calls += found
            self.buffer = self.buffer[end + len(TOOL_CALL_CLOSE) :]
        self.calls += len(calls)
        return "".join(out), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: an unclosed block that holds a whole call is a call, anything else text."""
        text, self.buffer = self.buffer, ""
        if text.startswith(TOOL_CALL_OPEN) and (found := forced_calls(text[len(TOOL_CALL_OPEN) :].strip())):
            self.calls += len(found)
            return "", found
        return text, []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The prompt text of a conversation with tools and tool turns (see the module docstring)."""
    try:
        return _render(tokenizer, messages, tools)
    except Exception as exc:  # a template that refuses the conversation (jinja raise_exception, bad types)
        raise InvalidRequest(f"the chat template cannot render these messages: {exc}") from None


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    template = tokenizer.chat_template or ""
    if "tools" in template:  # the model's own tool format
        for m in messages:  # templates read the arguments as a mapping
            for c in m.get("tool_calls") or ():
                c["function"]["arguments"] = _arguments(c["function"].get("arguments"))
        return tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                             tokenize=False)
    chat: list[dict[str, str]] = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [f"{TOOL_CALL_OPEN}\n" + json.dumps(
                {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))},
                ensure_ascii=False) + f"\n{TOOL_CALL_CLOSE}" for c in m["tool_calls"]]
            chat.append({"role": "assistant", "content": "\n".join([content, *blocks] if content else blocks)})
        elif m["role"] == "tool":
            text = f"<tool_response>\n{content}\n</tool_response>"
            if chat and chat[-1]["role"] == "user" and chat[-1]["content"].startswith("<tool_response>"):
                chat[-1]["content"] += "\n" + text  # consecutive results share one user turn, as Qwen2.5's
            else:
                chat.append({"role": "user", "content": text})
        else:
            chat.append({"role": m["role"], "content": content})
    if tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = DEFAULT_TOOL_PROMPT.format(tools=listed)
        if chat and chat[0]["role"] == "system":
            chat[0] = {"role": "system", "content": chat[0]["content"] + prompt}
        else:
            chat.insert(0, {"role": "system", "content": DEFAULT_SYSTEM + prompt})
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def _arguments(arguments: Any) -> Any:
    """A call's arguments as JSON (OpenAI sends them as a JSON string)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments or {}


def openai_calls(calls: list[ToolCall], stream: bool = False, first: int = 0) -> list[dict[str, Any]]:
    """OpenAI's message.tool_calls (stream: delta.tool_calls, each with its index)."""
    out = []
    for i, c in enumerate(calls):
        entry = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        out.append({"index": first + i, **entry} if stream else entry)
    return out


class ToolOutput:
    """A chat request's tool calls out of its choices' text: whole messages, or stream deltas per choice."""

    def __init__(self, mode: str, parallel: bool) -> None:
        self.mode, self.parallel = mode, parallel
        self.streams: dict[int, HermesStream] = {}
        self.buffers: dict[int, str] = {}

    def _reason(self, calls: int, reason: str | None) -> str | None:
        if not calls or reason is None:
            return reason
        return "stop" if self.mode == "named" else "tool_calls"  # OpenAI: a named function ends with "stop"

    def _limit(self, calls: list[ToolCall], before: int) -> list[ToolCall]:
        return calls if self.parallel else calls[: max(0, 1 - before)]

    def message(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        if self.mode == "auto":
            content, calls = parse_hermes(text)
        else:
            calls = forced_calls(text)
            content = "" if calls else text
        calls = self._limit(calls, 0)
        msg: dict[str, Any] = {"role": "assistant", "content": (content or None) if calls else text}
        if calls:
            msg["tool_calls"] = openai_calls(calls)
        return msg, self._reason(len(calls), reason)

    def delta(self, index: int, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        stream = self.streams.setdefault(index, HermesStream())
        before = stream.calls
        if self.mode == "auto":
            content, calls = stream.feed(text)
            if reason is not None:
                tail, more = stream.finish()
                content, calls = content + tail, calls + more
        else:  # the output is the calls' JSON: it goes out whole, at the end
            self.buffers[index] = self.buffers.get(index, "") + text
            content, calls = "", forced_calls(self.buffers[index]) if reason is not None else []
            stream.calls += len(calls)
        calls = self._limit(calls, before)
        delta: dict[str, Any] = {"content": content}
        if calls:
            delta["tool_calls"] = openai_calls(calls, stream=True, first=before)
        return delta, self._reason(stream.calls, reason)


def from_proto(request: Any) -> tuple[list[dict[str, Any]], str, str, bool] | None:
    """A GenerateRequest's tools as OpenAI dicts, its mode (none | auto | required | named), the named function
    and parallel_tool_calls; None when it neither sends tools nor has tool turns."""
    if not (request.tools or request.tool_choice or request.tool_name
            or any(m.tool_calls or m.role == "tool" for m in request.messages)):
        return None
    if request.prompt:
        raise InvalidRequest("tools and tool turns need chat messages, not a raw prompt")
    tools = []
    for t in request.tools:
        if not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", t.name):
            raise InvalidRequest(f"tool name {t.name!r}: use 1..64 letters, digits, '_' or '-'")
        try:
            params = json.loads(t.parameters) if t.parameters else {"type": "object", "properties": {}}
        except ValueError as exc:
            raise InvalidRequest(f"tool {t.name!r}: parameters is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise InvalidRequest(f"tool {t.name!r}: parameters must be a JSON schema object")
        fn = {"name": t.name, "parameters": params}
        if t.description:
            fn["description"] = t.description
        tools.append({"type": "function", "function": fn})
    if request.tool_choice not in ("", "none", "auto", "required"):
        raise InvalidRequest(f"tool_choice {request.tool_choice!r}: use none, auto or required (or tool_name)")
    choice = {"type": "function", "function": {"name": request.tool_name}} if request.tool_name \
        else (request.tool_choice or None)
    mode, name = check_tools(tools, choice)
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    return tools, mode, name, parallel


def messages_from_proto(messages: Any) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        if m.role not in TOOL_ROLES:
            raise InvalidRequest(f"messages[{i}].role is {m.role!r}: use one of {', '.join(TOOL_ROLES)}")
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out
