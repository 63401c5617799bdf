"""What each owner spent this UTC day and this UTC month: tokens (input + output) and messages.

Three backends with one shape, chosen by ``[store] kind`` (``make_counters``), as the limits are:

- ``MemoryCounters``: a dict; this process only; forgotten at a restart.
- ``SQLiteCounters``: a table in the store's database file (``[store] path``), with its own schema
  version (``quota_schema``), on its own connection and worker thread: never on the event loop.
- ``quota_counters_redis.RedisCounters``: one hash per owner and period, ``nexlm:quota:{<owner>}:d:<day>`` and
  ``...:m:<month>`` (fields ``t`` tokens, ``m`` messages), all of an owner's keys in one hash slot;
  a Lua script adds to both periods and sets their expiry (``EXPIREAT``) in one step, so every
  instance sharing the Redis counts into the same numbers, atomically.

A period is named by the caller (``quotas.periods``): ``"2026-12-02"``, ``"2026-12"``. Rows of past
periods are dropped (memory, sqlite) or expire (redis) soon after their period ends.
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple, Protocol

from .config import Settings
from .sqlite_worker import SQLiteWorker
from .store import StoreError


class Periods(NamedTuple):
    """The UTC day and month a count goes into (``quotas.periods``), and when each ends (epoch s)."""
    day: str  # "2026-12-02"
    month: str  # "2026-12"
    day_ends: float
    month_ends: float


class Spent(NamedTuple):
    tokens_day: int = 0
    messages_day: int = 0
    tokens_month: int = 0
    messages_month: int = 0


class Counters(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def read(self, owner: str, periods: Periods) -> Spent: ...
    async def add(self, owner: str, periods: Periods, tokens: int, messages: int) -> None:
        """Add to the day's and the month's counts, in one step."""


def make_counters(settings: Settings) -> Counters:
    kind = settings.store.kind
    if kind == "sqlite":
        return SQLiteCounters(settings.store.path)
    if kind == "redis":
        from .quota_counters_redis import (
            RedisCounters,  # redis-py only for those who use it
        )

        return RedisCounters(settings.store.url)
    return MemoryCounters()


class MemoryCounters:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], list[int]] = {}  # (owner, period) -> [tokens, messages]
        self._periods: tuple[str, str] = ("", "")  # the newest (day, month) seen: older rows are dropped

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def read(self, owner: str, periods: Periods) -> Spent:
        d = self._rows.get((owner, periods.day), (0, 0))
        m = self._rows.get((owner, periods.month), (0, 0))
        return Spent(d[0], d[1], m[0], m[1])

    async def add(self, owner: str, periods: Periods, tokens: int, messages: int) -> None:
        self.add_now(owner, periods, tokens, messages)

    def add_now(self, owner: str, periods: Periods, tokens: int, messages: int) -> None:
        """The same, without waiting (nothing to wait for)."""
        day, month = periods.day, periods.month
        if day > self._periods[0]:  # a new day: the rows of the days (and months) before it go
            self._periods = (day, month)
            self._rows = {k: v for k, v in self._rows.items() if k[1] in (day, month)}
        for period in (day, month):
            row = self._rows.setdefault((owner, period), [0, 0])
            row[0] += tokens
            row[1] += messages


SQLITE_SCHEMA = 1
_SQLITE_MIGRATIONS = [
    [  # 0 -> 1
        "CREATE TABLE quota_counts (owner TEXT NOT NULL, period TEXT NOT NULL, tokens INTEGER NOT NULL, "
        "messages INTEGER NOT NULL, PRIMARY KEY (owner, period)) WITHOUT ROWID",
    ],
]


class SQLiteCounters(SQLiteWorker):
    """Periods are stored as ``d:<day>`` and ``m:<month>``; each add is one transaction."""

    thread_name, what = "nexlm-quotas", "the quota counters"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._day = ""  # the newest day written: when it changes, older rows are dropped

    async def open(self) -> None:
        await self._start(self._open)

    def _open(self) -> None:
        try:
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"quota counters: {exc}") from None
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE IF NOT EXISTS quota_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM quota_schema").fetchone()
            version = row[0] if row else 0
            if version > SQLITE_SCHEMA:
                raise StoreError(f"quota counters: the file has schema {version}, newer than this NexLM's "
                                 f"{SQLITE_SCHEMA}")
            for step in _SQLITE_MIGRATIONS[version:]:
                for statement in step:
                    db.execute(statement)
            db.execute("DELETE FROM quota_schema")
            db.execute("INSERT INTO quota_schema VALUES (?)", (SQLITE_SCHEMA,))
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"quota counters: {exc}") from None
            raise
        self._db = db

    async def close(self) -> None:
        await self._stop()

    async def read(self, owner: str, periods: Periods) -> Spent:
        return await self._call(self._read, owner, periods.day, periods.month)

    def _read(self, owner: str, day: str, month: str) -> Spent:
        rows = dict(((p, (t, m)) for p, t, m in self._db.execute(
            "SELECT period, tokens, messages FROM quota_counts WHERE owner = ? AND period IN (?, ?)",
            (owner, "d:" + day, "m:" + month))))
        d, m = rows.get("d:" + day, (0, 0)), rows.get("m:" + month, (0, 0))
        return Spent(d[0], d[1], m[0], m[1])

    async def add(self, owner: str, periods: Periods, tokens: int, messages: int) -> None:
        await self._call(self._add, owner, periods.day, periods.month, tokens, messages)

    def _add(self, owner: str, day: str, month: str, tokens: int, messages: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for period in ("d:" + day, "m:" + month):
                db.execute("INSERT INTO quota_counts VALUES (?, ?, ?, ?) ON CONFLICT (owner, period) DO UPDATE "
                           "SET tokens = tokens + excluded.tokens, messages = messages + excluded.messages",
                           (owner, period, tokens, messages))
            if day > self._day:  # a new day (or the first add): yesterday's rows and last month's go
                db.execute("DELETE FROM quota_counts WHERE (period LIKE 'd:%' AND period < ?) "
                           "OR (period LIKE 'm:%' AND period < ?)", ("d:" + day, "m:" + month))
                self._day = day
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
