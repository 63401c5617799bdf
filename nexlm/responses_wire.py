"""One turn's events in the Responses API's wire form: the event stream and the response object.

``ResponseWriter`` is fed a turn's deltas in order (``text``, ``reasoning``,
``tool_call``) and its end (``end`` or ``fail``); in streaming mode each call
returns the bytes to write (``event:``/``data:`` lines, a ``sequence_number`` on
every event, in the order and with the field names OpenAI sends), otherwise it
only accumulates and ``response()`` is the whole ``response`` object.

Output items follow the deltas: a run of text is one ``message`` item, a run of
reasoning one ``reasoning`` item (``response.reasoning_text.*``, as vLLM and
gpt-oss send it), each tool call (by its chat ``index``) one ``function_call``
item. A text or reasoning item closes when anything else arrives; function
calls stay open until the end (chat streams may interleave them).

A delta costs one ``orjson.dumps`` of its string between two pre-encoded
fragments: the rest of the event is fixed per item.
"""

from __future__ import annotations

import json
import secrets
import time

import orjson

from .events import encode
from .providers.base import (
    ReasoningDelta,
    StreamError,
    TextDelta,
    ToolCallDelta,
)

MESSAGE, REASONING, CALL = "message", "reasoning", "function_call"
# finish_reason -> (status, incomplete_details.reason)
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
# NexLM's failure codes -> the Responses API's error codes (the SDK's ResponseError.code values)
ERROR_CODES = {"rate_limited": "rate_limit_exceeded"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _str(value: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # a lone surrogate: ASCII escapes always encode
        return json.dumps(value).encode()


def usage(u: dict | None) -> dict | None:
    """Chat completions usage (prompt/completion tokens) as Responses usage (input/output tokens)."""
    if not isinstance(u, dict):
        return None

    def n(value) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    pd = u.get("prompt_tokens_details") if isinstance(u.get("prompt_tokens_details"), dict) else {}
    cd = u.get("completion_tokens_details") if isinstance(u.get("completion_tokens_details"), dict) else {}
    inp, out = n(u.get("prompt_tokens")), n(u.get("completion_tokens"))
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": n(pd.get("cached_tokens") or u.get("prompt_cache_hit_tokens")),
                                 "cache_write_tokens": 0},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": n(cd.get("reasoning_tokens"))},
        "total_tokens": n(u.get("total_tokens")) or inp + out,
    }


class _Item:
    __slots__ = ("call_id", "id", "index", "kind", "name", "pieces", "prefix", "status", "suffix")

    def __init__(self, kind: str, index: int, call_id: str = "", name: str = "") -> None:
        self.kind = kind
        self.id = new_id({MESSAGE: "msg", REASONING: "rs", CALL: "fc"}[kind])
        self.index = index
        self.pieces: list[str] = []
        self.call_id, self.name = call_id, name
        self.status = "in_progress"
        where = f'"item_id":"{self.id}","output_index":{index},'
        if kind == MESSAGE:
            self.prefix = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                           + where.encode() + b'"content_index":0,"delta":')
            self.suffix = b',"logprobs":[],"sequence_number":'
        elif kind == REASONING:
            self.prefix = (b'event: response.reasoning_text.delta\ndata: {"type":"response.reasoning_text.delta",'
                           + where.encode() + b'"content_index":0,"delta":')
            self.suffix = b',"sequence_number":'
        else:
            self.prefix = (b'event: response.function_call_arguments.delta\ndata: '
                           b'{"type":"response.function_call_arguments.delta",'
                           + where.encode() + b'"delta":')
            self.suffix = b',"sequence_number":'

    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def part(self, text: str = "") -> dict:
        if self.kind == MESSAGE:
            return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        return {"type": "reasoning_text", "text": text}

    def public(self, empty: bool = False) -> dict:
        """The output item; ``empty``: as ``output_item.added`` shows it, before any content."""
        if self.kind == MESSAGE:
            return {"id": self.id, "type": "message", "status": self.status, "role": "assistant",
                    "content": [] if empty else [self.part(self.text())]}
        if self.kind == REASONING:
            return {"id": self.id, "type": "reasoning", "summary": [],
                    "content": [] if empty else [self.part(self.text())], "status": self.status}
        return {"id": self.id, "type": "function_call", "status": self.status,
                "arguments": "" if empty else self.text(), "call_id": self.call_id, "name": self.name}


class ResponseWriter:
    """One response. ``stream=True``: every method returns the bytes to send (``start`` first);
    ``stream=False``: they return ``b""`` and ``response()`` is the answer."""

    __slots__ = (
        "_calls",
        "_open",
        "created_at",
        "echo",
        "error",
        "id",
        "incomplete",
        "items",
        "model",
        "seq",
        "status",
        "usage",
        "wire",
    )

    def __init__(self, model: str, echo: dict, stream: bool = True, created_at: int | None = None) -> None:
        self.id = new_id("resp")
        self.model = model
        self.echo = echo
        self.created_at = int(time.time()) if created_at is None else created_at
        self.wire = stream
        self.seq = 0
        self.items: list[_Item] = []
        self._open: _Item | None = None  # the text or reasoning item deltas go to
        self._calls: dict[int, _Item] = {}  # open function_call items by the chat stream's tool call index
        self.status = "in_progress"
        self.error: dict | None = None
        self.incomplete: dict | None = None
        self.usage: dict | None = None

    # -- the events -------------------------------------------------------------------------

    def _event(self, kind: str, ev: dict) -> bytes:
        if not self.wire:
            return b""
        ev["sequence_number"] = self.seq
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + encode(ev) + b"\n\n"

    def _delta(self, item: _Item, text: str) -> bytes:
        seq = self.seq
        self.seq = seq + 1
        return item.prefix + _str(text) + item.suffix + str(seq).encode() + b"}\n\n"

    def start(self) -> bytes:
        """``response.created`` and ``response.in_progress``."""
        out = self._event("response.created", {"type": "response.created", "response": self.response()})
        return out + self._event("response.in_progress", {"type": "response.in_progress",
                                                          "response": self.response()})

    def feed(self, ev) -> bytes:
        """One turn event: a delta (``TextDelta``, ``ReasoningDelta``, ``ToolCallDelta``) or the
        ``StreamError`` that ends it (``response.failed``); ``Queued`` notices have no event here."""
        kind = type(ev)
        if kind is TextDelta:
            return self.text(ev.text)
        if kind is ReasoningDelta:
            return self.reasoning(ev.text)
        if kind is ToolCallDelta:
            return self.tool_call(ev.index, ev.id, ev.name, ev.arguments)
        if kind is StreamError:
            return self.fail(ev.code, ev.message)
        return b""

    def text(self, text: str) -> bytes:
        item = self._open
        out = b""
        if item is None or item.kind != MESSAGE:
            out = self._begin(MESSAGE)
            item = self._open
        item.pieces.append(text)
        return out + self._delta(item, text) if self.wire else b""

    def reasoning(self, text: str) -> bytes:
        item = self._open
        out = b""
        if item is None or item.kind != REASONING:
            out = self._begin(REASONING)
            item = self._open
        item.pieces.append(text)
        return out + self._delta(item, text) if self.wire else b""

    def tool_call(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> bytes:
        """One fragment of a chat tool call: the first carries its id and name, later ones arguments."""
        item = self._calls.get(index)
        out = b""
        if item is None:
            out = self._close_open()
            item = _Item(CALL, len(self.items), call_id or new_id("call"), name or "")
            self.items.append(item)
            self._calls[index] = item
            out += self._event("response.output_item.added", {
                "type": "response.output_item.added", "output_index": item.index, "item": item.public(True)})
        elif name and not item.name:
            item.name = name
        if arguments:
            item.pieces.append(arguments)
            if self.wire:
                out += self._delta(item, arguments)
        return out

    def end(self, finish: str | None, usage_: dict | None) -> bytes:
        """The turn ended: close every item, then ``response.completed`` (or ``response.incomplete``
        with ``max_output_tokens`` when the model was cut off by its token limit)."""
        reason = INCOMPLETE.get(finish or "")
        final = "incomplete" if reason else "completed"
        out = self._close_all(final)
        self.usage = usage(usage_)
        self.status = final
        if reason:
            self.incomplete = {"reason": reason}
        kind = f"response.{final}"
        return out + self._event(kind, {"type": kind, "response": self.response()})

    def fail(self, code: str, message: str) -> bytes:
        """A failure after the stream started: open items end ``incomplete``, then ``response.failed``."""
        out = self._close_all("incomplete")
        self.status = "failed"
        self.error = {"code": ERROR_CODES.get(code, "server_error"), "message": message, "type": code}
        return out + self._event("response.failed", {"type": "response.failed", "response": self.response()})

    # -- items ----------------------------------------------------------------------------

    def _begin(self, kind: str) -> bytes:
        out = self._close_open()
        item = _Item(kind, len(self.items))
        self.items.append(item)
        self._open = item
        if not self.wire:
            return out
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        out += self._event("response.output_item.added", {
            "type": "response.output_item.added", "output_index": item.index, "item": item.public(True)})
        return out + self._event("response.content_part.added", {
            "type": "response.content_part.added", **where, "part": item.part()})

    def _close_open(self, status: str = "completed") -> bytes:
        item = self._open
        if item is None:
            return b""
        self._open = None
        return self._close(item, status)

    def _close(self, item: _Item, status: str) -> bytes:
        item.status = status
        if not self.wire:
            return b""
        text = item.text()
        out = b""
        if item.kind == CALL:
            out += self._event("response.function_call_arguments.done", {
                "type": "response.function_call_arguments.done", "item_id": item.id, "output_index": item.index,
                "arguments": text})
        else:
            where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
            done = "response.output_text.done" if item.kind == MESSAGE else "response.reasoning_text.done"
            ev = {"type": done, **where, "text": text}
            if item.kind == MESSAGE:
                ev["logprobs"] = []
            out += self._event(done, ev)
            out += self._event("response.content_part.done", {
                "type": "response.content_part.done", **where, "part": item.part(text)})
        return out + self._event("response.output_item.done", {
            "type": "response.output_item.done", "output_index": item.index, "item": item.public()})

    def _close_all(self, status: str) -> bytes:
        out = self._close_open(status)
        for item in sorted(self._calls.values(), key=lambda i: i.index):
            out += self._close(item, status)
        self._calls.clear()
        return out

    # -- the response object --------------------------------------------------------------------

    def response(self) -> dict:
        e = self.echo
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
            "error": self.error, "incomplete_details": self.incomplete, "instructions": e.get("instructions"),
            "max_output_tokens": e.get("max_output_tokens"), "model": self.model,
            "output": [item.public() for item in self.items] if self.status != "in_progress" else [],
            "parallel_tool_calls": e.get("parallel_tool_calls", True), "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": e.get("temperature"), "text": e.get("text") or {"format": {"type": "text"}},
            "tool_choice": e.get("tool_choice") or "auto", "tools": e.get("tools") or [],
            "top_p": e.get("top_p"), "truncation": "disabled", "usage": self.usage, "user": e.get("user"),
            "metadata": e.get("metadata") or {},
        }
