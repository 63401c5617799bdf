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

import orjson

MERGEABLE = frozenset({"delta", "reasoning"})


def encode(event: dict) -> bytes:
    """The event's JSON as UTF-8 bytes: one encode per event per connection, no str round trip."""
    try:
        return orjson.dumps(event)
    except TypeError:
        # A lone surrogate slipped through: ASCII escapes always encode.
        return json.dumps(event, separators=(",", ":")).encode()


def dumps(event: dict) -> str:
    return encode(event).decode()


def sse_frame(event: dict, event_id: int | None = None) -> bytes:
    """``event:``/``data:``/``id:`` lines. The JSON is one line: JSON escapes newlines."""
    seq = event.get("seq") if event_id is None else event_id
    head = b"event: " + event["type"].encode() + b"\ndata: " + encode(event)
    if seq is None:
        return head + b"\n\n"
    return head + b"\nid: " + str(seq).encode() + b"\n\n"


def error_event(code: str, message: str, reply: str | None = None) -> dict:
    ev = {"type": "error", "code": code, "message": message}
    if reply is not None:
        ev["reply"] = reply
    return ev


class Outbox:
    """Events waiting to be written to one connection, in order."""

    __slots__ = ("_items", "_parts", "_waiter", "_drain_waiter", "closed")

    def __init__(self) -> None:
        self._items: list[dict] = []  # a list, not a deque: 56 bytes empty instead of 760, per connection
        self._parts: list[str] | None = None  # pieces of the last item's content, joined lazily
        self._waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
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
        for waiter in (self._waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def drained(self, below: int) -> None:
        """Wait until fewer than ``below`` events are queued (a reader that sends but never reads
        is slowed to the pace it reads at, instead of queueing answers without bound)."""
        while len(self._items) >= below and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

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
        items, self._items = self._items, []
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        return items
