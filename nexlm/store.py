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


class StoreError(Exception):
    """The store cannot be used (opened, migrated): one line saying why, never a secret."""


class Store(Protocol):
    """What the facade needs from wherever records live. Everything a database must answer is
    async; ``touch`` is fire-and-forget (a store may batch it) and ``size`` the last known count
    (for metrics). ``peek_now``/``ids_now`` answer without I/O or not at all (tests, metrics)."""

    kind: str  # "memory" | "sqlite" | "redis"
    durable: bool  # records outlive this process (or are shared): write each commit, checkpoint replies
    max_sessions: int
    max_per_client: int

    async def open(self) -> None:
        """Connect, create or migrate the schema; raise ``StoreError`` (one line) if it cannot."""
    async def close(self) -> None: ...
    async def get(self, cid: str) -> Conversation | None:
        """Read a record; counts as activity."""
    async def peek(self, cid: str) -> Conversation | None:
        """Read without counting as activity."""
    async def add(self, conv: Conversation) -> list[str]:
        """Store a new record, evicting idle ones past the caps (their ids are returned)."""
    async def put(self, conv: Conversation) -> None:
        """Replace an existing record (a missing one stays missing: a write racing a delete)."""
    async def delete(self, cid: str) -> bool: ...
    def touch(self, cid: str) -> None: ...
    async def ids(self) -> list[str]: ...
    def clock(self) -> float:
        """The store's own time (``expire``'s ``now``): monotonic in memory, wall time on disk."""
    async def expire(self, now: float | None = None) -> list[str]:
        """Forget records not in use and idle for the TTL; their ids."""
    async def list_owner(self, owner: str, limit: int, before: float | None = None) -> list[Conversation]:
        """``owner``'s conversations, newest ``updated`` first (``created`` when never updated),
        only those updated strictly before ``before`` when given (the next page's cursor)."""
    @property
    def size(self) -> int: ...
    def peek_now(self, cid: str) -> Conversation | None: ...
    def ids_now(self) -> list[str]: ...


def listed_at(conv: Conversation) -> float:
    """The time a conversation is listed by: its last turn, or its creation."""
    return conv.updated or conv.created


class MemoryStore:
    kind = "memory"
    durable = False  # the live conversation is the truth; records are written when it goes idle

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

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def size(self) -> int:
        return len(self._rows)

    async def open(self) -> None:
        return None

    clock = staticmethod(time.monotonic)

    async def get(self, cid: str) -> Conversation | None:
        row = self._rows.get(cid) if isinstance(cid, str) else None
        if row is None:
            return None
        self.touch(cid)
        return Conversation.loads(row)

    def peek_now(self, cid: str) -> Conversation | None:
        row = self._rows.get(cid)
        return None if row is None else Conversation.loads(row)

    async def peek(self, cid: str) -> Conversation | None:
        return self.peek_now(cid)

    def ids_now(self) -> list[str]:
        return list(self._rows)

    async def ids(self) -> list[str]:
        return list(self._rows)

    async def list_owner(self, owner: str, limit: int, before: float | None = None) -> list[Conversation]:
        """A scan of every record: fine for the memory store's size (max_sessions)."""
        convs = [c for row in self._rows.values() if (c := Conversation.loads(row)).owner == owner
                 and (before is None or listed_at(c) < before)]
        convs.sort(key=listed_at, reverse=True)
        return convs[:max(0, limit)]

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
        return evicted

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
        client = self._client.pop(cid)
        n = self._per_client.get(client, 1) - 1
        if n > 0:
            self._per_client[client] = n
        else:
            self._per_client.pop(client, None)
        return True

    async def expire(self, now: float | None = None) -> list[str]:
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
