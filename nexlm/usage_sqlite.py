"""Usage in the SQLite store's file: a ``usage`` table, one row per reply.

Its own connection on its own worker thread (a single-thread executor), so usage writes never
wait behind, or delay, the conversation store's; WAL lets both write the one file (a busy
timeout covers the moments they meet). Its own schema version, in the table ``usage_schema``
(the store's ``PRAGMA user_version`` stays the store's): migrated step by step at open, a newer
one refused. Rows older than ``RETENTION_DAYS`` are deleted at open and once a day.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time

from .sqlite_worker import SQLiteWorker
from .store import StoreError
from .usage import RETENTION_DAYS, UsageEntry, summarize

SCHEMA_VERSION = 1
MIGRATIONS = [
    [  # 0 -> 1
        """CREATE TABLE usage (
            day TEXT NOT NULL,            -- UTC, YYYY-MM-DD
            time REAL NOT NULL,           -- wall clock (seconds)
            owner TEXT NOT NULL,          -- user name or token-N; '' without identity
            client TEXT NOT NULL,
            model TEXT NOT NULL,
            provider TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            finish_reason TEXT NOT NULL,
            cached INTEGER NOT NULL,
            estimated INTEGER NOT NULL
        )""",
        "CREATE INDEX usage_owner_day ON usage (owner, day)",
        "CREATE INDEX usage_day ON usage (day)",
    ],
]
SUMS = ("COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cached), SUM(estimated)")


class SQLiteUsage(SQLiteWorker):
    kind = "sqlite"

    thread_name, what = "nexlm-usage", "the usage log"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._pruned = 0.0

    async def open(self) -> None:
        await self._start(self._open)

    def _open(self) -> None:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS usage_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM usage_schema").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                db.close()
                raise StoreError(f"usage: {self.path} has usage schema {version}, newer than this NexLM's "
                                 f"{SCHEMA_VERSION}")
            for v in range(version, SCHEMA_VERSION):
                with db:
                    db.execute("BEGIN")
                    for stmt in MIGRATIONS[v]:
                        db.execute(stmt)
                    db.execute("DELETE FROM usage_schema")
                    db.execute("INSERT INTO usage_schema (version) VALUES (?)", (v + 1,))
        except sqlite3.Error as exc:
            raise StoreError(f"usage: cannot open {self.path}: {exc}") from None
        self._db = db
        self._prune()

    def _prune(self) -> None:
        oldest = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=RETENTION_DAYS)).isoformat()
        self._db.execute("DELETE FROM usage WHERE day < ?", (oldest,))
        self._pruned = time.monotonic()

    async def close(self) -> None:
        await self._stop()

    async def record(self, entry: UsageEntry) -> None:
        await self.record_many([entry])

    async def record_many(self, entries: list[UsageEntry]) -> None:
        rows = [(e.day, e.time, e.owner or "", e.client, e.model, e.provider, e.input_tokens, e.output_tokens,
                 e.finish_reason, int(e.cached), int(e.estimated)) for e in entries]
        await self._call(self._insert, rows)

    def _insert(self, rows: list[tuple]) -> None:
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            if time.monotonic() - self._pruned > 86400:
                self._prune()
        except sqlite3.Error as exc:
            raise StoreError(f"usage: write failed: {exc}") from None

    async def query(self, owner, frm, to, group_by) -> dict:
        rows = await self._call(self._select, owner, frm.isoformat(), to.isoformat())
        return summarize(((d, o, m, c) for d, o, m, *c in rows), group_by)

    def _select(self, owner: str | None, lo: str, hi: str) -> list[tuple]:
        where, args = "day BETWEEN ? AND ?", [lo, hi]
        if owner is not None:
            where, args = "owner = ? AND " + where, [owner, *args]
        try:
            return self._db.execute(f"SELECT day, owner, model, {SUMS} FROM usage WHERE {where} "
                                    "GROUP BY day, owner, model", args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"usage: read failed: {exc}") from None
