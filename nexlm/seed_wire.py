"""The original NexLM's wire form of a reply (the seed article's page): plain text.

Another encoder of the same events ``nexlm.wire`` builds: on the seed's WebSocket each
answer delta is one text frame of raw text and a failure is one human-readable text
frame (the page appends every frame's text to its reply box, so nothing else is sent:
no ``session``, ``start`` or ``done``); on its event stream each delta is one event whose
``data:`` lines join back into the text. What the seed's clients send is read here too.
"""

from __future__ import annotations

import orjson

from .providers.base import StreamError, TextDelta
from .validation import ChatError


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "replace")  # a lone surrogate from an upstream: '?' rather than a bad frame


def error_text(message: str, mid_reply: bool = False) -> str:
    """A failure as the user reads it; on its own paragraph when it cuts a reply short."""
    return ("\n\n" if mid_reply else "") + "Error: " + message


class Frames:
    """One WebSocket connection's encoder: NexLM's events (``nexlm.wire``) as the seed's text
    frames, or ``None`` for events the seed had no frame for."""

    __slots__ = ("_mid",)

    def __init__(self) -> None:
        self._mid = False  # a reply's text has been sent and it has not ended

    def encode(self, event: dict) -> bytes | None:
        kind = event["type"]
        if kind == "delta":
            self._mid = True
            return _utf8(event["content"])
        if kind == "error":
            return _utf8(error_text(event["message"], self._mid))
        if kind in ("start", "done"):
            self._mid = False
        return None  # session, reasoning, status, pong: the seed's page would print them as text


def command(frame) -> dict:
    """A seed client's frame (parsed JSON, or text that is not JSON) as NexLM's chat command:
    ``{"modelType": MODEL, "message": TEXT, "token"?: TOKEN}``. ``modelType`` is a model id or
    alias, as the registry resolves them."""
    if isinstance(frame, str):
        return {"type": "chat", "message": frame}
    if not isinstance(frame, dict) or "message" not in frame:
        raise ChatError("bad_request", 'Send {"modelType": MODEL, "message": TEXT} (and "token" when '
                                       "access control is on).")
    model = frame.get("modelType")
    if model is not None and not isinstance(model, str):
        raise ChatError("bad_request", "modelType must be a string (a model id or alias)")
    return {"type": "chat", "message": frame["message"], "model": model if model != "" else None}


def text_of(event) -> str | None:
    """A stateless turn's event (``gateway``) as the seed's text: answer deltas only (it had no
    reasoning, tool calls or queue notices)."""
    return event.text if type(event) is TextDelta else None


def failure_of(event) -> StreamError | None:
    return event if type(event) is StreamError else None


def sse_text(text: str) -> bytes:
    """One delta as an event stream's message: each line of the text its own ``data:`` line, so
    the client's joined ``data`` is the text (SSE ends a line at CR, LF or CRLF: a CR comes
    back as LF). Empty text is no event at all (SSE would not dispatch it)."""
    if not text:
        return b""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return b"".join(b"data: " + _utf8(line) + b"\n" for line in lines) + b"\n"


def sse_done(finish: str | None, model: str, usage: dict | None) -> bytes:
    """The stream's end: ``event: done`` (its data, JSON, for clients that want to know more)."""
    data = orjson.dumps({"finish_reason": finish, "model": model, "usage": usage})
    return b"event: done\ndata: " + data + b"\n\n"


def sse_error(message: str) -> bytes:
    """A failure after the first token (before it, the answer is an HTTP status)."""
    return b"event: error\n" + sse_text(message)
