"""A Responses request as a chat request: input items, instructions, tools, parameters, refusals."""

from __future__ import annotations

import pytest

from nexlm.config import LimitsConfig
from nexlm.transports.v1.responses_request import InvalidRequest, parse_request

LIMITS = LimitsConfig()


def parse(**body):
    return parse_request({"model": "openai/gpt-4o-mini", **body}, LIMITS)


def refused(**body) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse(**body)
    assert info.value.status == 400
    return info.value


def test_a_string_input_with_instructions():
    r = parse(input="Hi", instructions="Be brief.", max_output_tokens=50, temperature=0.2, top_p=0.9, stream=True)
    assert r.model == "openai/gpt-4o-mini" and r.stream is True
    assert r.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert r.params == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 50}
    assert r.extra == {}
    assert r.echo["instructions"] == "Be brief." and r.echo["max_output_tokens"] == 50
    assert parse(input="Hi").stream is False


def test_items_become_chat_messages():
    """A whole Codex-style conversation: messages with parts, a call, its output, a reasoning item."""
    r = parse(input=[
        {"role": "developer", "content": "You are a shell assistant."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List files"},
                                                         {"type": "input_text", "text": "please"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Running ls."}]},
        {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": '{"cmd":"ls"}'},
        {"type": "function_call", "call_id": "call_2", "name": "shell", "arguments": '{"cmd":"pwd"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "a.txt"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "/w"}]},
        {"type": "function_call", "call_id": "call_3", "name": "shell", "arguments": ""},
    ])
    assert r.messages == [
        {"role": "system", "content": "You are a shell assistant."},
        {"role": "user", "content": "List files\nplease"},
        {"role": "assistant", "content": "Running ls.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": '{"cmd":"ls"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "shell", "arguments": '{"cmd":"pwd"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.txt"},
        {"role": "tool", "tool_call_id": "call_2", "content": "/w"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "shell", "arguments": ""}}]},
    ]


def test_an_image_part_stays_a_part():
    r = parse(input=[{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                                  {"type": "input_image", "image_url": "data:image/png;base64,AA"}]}])
    assert r.messages[0]["content"] == [{"type": "text", "text": "What is this?"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]


def test_function_tools_are_nested_and_tool_choice_translated():
    tool = {"type": "function", "name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}, "strict": True}
    r = parse(input="Weather?", tools=[tool], tool_choice={"type": "function", "name": "get_weather"},
              parallel_tool_calls=False, user="u1")
    assert r.extra == {
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather", "parameters": tool["parameters"],
            "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "user": "u1"}
    assert r.echo["tools"] == [tool] and r.echo["parallel_tool_calls"] is False
    assert parse(input="x", tool_choice="required").extra == {"tool_choice": "required"}


def test_text_format_becomes_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    r = parse(input="x", text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    assert r.extra["response_format"] == {"type": "json_schema",
                                          "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    assert "response_format" not in parse(input="x", text={"format": {"type": "text"}, "verbosity": "low"}).extra


def test_store_false_and_omitted_are_fine_true_and_previous_response_are_refused():
    assert parse(input="x", store=False).messages and parse(input="x").messages
    e = refused(input="x", store=True)
    assert e.param == "store" and "does not store responses" in e.message
    e = refused(input="x", previous_response_id="resp_1", store=False)
    assert e.param == "previous_response_id" and "does not store responses" in e.message
    assert refused(input="x", background=True).param == "background"
    assert refused(input="x", conversation="conv_1").param == "conversation"


def test_unknown_fields_are_named_harmless_ones_accepted():
    e = refused(input="x", frobnicate=1, zzz=2)
    assert "frobnicate" in e.message and "zzz" in e.message and e.param == "frobnicate"
    r = parse(input="x", store=False, metadata={"k": "v"}, include=["reasoning.encrypted_content"],
              reasoning={"effort": "low"}, truncation="auto", stream_options={"include_obfuscation": False},
              prompt_cache_key="abc")
    assert r.messages == [{"role": "user", "content": "x"}] and r.extra == {}
    assert r.echo["metadata"] == {"k": "v"}


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tools": [{"type": "function"}]}, "tools[0].name"),
    ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"type": "computer_call"}]}, "input[0]"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": 5}, "input"),
    ({"input": []}, "input"),
    ({"instructions": "only instructions", "input": []}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 10**9}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": "high"}, "top_p"),
    ({"stream": "yes"}, "stream"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
])
def test_bad_fields_are_refused_with_their_name(body, param):
    body.setdefault("input", "x")
    e = refused(**body)
    assert e.param == param
    assert e.message


def test_model_is_required():
    with pytest.raises(InvalidRequest) as info:
        parse_request({"input": "x"}, LIMITS)
    assert info.value.param == "model"
    with pytest.raises(InvalidRequest):
        parse_request(["not", "an", "object"], LIMITS)


def test_max_output_tokens_message_names_the_responses_field():
    e = refused(input="x", max_output_tokens=0)
    assert "max_output_tokens" in e.message and "max_tokens " not in e.message
