"""The Responses event encoder, checked against OpenAI's own stream (the fixtures) and parsed
with the official ``openai`` package's types and its stream accumulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from nexlm.responses_wire import ResponseWriter, usage

FIXTURES = Path(__file__).parent / "fixtures"
EVENTS = TypeAdapter(ResponseStreamEvent)


def frames(raw: bytes) -> list[tuple[str, dict]]:
    """(event line, parsed data) per SSE frame; every frame must have both and agree on the type."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        data = json.loads(lines[1][6:])
        assert data["type"] == lines[0][7:]
        out.append((lines[0][7:], data))
    return out


def sdk_final(raw: bytes, tools=()) -> Response | None:
    """What the SDK's stream helper (``client.responses.stream``) accumulates from these bytes."""
    state = ResponseStreamState(input_tools=list(tools), text_format=omit)
    for _, data in frames(raw):
        state.handle_event(EVENTS.validate_python(data))
    return state._completed_response


def normalise_ids(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """Our events with our generated ids replaced by the fixture's (ids are random by design)."""
    mapping = {}

    def walk(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                if k in b:
                    if k in ("id", "item_id") and isinstance(a[k], str) and isinstance(b[k], str):
                        mapping[a[k]] = b[k]
                    walk(a[k], b[k])
        elif isinstance(a, list) and isinstance(b, list):
            for x, y in zip(a, b):
                walk(x, y)

    walk(ours, theirs)
    text = json.dumps(ours)
    for k, v in mapping.items():
        text = text.replace(k, v)
    return json.loads(text)


def fixture_writer(fixture: list[dict], tools=()) -> ResponseWriter:
    r = fixture[0]["response"]
    echo = {"temperature": r["temperature"], "top_p": r["top_p"], "tools": list(tools),
            "tool_choice": "auto", "parallel_tool_calls": True, "metadata": {}, "text": {"format": {"type": "text"}}}
    return ResponseWriter(r["model"], echo, stream=True, created_at=r["created_at"])


def test_text_stream_equals_openais_event_for_event():
    fixture = [d for _, d in frames((FIXTURES / "responses-text-stream.txt").read_bytes())]
    w = fixture_writer(fixture)
    raw = w.start()
    for ev in fixture:
        if ev["type"] == "response.output_text.delta":
            raw += w.text(ev["delta"])
    raw += w.end("stop", {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19})
    ours = [d for _, d in frames(raw)]
    assert [e["type"] for e in ours] == [e["type"] for e in fixture]
    assert normalise_ids(ours, fixture) == fixture
    for e in ours:
        EVENTS.validate_python(e)
    final = sdk_final(raw)
    assert final.output_text == "Hello! How can I help?"
    assert final.usage.total_tokens == 19


def test_function_call_stream_equals_openais_event_for_event():
    fixture = [d for _, d in frames((FIXTURES / "responses-function-call-stream.txt").read_bytes())]
    tools = fixture[0]["response"]["tools"]
    w = fixture_writer(fixture, tools)
    raw = w.start()
    added = fixture[2]["item"]
    raw += w.tool_call(0, added["call_id"], added["name"], "")
    for ev in fixture:
        if ev["type"] == "response.function_call_arguments.delta":
            raw += w.tool_call(0, None, None, ev["delta"])
    raw += w.end("tool_calls", {"prompt_tokens": 61, "completion_tokens": 18, "total_tokens": 79})
    ours = [d for _, d in frames(raw)]
    assert normalise_ids(ours, fixture) == fixture
    final = sdk_final(raw, tools)
    call = final.output[0]
    assert (call.type, call.call_id, call.name, call.arguments) == (
        "function_call", "call_Wq1A9", "get_weather", '{"location":"Paris"}')


def test_reasoning_then_text_then_two_calls_parse_with_the_sdks_types():
    w = ResponseWriter("local/m", {}, stream=True)
    raw = w.start() + w.reasoning("Let me ") + w.reasoning("think.") + w.text("Calling.")
    raw += w.tool_call(0, "call_a", "get_weather", '{"location":') + w.tool_call(1, "call_b", "get_time", "")
    raw += w.tool_call(0, None, None, '"Paris"}') + w.tool_call(1, None, None, '{"tz":"UTC"}')
    raw += w.end("tool_calls", None)
    events = [EVENTS.validate_python(d) for _, d in frames(raw)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.reasoning_text.done") \
        < kinds.index("response.output_text.delta")
    final = sdk_final(raw)
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call", "function_call"]
    assert final.output[0].content[0].text == "Let me think."
    assert final.output_text == "Calling."
    assert [(o.call_id, o.arguments) for o in final.output[2:]] == [
        ("call_a", '{"location":"Paris"}'), ("call_b", '{"tz":"UTC"}')]
    assert final.usage is None


def test_length_ends_incomplete_with_max_output_tokens():
    w = ResponseWriter("m", {"max_output_tokens": 2}, stream=True)
    raw = w.start() + w.text("Hi") + w.text(" th") + w.end("length", {"prompt_tokens": 3, "completion_tokens": 2})
    last = EVENTS.validate_python(frames(raw)[-1][1])
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output[0].status == "incomplete"
    assert last.response.usage.total_tokens == 5


def test_a_failure_mid_stream_is_response_failed_with_an_error_object():
    w = ResponseWriter("m", {}, stream=True)
    raw = w.start() + w.text("par") + w.fail("rate_limited", "The upstream is rate limiting (429).")
    events = [EVENTS.validate_python(d) for _, d in frames(raw)]
    assert [e.type for e in events[-3:]] == ["response.content_part.done", "response.output_item.done",
                                            "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed"
    assert (failed.error.code, failed.error.message) == ("rate_limit_exceeded", "The upstream is rate limiting (429).")
    assert failed.output[0].content[0].text == "par"
    w2 = ResponseWriter("m", {}, stream=True)
    other = EVENTS.validate_python(frames(w2.start() + w2.fail("upstream_timeout", "slow"))[-1][1])
    assert other.response.error.code == "server_error" and other.response.output == []


def test_non_stream_writes_nothing_and_builds_the_response_object():
    w = ResponseWriter("openai/gpt-4o-mini", {"instructions": "Be brief.", "tools": []}, stream=False)
    assert w.start() + w.reasoning("hm") + w.text("Hello") + w.text(" world") == b""
    assert w.tool_call(0, "call_1", "f", "{}") == b""
    assert w.end("tool_calls", {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                "completion_tokens_details": {"reasoning_tokens": 1}}) == b""
    r = Response.model_validate(w.response())
    assert r.status == "completed" and r.output_text == "Hello world" and r.instructions == "Be brief."
    assert [o.type for o in r.output] == ["reasoning", "message", "function_call"]
    assert all(o.status == "completed" for o in r.output)
    assert r.usage.output_tokens_details.reasoning_tokens == 1
    assert r.id.startswith("resp_") and r.output[1].id.startswith("msg_") and r.output[2].id.startswith("fc_")


@pytest.mark.parametrize("text", ['quote " and \\ and \n newline', "中文", "\ud800 lone surrogate"])
def test_deltas_are_valid_json_for_any_text(text):
    w = ResponseWriter("m", {}, stream=True)
    raw = w.start() + w.text(text) + w.end("stop", None)
    deltas = [d for k, d in frames(raw) if k == "response.output_text.delta"]
    assert deltas[0]["delta"] == text  # a lone surrogate goes out as a JSON escape, which decodes back


def test_usage_mapping():
    assert usage(None) is None
    u = usage({"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 6},
               "completion_tokens_details": None})
    assert u == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 0},
                 "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 14}
    assert usage({"prompt_tokens": 2, "completion_tokens": 1, "prompt_cache_hit_tokens": 2}
                 )["input_tokens_details"]["cached_tokens"] == 2


def test_feed_takes_the_turns_own_events():
    from nexlm.providers.base import (
        Queued,
        ReasoningDelta,
        StreamError,
        TextDelta,
        ToolCallDelta,
    )

    w = ResponseWriter("m", {}, stream=True)
    raw = w.start() + w.feed(Queued(1)) + w.feed(ReasoningDelta("r")) + w.feed(TextDelta("t"))
    raw += w.feed(ToolCallDelta(0, "call_1", "f", '{"a":1}'))
    raw += w.feed(StreamError("upstream_error", "The upstream closed the connection."))
    events = [EVENTS.validate_python(d) for _, d in frames(raw)]
    assert [e.type for e in events if e.type.endswith(".delta")] == [
        "response.reasoning_text.delta", "response.output_text.delta", "response.function_call_arguments.delta"]
    assert events[-1].type == "response.failed"
    assert [o.status for o in events[-1].response.output] == ["completed", "completed", "incomplete"]
