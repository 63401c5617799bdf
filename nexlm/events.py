"""The wire form of chat events, shared by /ws and /sse, and the per-connection outbox.

An event is a plain dict, exactly the JSON the protocol documents. It is built
once per event and encoded once per connection. ``Outbox`` sits between a
reply (which never waits for a client) and one connection's writer: when the
client lags, adjacent deltas of the same reply merge into one, so a slow
reader costs one growing string rather than a queue of frames.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode
MERGEABLE = frozenset({"delta", "reasoning"})


def dumps(event: dict) -> str:
    """JSON text that always encodes as UTF-8: a lone surrogate that slipped through is escaped."""
    text = _encode(event)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(event, separators=(",", ":"))
    return text


def sse_frame(event: dict, event_id: int | None = None) -> str:
    """``event:``/``data:``/``id:`` lines. The JSON is one line: ``json`` escapes newlines."""
    seq = event.get("seq") if event_id is None else event_id
    if seq is None:
        return f"event: {event['type']}\ndata: {dumps(event)}\n\n"
    return f"event: {event['type']}\ndata: {dumps(event)}\nid: {seq}\n\n"


def error_event(code: str, message: str, reply: str | None = None) -> dict:
    ev = {"type": "error", "code": code, "message": message}
    if reply is not None:
        ev["reply"] = reply
    return ev


class Outbox:
    """Events waiting to be written to one connection, in order."""

    __slots__ = ("_items", "_parts", "_waiter", "closed")

    def __init__(self) -> None:
        self._items: deque[dict] = deque()
        self._parts: list[str] | None = None  # pieces of the last item's content, joined lazily
        self._waiter: asyncio.Future | None = None
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: dict) -> None:
        if self.closed:
            return
        items = self._items
        if items:
            last = items[-1]
            if event["type"] in MERGEABLE and last["type"] == event["type"] and last.get("reply") == event.get("reply"):
                if self._parts is None:
                    self._parts = [last["content"]]
                    last = items[-1] = dict(last)  # the original may be shared with other outboxes
                self._parts.append(event["content"])
                last["seq"] = event["seq"]
                return
        self._flush_parts()
        items.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush_parts(self) -> None:
        if self._parts is not None:
            self._items[-1]["content"] = "".join(self._parts)
            self._parts = None

    def close(self) -> None:
        """No more events: ``get`` returns what is left, then an empty list."""
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> list[dict]:
        """Everything queued (at least one event), or ``[]`` once closed and drained."""
        while not self._items:
            if self.closed:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._flush_parts()
        items = list(self._items)
        self._items.clear()
        return items
