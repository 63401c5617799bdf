"""Where the response cache keeps its entries, by ``[store] kind``: one place that knows them all.

Values are opaque bytes (``cache.encode``). Each backend expires entries after ``ttl`` and
the memory and SQLite ones evict the least recently used past ``max_entries``; Redis expires
by ``SET ... EX`` (its own ``maxmemory`` policy bounds it), keys hash-tagged per owner.
The SQLite and Redis backends share the conversation store's connection (the SQLite worker
thread, so nothing blocks the loop); they are opened after the store and closed before it.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from typing import Callable

from .redis_conn import tagged


class MemoryCache:
    """An LRU of bytes. Two maps of atomic values (no per-entry tuple the GC would track: see
    ``MemoryStore``). ``clock`` is injectable (tests)."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.max_entries, self.clock = ttl, max(1, max_entries), clock
        self._values: OrderedDict[str, bytes] = OrderedDict()
        self._expires: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._values)

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self._values.clear()
        self._expires.clear()

    async def get(self, owner: str, key: str) -> bytes | None:
        value = self._values.get(key)
        if value is None:
            return None
        if self._expires[key] <= self.clock():
            del self._values[key], self._expires[key]
            return None
        self._values.move_to_end(key)
        return value

    async def put(self, owner: str, key: str, value: bytes) -> None:
        self._values[key] = value
        self._values.move_to_end(key)
        self._expires[key] = self.clock() + self.ttl
        while len(self._values) > self.max_entries:
            old, _ = self._values.popitem(last=False)
            del self._expires[old]


_SCHEMA = ("CREATE TABLE IF NOT EXISTS response_cache (key TEXT PRIMARY KEY, value BLOB NOT NULL, "
           "expires REAL NOT NULL, used REAL NOT NULL)",
           "CREATE INDEX IF NOT EXISTS response_cache_used ON response_cache (used)")


class SQLiteCache:
    """A table in the SQLite store's file, on the store's own worker thread. ``clock``: wall time."""

    def __init__(self, store, ttl: float, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self.store, self.ttl, self.max_entries, self.clock = store, ttl, max(1, max_entries), clock

    def _db(self) -> sqlite3.Connection:
        return self.store._db

    async def open(self) -> None:
        await self.store._call(self._create)

    def _create(self) -> None:
        for statement in _SCHEMA:
            self._db().execute(statement)

    async def close(self) -> None:
        pass  # the store closes the file

    async def get(self, owner: str, key: str) -> bytes | None:
        return await self.store._call(self._get, key, self.clock())

    def _get(self, key: str, now: float) -> bytes | None:
        db = self._db()
        row = db.execute("SELECT value, expires FROM response_cache WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if row[1] <= now:
            db.execute("DELETE FROM response_cache WHERE key = ?", (key,))
            return None
        db.execute("UPDATE response_cache SET used = ? WHERE key = ?", (now, key))
        return bytes(row[0])

    async def put(self, owner: str, key: str, value: bytes) -> None:
        await self.store._call(self._put, key, value, self.clock())

    def _put(self, key: str, value: bytes, now: float) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR REPLACE INTO response_cache (key, value, expires, used) VALUES (?, ?, ?, ?)",
                       (key, value, now + self.ttl, now))
            db.execute("DELETE FROM response_cache WHERE expires <= ?", (now,))
            over = db.execute("SELECT count(*) FROM response_cache").fetchone()[0] - self.max_entries
            if over > 0:
                db.execute("DELETE FROM response_cache WHERE key IN (SELECT key FROM response_cache "
                           "ORDER BY used LIMIT ?)", (over,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


class RedisCache:
    """``SET nexlm:cache:{owner}:<key> value EX ttl`` on the Redis store's connection."""

    def __init__(self, store, ttl: float) -> None:
        self.store, self.ttl = store, max(1, int(round(ttl)))

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def get(self, owner: str, key: str) -> bytes | None:
        return await self.store.client.get(tagged("cache", owner, key))

    async def put(self, owner: str, key: str, value: bytes) -> None:
        await self.store.client.set(tagged("cache", owner, key), value, ex=self.ttl)


def make_backend(settings, store):
    """The backend for ``[store] kind`` (None when ``[cache] enabled`` is off)."""
    c = settings.cache
    if not c.enabled:
        return None
    if store.kind == "sqlite":
        return SQLiteCache(store, c.ttl_seconds, c.max_entries)
    if store.kind == "redis":
        return RedisCache(store, c.ttl_seconds)
    return MemoryCache(c.ttl_seconds, c.max_entries)
