"""openai_wire: the pre-encoded chunks equal, parsed, the objects OpenAI's format describes, for
any text (quotes, newlines, emoji, U+2028, a lone surrogate), and the completion gathers deltas."""

from __future__ import annotations

import json

import pytest

from nexlm.openai_wire import ChunkStream, Completion, error_chunk
from nexlm.providers.base import ReasoningDelta, TextDelta, ToolCallDelta

TEXTS = ["plain", 'quo"te\\', "line\nbreak\t", "emoji 😀 é 中", "\u2028\u2029", "lone \ud83d surrogate", ""]


def parsed(frame: bytes) -> dict:
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n\n") == 1
    return json.loads(frame[6:-2].decode("utf-8"))


def expected(enc: ChunkStream, delta: dict, finish=None) -> dict:
    return {"id": enc.id, "object": "chat.completion.chunk", "created": enc.created, "model": enc.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], "usage": None}


@pytest.mark.parametrize("text", TEXTS)
def test_text_and_reasoning_chunks(text):
    enc = ChunkStream("p/m \"x\"", cid="chatcmpl-1", created=1700000000)
    # (a lone surrogate, which orjson refuses, goes out \u-escaped: valid UTF-8, read back the same)
    assert parsed(enc.text(text)) == expected(enc, {"content": text})
    assert parsed(enc.reasoning(text)) == expected(enc, {"reasoning_content": text})
    assert enc.event(TextDelta(text)) == enc.text(text)
    assert enc.event(ReasoningDelta(text)) == enc.reasoning(text)


def test_role_finish_usage_and_tool_chunks():
    enc = ChunkStream("p/m")
    assert parsed(enc.role()) == expected(enc, {"role": "assistant", "content": ""})
    assert parsed(enc.finish("tool_calls")) == expected(enc, {}, "tool_calls")
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    last = parsed(enc.usage(usage))
    assert last["choices"] == [] and last["usage"] == usage and last["id"] == enc.id
    first = parsed(enc.event(ToolCallDelta(0, "call_1", "f", "")))
    assert first["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    piece = parsed(enc.event(ToolCallDelta(0, None, None, '{"a": "\\n"}')))
    assert piece["choices"][0]["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": "\\n"}'}}]}
    assert json.loads(error_chunk({"message": "m", "type": "server_error", "param": None, "code": "x"})[6:]) == \
        {"error": {"message": "m", "type": "server_error", "param": None, "code": "x"}}


def test_completion_gathers_text_reasoning_and_calls():
    acc = Completion()
    for ev in (ReasoningDelta("think"), TextDelta("Hel"), TextDelta("lo"), ToolCallDelta(1, "c2", "g", "{"),
               ToolCallDelta(0, "c1", "f", ""), ToolCallDelta(0, None, None, "{}"), ToolCallDelta(1, None, None, "}")):
        acc.add(ev)
    body = json.loads(acc.body("p/m", "tool_calls", None))
    msg = body["choices"][0]["message"]
    assert msg["content"] == "Hello" and msg["reasoning_content"] == "think"
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == \
        [("c1", "f", "{}"), ("c2", "g", "{}")]
    assert body["choices"][0]["finish_reason"] == "tool_calls" and body["usage"] is None
    empty = json.loads(Completion().body("p/m", None, None))["choices"][0]
    assert empty["message"]["content"] == "" and "tool_calls" not in empty["message"]
