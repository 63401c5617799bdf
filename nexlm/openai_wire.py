"""Turn events as OpenAI's chat completion wire: stream chunks (bytes) and the whole completion.

The per-token path is one ``orjson.dumps`` of the delta's text between two byte strings
built once per stream (``ChunkStream``): no dict is made per token, and the chunk is
exactly what OpenAI sends (``chat.completion.chunk`` with ``id``, ``created``, ``model``,
``choices[0].delta`` / ``finish_reason``, ``usage: null`` until the optional last
usage chunk with ``choices: []``).
"""

from __future__ import annotations

import json
import secrets
import time

import orjson

from .providers.base import (
    Queued,
    ReasoningDelta,
    StreamError,
    TextDelta,
    ToolCallDelta,
)

# The turn events a /v1 door tells apart (re-exported: transports see the vocabulary, not the providers).
__all__ = ["DONE", "ChunkStream", "Completion", "Queued", "StreamError", "error_chunk", "model_object", "models_list"]

DONE = b"data: [DONE]\n\n"


def _dumps(value) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # a lone surrogate that got this far: escaped, not a failed reply
        return json.dumps(value).encode()


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_urlsafe(18)


class ChunkStream:
    """The chunks of one streamed completion, each ready to write."""

    __slots__ = ("_head", "_open", "_tail", "created", "id", "model")

    def __init__(self, model: str, cid: str | None = None, created: int | None = None) -> None:
        self.id = cid or completion_id()
        self.model = model
        self.created = int(time.time()) if created is None else created
        self._open = (b'data: {"id":' + _dumps(self.id) + b',"object":"chat.completion.chunk","created":'
                      + str(self.created).encode() + b',"model":' + _dumps(model)
                      + b',"system_fingerprint":null,"choices":')
        self._head = self._open + b'[{"index":0,"delta":'
        self._tail = b',"logprobs":null,"finish_reason":null}],"usage":null}\n\n'

    def role(self) -> bytes:
        """The first chunk: who speaks, before any content."""
        return self._head + b'{"role":"assistant","content":""}' + self._tail

    def text(self, text: str) -> bytes:
        return self._head + b'{"content":' + _dumps(text) + b"}" + self._tail

    def reasoning(self, text: str) -> bytes:
        return self._head + b'{"reasoning_content":' + _dumps(text) + b"}" + self._tail

    def tool_call(self, ev: ToolCallDelta) -> bytes:
        call: dict = {"index": ev.index}
        if ev.id is not None:
            call["id"] = ev.id
            call["type"] = "function"
        fn: dict = {"arguments": ev.arguments}
        if ev.name is not None:
            fn = {"name": ev.name, "arguments": ev.arguments}
        call["function"] = fn
        return self._head + b'{"tool_calls":[' + _dumps(call) + b"]}" + self._tail

    def event(self, ev) -> bytes | None:
        """A delta event's chunk; ``None`` for events that have none (``Queued``)."""
        kind = type(ev)
        if kind is TextDelta:
            return self.text(ev.text)
        if kind is ReasoningDelta:
            return self.reasoning(ev.text)
        if kind is ToolCallDelta:
            return self.tool_call(ev)
        return None

    def finish(self, reason: str) -> bytes:
        return (self._head + b'{},"logprobs":null,"finish_reason":' + _dumps(reason)
                + b'}],"usage":null}\n\n')

    def usage(self, usage: dict | None) -> bytes:
        """``stream_options.include_usage``: the last chunk, no choices, the token counts."""
        return self._open + b'[],"usage":' + _dumps(usage) + b"}\n\n"


def error_chunk(error: dict) -> bytes:
    """A failure after the stream started: the ``openai`` package raises ``APIError`` on it."""
    return b"data: " + _dumps({"error": error}) + b"\n\n"


class Completion:
    """A non-streamed completion, gathered from the turn's events."""

    __slots__ = ("calls", "reasoning", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict] = {}

    def add(self, ev) -> None:
        kind = type(ev)
        if kind is TextDelta:
            self.text.append(ev.text)
        elif kind is ReasoningDelta:
            self.reasoning.append(ev.text)
        elif kind is ToolCallDelta:
            call = self.calls.get(ev.index)
            if call is None:
                call = self.calls[ev.index] = {"id": ev.id or f"call_{ev.index}", "type": "function",
                                               "function": {"name": ev.name or "", "arguments": ""}}
            elif ev.id:
                call["id"] = ev.id
            if ev.name and not call["function"]["name"]:
                call["function"]["name"] = ev.name
            call["function"]["arguments"] += ev.arguments

    def body(self, model: str, finish: str | None, usage: dict | None) -> bytes:
        message: dict = {"role": "assistant", "content": "".join(self.text) if self.text or not self.calls else None,
                         "refusal": None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return _dumps({
            "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish or "stop"}],
            "usage": usage,
        })


def models_list(listing: dict) -> dict:
    """``GET /v1/models`` from the registry's listing: the same ids as ``/api/models``, those that
    can answer now (a program or Open WebUI offers every model it is given)."""
    return {"object": "list", "data": [model_object(m) for m in listing["models"] if m["available"]]}


def model_object(m: dict) -> dict:
    return {"id": m["id"], "object": "model", "created": 0, "owned_by": m["provider"]}
