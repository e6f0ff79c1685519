"""Tool calling's parts without a server: Hermes parsing (whole and streamed), the enforced calls' schema,
rendering of tools and tool turns with a template that has no tools section (SmolLM2's) and with one that has."""

from __future__ import annotations

import json

import pytest

from services.common.sampling import InvalidRequest
from services.gateway.tools import HermesStream, ToolOutput, call_schema, check_tools, parse_hermes, render

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_hermes_calls_parsed_whole_and_streamed_in_any_split():
    text = f"Let me check. {CALL}{CALL.replace('Paris', 'Oslo')}"
    content, calls = parse_hermes(text)
    assert content == "Let me check." and [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Oslo"]
    assert parse_hermes("no calls <tool_call> here") == ("no calls <tool_call> here", [])
    for size in (1, 3, 7, 1000):
        stream, got, found = HermesStream(), "", []
        for i in range(0, len(text), size):
            c, k = stream.feed(text[i : i + size])
            got, found = got + c, found + k
        c, k = stream.finish()
        assert (got + c).strip() == "Let me check." and [x.name for x in found + k] == ["get_weather"] * 2
    out = ToolOutput("auto", parallel=False)
    message, reason = out.message(text, "stop")
    assert len(message["tool_calls"]) == 1 and reason == "tool_calls" and message["content"] == "Let me check."
    assert ToolOutput("auto", True).message("Just text.", "stop") == ({"role": "assistant", "content": "Just text."},
                                                                      "stop")


def test_choice_checks_and_enforced_schema():
    tools = [WEATHER, TIME]
    assert check_tools(tools, None) == ("auto", "") and check_tools([], None) == ("none", "")
    assert check_tools(tools, {"type": "function", "function": {"name": "get_time"}}) == ("named", "get_time")
    with pytest.raises(InvalidRequest, match="not in tools"):
        check_tools(tools, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidRequest, match="needs at least one function"):
        check_tools([], "required")
    schema = json.loads(call_schema(tools, "required", "", parallel=True))
    assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2
    named = json.loads(call_schema(tools, "named", "get_weather", parallel=True))
    assert named["properties"]["name"] == {"const": "get_weather"} and named["properties"]["arguments"]["required"]


def test_render_without_and_with_a_tools_template():
    from services.common.model_loader import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"}]
    text = render(tok, messages, [WEATHER])
    assert "<tools>" in text and '"get_weather"' in text and "<tool_response>\n18 C, sunny\n</tool_response>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert text.endswith("<|im_start|>assistant\n")

    class Templated:  # a template with a tools section gets the tools itself
        chat_template = ("{% for t in tools %}T:{{ t.function.name }};{% endfor %}"
                         "{{ messages[1].tool_calls[0].function.arguments.city }}")

        def apply_chat_template(self, messages, tools=None, **_):
            import jinja2

            return jinja2.Template(self.chat_template).render(messages=messages, tools=tools)

    assert render(Templated(), json.loads(json.dumps(messages)), [WEATHER]) == "T:get_weather;Paris"
