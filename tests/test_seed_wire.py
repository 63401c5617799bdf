"""``seed_wire``: the seed's wire form, byte for byte, and what a spec-following SSE client reads back."""

from __future__ import annotations

import pytest

from nexlm import seed_wire, wire
from nexlm.providers.base import ReasoningDelta, StreamError, TextDelta
from nexlm.providers.sse import SSEDecoder
from nexlm.validation import ChatError


def read_back(data: bytes) -> list[tuple[str, str]]:
    return [(e.event, e.data) for e in SSEDecoder().feed(data)]


@pytest.mark.parametrize("text, wire_bytes", [
    ("Hello", b"data: Hello\n\n"),
    ("two\nlines", b"data: two\ndata: lines\n\n"),
    ("ends with a newline\n", b"data: ends with a newline\ndata: \n\n"),
    ("\n", b"data: \ndata: \n\n"),
    ("  indented", b"data:   indented\n\n"),
    ("cr\rcrlf\r\nlf", b"data: cr\ndata: crlf\ndata: lf\n\n"),
    ("data: looks like a field", b"data: data: looks like a field\n\n"),
    ("caf\u00e9 \u4f60\u597d", "data: caf\u00e9 \u4f60\u597d\n\n".encode()),
])
def test_sse_text_bytes_and_what_a_client_joins(text, wire_bytes):
    assert seed_wire.sse_text(text) == wire_bytes
    [(kind, data)] = read_back(wire_bytes)
    assert kind == "message" and data == text.replace("\r\n", "\n").replace("\r", "\n")


def test_empty_text_is_no_event_and_the_ends():
    assert seed_wire.sse_text("") == b""
    assert seed_wire.sse_done("stop", "fake/fake-model", None) == \
        b'event: done\ndata: {"finish_reason":"stop","model":"fake/fake-model","usage":null}\n\n'
    assert seed_wire.sse_error("Cannot reach X:\nrefused") == b"event: error\ndata: Cannot reach X:\ndata: refused\n\n"
    assert read_back(seed_wire.sse_error("oops")) == [("error", "oops")]


def test_frames_send_only_text_and_errors():
    f = seed_wire.Frames()
    assert f.encode({"type": "session", "session": "s", "model": "m", "params": {}, "history": [], "seq": 0}) is None
    assert f.encode(wire.error("unknown_model", "No model 'x'.")) == b"Error: No model 'x'."
    assert f.encode(wire.start("r1", "m")) is None
    assert f.encode(wire.reasoning("r1", "thinking")) is None
    assert f.encode(wire.status("r1", "queued", 1)) is None
    assert f.encode(wire.delta("r1", "Hi \ud800there")) == b"Hi ?there"  # a lone surrogate cannot be UTF-8
    assert f.encode(wire.error("upstream_error", "X failed", "r1")) == b"\n\nError: X failed"  # cuts a reply
    assert f.encode(wire.done("r1", "error", None, "m", {}, None)) is None
    assert f.encode(wire.error("busy", "Wait.")) == b"Error: Wait."  # after the reply: its own frame again


def test_commands_and_turn_events():
    assert seed_wire.command("plain text") == {"type": "chat", "message": "plain text"}
    assert seed_wire.command({"modelType": "deepseek", "message": "m", "token": "t"}) == \
        {"type": "chat", "message": "m", "model": "deepseek"}
    assert seed_wire.command({"modelType": "", "message": "m"})["model"] is None
    for bad in ([1], {"modelType": "x"}, 3, {"message": "m", "modelType": ["x"]}):
        with pytest.raises(ChatError):
            seed_wire.command(bad)
    assert seed_wire.text_of(TextDelta("a")) == "a"
    assert seed_wire.text_of(ReasoningDelta("a")) is None
    err = StreamError("upstream_error", "boom")
    assert seed_wire.failure_of(err) is err and seed_wire.failure_of(TextDelta("a")) is None
