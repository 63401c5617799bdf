"""Where conversation records live: an async interface, and its in-memory implementation.

The facade (``conversations``) reads a record when a conversation becomes live
and writes it back when something durable changes (a turn committed, a setting,
a reset); nothing is written per token. Caps and expiry never touch a
conversation in use (a running reply or a listener): ``in_use`` says which.

``MemoryStore`` keeps each record serialized, least recently used first, with an
idle TTL, a global cap and a per-client cap. Making room evicts idle records
only, oldest first; when none is idle a new conversation is refused
(``StoreFull``), so a flood of new sessions never ends someone's live one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Protocol

from .records import Conversation


class StoreFull(Exception):
    """No room for a new conversation: every one in the way is in use."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Store(Protocol):
    async def get(self, cid: str) -> Conversation | None: ...
    async def add(self, conv: Conversation) -> list[str]:
        """Store a new record, evicting idle ones past the caps (their ids are returned)."""
    async def put(self, conv: Conversation) -> None: ...
    async def delete(self, cid: str) -> bool: ...
    async def list_owner(self, owner: str, limit: int, before: float | None = None) -> list[Conversation]:
        """Up to ``limit`` of ``owner``'s records, newest ``updated`` first, only those with
        ``updated < before`` when given (the history list's pages)."""
    def touch(self, cid: str) -> None: ...
    def peek(self, cid: str) -> Conversation | None:
        """Read without counting as activity (metrics, tests)."""
    def ids(self) -> list[str]: ...
    def expire(self, now: float | None = None) -> list[str]: ...
    def __len__(self) -> int: ...
    async def close(self) -> None: ...


class MemoryStore:
    def __init__(self, ttl: float, max_sessions: int, max_per_client: int,
                 in_use: Callable[[str], bool]) -> None:
        self.ttl = ttl
        self.max_sessions = max(1, max_sessions)
        self.max_per_client = max(1, max_per_client)
        self._in_use = in_use
        # Three maps of atomic values, least recently used first in ``_rows``: nothing here is an
        # object the garbage collector tracks, not even briefly (a (bytes, str, float) row tuple
        # is tracked until a young collection first sees it, and 10,000 new ones advanced the
        # collector's counters enough to move a young collection into live streams: bench IDLE).
        self._rows: OrderedDict[str, bytes] = OrderedDict()  # id -> record
        self._client: dict[str, str] = {}  # id -> client
        self._last: dict[str, float] = {}  # id -> last active (monotonic)
        self._per_client: dict[str, int] = {}
        self._owner: dict[str, str] = {}  # id -> owner, for records that have one
        self._updated: dict[str, float] = {}  # id -> the record's ``updated`` (list_owner's order)

    def __len__(self) -> int:
        return len(self._rows)

    async def get(self, cid: str) -> Conversation | None:
        row = self._rows.get(cid) if isinstance(cid, str) else None
        if row is None:
            return None
        self.touch(cid)
        return Conversation.loads(row)

    def peek(self, cid: str) -> Conversation | None:
        row = self._rows.get(cid)
        return None if row is None else Conversation.loads(row)

    def ids(self) -> list[str]:
        return list(self._rows)

    async def add(self, conv: Conversation) -> list[str]:
        evicted = []
        if self._per_client.get(conv.client, 0) >= self.max_per_client:
            oldest = self._oldest_idle(conv.client)
            if oldest is None:
                raise StoreFull("busy", f"You have {self.max_per_client} conversations in use; "
                                        "close one and try again.")
            self._drop(oldest)
            evicted.append(oldest)
        while len(self._rows) >= self.max_sessions:
            oldest = self._oldest_idle(None)
            if oldest is None:
                raise StoreFull("overloaded", "The server has too many conversations in use right now. "
                                              "Try again shortly.")
            self._drop(oldest)
            evicted.append(oldest)
        self._rows[conv.id] = conv.dumps()
        self._client[conv.id] = conv.client
        self._last[conv.id] = time.monotonic()
        self._per_client[conv.client] = self._per_client.get(conv.client, 0) + 1
        self._index(conv)
        return evicted

    def _index(self, conv: Conversation) -> None:
        if conv.owner is not None:
            self._owner[conv.id] = conv.owner
            self._updated[conv.id] = conv.updated

    async def list_owner(self, owner: str, limit: int, before: float | None = None) -> list[Conversation]:
        updated = self._updated
        ids = [cid for cid, o in self._owner.items() if o == owner and (before is None or updated[cid] < before)]
        ids.sort(key=updated.__getitem__, reverse=True)
        return [Conversation.loads(self._rows[cid]) for cid in ids[:max(0, limit)]]

    def _oldest_idle(self, client: str | None) -> str | None:
        clients = self._client
        for cid in self._rows:
            if (client is None or clients[cid] == client) and not self._in_use(cid):
                return cid
        return None

    async def put(self, conv: Conversation) -> None:
        if conv.id in self._rows:
            self._rows[conv.id] = conv.dumps()
            self._last[conv.id] = time.monotonic()
            self._rows.move_to_end(conv.id)
            self._index(conv)

    def touch(self, cid: str) -> None:
        if cid in self._last:
            self._last[cid] = time.monotonic()
            self._rows.move_to_end(cid)

    async def delete(self, cid: str) -> bool:
        return self._drop(cid)

    def _drop(self, cid: str) -> bool:
        if self._rows.pop(cid, None) is None:
            return False
        del self._last[cid]
        self._owner.pop(cid, None)
        self._updated.pop(cid, None)
        client = self._client.pop(cid)
        n = self._per_client.get(client, 1) - 1
        if n > 0:
            self._per_client[client] = n
        else:
            self._per_client.pop(client, None)
        return True

    def expire(self, now: float | None = None) -> list[str]:
        """Forget records not in use and quiet for ``ttl``; least recently used first, so the
        scan stops at the first one still fresh."""
        now = time.monotonic() if now is None else now
        stale = []
        last_active = self._last
        for cid in self._rows:
            if now - last_active[cid] <= self.ttl:
                break
            if not self._in_use(cid):
                stale.append(cid)
        for cid in stale:
            self._drop(cid)
        return stale

    async def close(self) -> None:
        return None
