"""The wire form of chat events, shared by /ws and /sse, and the per-connection outbox.

An event is a plain dict, exactly the JSON the protocol documents. It is built
once per event and encoded once per connection. ``Outbox`` sits between a
reply (which never waits for a client) and one connection's writer: when the
client lags, adjacent deltas of the same reply merge into one and a newer
``session`` frame replaces older pending ones, so a slow reader costs one
growing string rather than a queue of frames; past ``[limits] max_queued_bytes``
the connection is dropped (it resumes with ``after=SEQ``).
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


def _text_bytes(text: str) -> int:
    """About what ``text`` costs once encoded: exact for ASCII, UTF-8's worst case for the rest
    (``isascii`` is O(1) on CPython; no encode on the hot path)."""
    return len(text) if text.isascii() else 3 * len(text)


def size_of(event: dict) -> int:
    """An estimate of the event's encoded size, in bytes, for the outbox's bound."""
    kind = event["type"]
    if kind in MERGEABLE:
        return 64 + _text_bytes(event["content"])
    if kind == "session":
        n = 256
        for turn in event["history"]:
            n += 96 + _text_bytes(turn["content"]) + _text_bytes(turn.get("reasoning") or "")
        system = event["params"].get("system")
        return n + (_text_bytes(system) if isinstance(system, str) else 0)
    if kind == "error":
        return 128 + _text_bytes(event["message"])
    return 256


class Outbox:
    """Events waiting to be written to one connection, in order, bounded in bytes once attached.

    ``bytes`` counts what is queued plus the batch the writer took last (it is being written
    until the writer asks for the next one), so a peer that stops reading cannot hide its
    backlog in the writer. Adjacent deltas of a reply merge, and a ``session`` frame replaces
    the pending older ones (only the newest matters). Past ``limit`` bytes (``session`` frames
    and what the connection got when it attached aside) the outbox overflows: it drops
    everything, closes, and calls ``on_overflow`` so the transport can end the connection; the
    client comes back with ``after=SEQ``.
    """

    __slots__ = ("_items", "_sizes", "_parts", "_waiter", "_drain_waiter", "_taken", "_sessions",
                 "_session_bytes", "_taken_sessions", "_delivered", "_slack", "bytes", "limit", "on_overflow",
                 "overflowed", "closed")

    def __init__(self, on_overflow=None) -> None:
        self._items: list[dict] = []  # a list, not a deque: 56 bytes empty instead of 760, per connection
        self._sizes: list[int] = []  # size_of each item (a merged delta: the sum of its pieces)
        self._parts: list[str] | None = None  # pieces of the last item's content, joined lazily
        self._waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._taken = 0  # bytes of the batch the writer took last
        self._sessions = 0  # session frames queued
        self._session_bytes = 0  # their bytes
        self._taken_sessions = 0  # bytes of the session frames in the batch taken last
        self._delivered = False  # has the writer taken anything yet
        self._slack = 0  # what the connection was given when it attached: not counted against the limit
        self.bytes = 0
        self.limit = 0  # 0: unbounded (until ``bound``)
        self.on_overflow = on_overflow
        self.overflowed = False
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: dict) -> None:
        if self.closed:
            return
        items = self._items
        kind = event["type"]
        if items:
            last = items[-1]
            if kind in MERGEABLE and last["type"] == kind and last.get("reply") == event.get("reply"):
                if self._parts is None:
                    self._parts = [last["content"]]
                    last = items[-1] = dict(last)  # the original may be shared with other outboxes
                self._parts.append(event["content"])
                last["seq"] = event["seq"]
                n = _text_bytes(event["content"])
                self._sizes[-1] += n
                self.bytes += n
                self._check()
                return
        self._flush_parts()
        n = size_of(event)
        if kind == "session":
            if self._sessions:
                self._drop_sessions()
            self._sessions += 1
            self._session_bytes += n
        items.append(event)
        self._sizes.append(n)
        self.bytes += n
        if not self._check():
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _drop_sessions(self) -> None:
        """A newer ``session`` frame is coming: the pending ones say nothing it does not. The very
        first frame of a connection stays (a client must learn its session before anything else)."""
        keep_first = not self._delivered
        items, sizes = [], []
        for i, (ev, n) in enumerate(zip(self._items, self._sizes)):
            if ev["type"] == "session" and not (keep_first and i == 0):
                self.bytes -= n
                self._sessions -= 1
                self._session_bytes -= n
                continue
            items.append(ev)
            sizes.append(n)
        self._items[:], self._sizes[:] = items, sizes  # in place: put() holds the list

    def bound(self, limit: int) -> None:
        """The connection is attached: from now on at most ``limit`` more bytes may wait for it. What
        it was given so far (its first ``session`` frame and the replay of what it missed, both
        bounded by the session's own limits) does not count, while it is being written."""
        self.limit = limit
        self._slack = self.bytes - self._session_bytes

    def _check(self) -> bool:
        """Within the bound? Otherwise overflow. ``session`` frames do not count: there are at most
        three (the first, the newest pending, one being written), each bounded by the history limits,
        and a long history must not get a connection dropped for asking for it. A single event is
        always allowed."""
        counted = self.bytes - self._slack - self._session_bytes - self._taken_sessions
        if not self.limit or counted <= self.limit or len(self._items) + (self._taken > 0) <= 1:
            return True
        self.overflowed = True
        self._items, self._sizes, self._parts = [], [], None
        self.bytes = self._taken = self._sessions = self._slack = 0
        self._session_bytes = self._taken_sessions = 0
        self.close()
        if self.on_overflow is not None:
            self.on_overflow()
        return False

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
        """Everything queued (at least one event), or ``[]`` once closed and drained.

        Calling it again means the previous batch was written: its bytes stop counting then."""
        self.bytes -= self._taken
        self._slack = max(0, self._slack - (self._taken - self._taken_sessions))
        self._taken = self._taken_sessions = 0
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
        self._taken = sum(self._sizes)
        self._taken_sessions = self._session_bytes
        self._sizes = []
        self._sessions = self._session_bytes = 0
        self._delivered = True
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        return items
