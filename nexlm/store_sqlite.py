"""Records in one SQLite file: conversations survive a restart (and ``kill -9``).

stdlib ``sqlite3`` on one dedicated worker thread (a single-thread executor), so
database work never blocks the event loop and runs in the order it was asked
for (a write queued before a read is seen by it). aiosqlite would be the same
design (a thread per connection) with one more dependency. WAL journal with
``synchronous=NORMAL``: a crash (even of the machine) never corrupts the file; a
power cut may lose the last transactions, ``kill -9`` loses nothing committed,
so a running reply loses at most its last checkpoint interval (about 1 s).

The file is locked for this process (``flock`` on it, beside SQLite's own locks):
one NexLM per file; a second one is refused at start instead of silently sharing
it (use the Redis store for several instances). Other readers (the ``sqlite3``
shell, a backup, the tests) may read it meanwhile.

Schema version in ``PRAGMA user_version``: older files are migrated step by step
at open, a newer one is refused. Records are ``Conversation.dumps()``, serialized
on the event loop (the loop owns the objects), beside the columns a query needs.
Caps and expiry work as in ``MemoryStore``: only idle records are evicted, the
least recently active first; ``touch`` is batched and written with the next
write that needs it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import time
from typing import Callable

import orjson

from .records import Conversation
from .sqlite_worker import SQLiteWorker
from .store import StoreError, StoreFull, listed_at

SCHEMA_VERSION = 2
# MIGRATIONS[v] takes a file at version v to v + 1 (one transaction each).
MIGRATIONS = [
    [  # 0 -> 1: the sessions table; listed by owner, newest first
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            owner TEXT,                 -- the auth principal; NULL when auth is off
            client TEXT NOT NULL,       -- counted for the per-client cap
            model TEXT NOT NULL,
            params TEXT NOT NULL,       -- JSON
            title TEXT NOT NULL DEFAULT '',
            created REAL NOT NULL,      -- wall clock (seconds)
            updated REAL NOT NULL,      -- its last turn, or created: what lists sort by
            active REAL NOT NULL,       -- last activity, for the idle TTL and eviction
            record BLOB NOT NULL        -- the whole record (history with statuses, seq)
        )""",
        "CREATE INDEX sessions_owner_updated ON sessions (owner, updated)",
        "CREATE INDEX sessions_active ON sessions (active)",
    ],
    [  # 1 -> 2: the per-client cap counts and evicts by client without a scan
        "CREATE INDEX sessions_client_active ON sessions (client, active)",
    ],
]
PAGE = 100


class SQLiteStore(SQLiteWorker):
    kind = "sqlite"
    durable = True

    def __init__(self, path: str, ttl: float, max_sessions: int, max_per_client: int,
                 in_use: Callable[[str], bool]) -> None:
        super().__init__(path)
        self.ttl = ttl
        self.max_sessions = max(1, max_sessions)
        self.max_per_client = max(1, max_per_client)
        self._in_use = in_use
        self._lock: int | None = None  # a descriptor of the file, flock'ed; closed after the connection
        self._size = 0
        self._touched: dict[str, float] = {}  # id -> last activity, not yet written
        self._adding = asyncio.Lock()  # an add counts, then inserts: two at once must not both fit

    clock = staticmethod(time.time)

    # -- opening

    async def open(self) -> None:
        self._size = await self._start(self._open)

    def _open(self) -> int:
        try:
            self._lock = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(exc.strerror or str(exc)) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._unlock()
            raise StoreError("the database file is in use by another NexLM process (one per file)") from None
        try:
            return self._connect()
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # (after SQLite's connection is closed: closing a descriptor drops its locks)
            self._lock = None

    def _connect(self) -> int:
        try:
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{exc}") from None
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"cannot use WAL journal mode here (got {mode})")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                self._migrate(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            size = db.execute("SELECT count(*) FROM sessions").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(str(exc)) from None
        except BaseException:
            db.close()
            raise
        self._db = db
        return size

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"the database has schema version {version}, newer than this NexLM's "
                             f"({SCHEMA_VERSION}): run a newer NexLM, or use another file")
        for v in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[v]:
                db.execute(statement)
        if version != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def close(self) -> None:
        touched, self._touched = self._touched, {}
        await self._stop(self._close, touched)

    def _close(self, touched: dict) -> None:
        db, self._db = self._db, None
        try:
            if db is not None:
                try:
                    self._write_touches(db, touched)
                finally:
                    db.close()
        finally:
            self._unlock()

    # -- reading

    @property
    def size(self) -> int:
        return self._size

    def peek_now(self, cid: str) -> Conversation | None:
        return None  # not without I/O

    def ids_now(self) -> list[str]:
        return []

    async def get(self, cid: str) -> Conversation | None:
        if not isinstance(cid, str):
            return None
        self._touched.pop(cid, None)
        return await self._call(self._get, cid, time.time())

    def _get(self, cid: str, now: float | None) -> Conversation | None:
        row = self._db.execute("SELECT record FROM sessions WHERE id = ?", (cid,)).fetchone()
        if row is None:
            return None
        if now is not None:
            self._db.execute("UPDATE sessions SET active = ? WHERE id = ?", (now, cid))
        return Conversation.loads(row[0])

    async def peek(self, cid: str) -> Conversation | None:
        return await self._call(self._get, cid, None) if isinstance(cid, str) else None

    async def ids(self) -> list[str]:
        return await self._call(lambda: [r[0] for r in self._db.execute("SELECT id FROM sessions ORDER BY active")])

    async def list_owner(self, owner: str, limit: int, before: float | None = None) -> list[Conversation]:
        return await self._call(self._list_owner, owner, max(0, limit), before)

    def _list_owner(self, owner, limit: int, before: float | None) -> list[Conversation]:
        rows = self._db.execute(
            "SELECT record FROM sessions WHERE owner IS ? AND (? IS NULL OR updated < ?) "
            "ORDER BY updated DESC LIMIT ?", (owner, before, before, limit))
        return [Conversation.loads(r[0]) for r in rows]

    # -- writing

    def touch(self, cid: str) -> None:
        self._touched[cid] = time.time()

    @staticmethod
    def _write_touches(db: sqlite3.Connection, touched: dict) -> None:
        if touched:
            db.executemany("UPDATE sessions SET active = ? WHERE id = ?", [(t, cid) for cid, t in touched.items()])

    @staticmethod
    def _row(conv: Conversation) -> tuple:
        return (conv.model, orjson.dumps(conv.params).decode(), conv.title, listed_at(conv), time.time(),
                conv.dumps(), conv.id)

    async def put(self, conv: Conversation) -> None:
        row = self._row(conv)  # serialized here, on the loop that owns ``conv``
        self._touched.pop(conv.id, None)
        await self._call(self._put, row)

    def _put(self, row: tuple) -> None:
        self._db.execute("UPDATE sessions SET model = ?, params = ?, title = ?, updated = ?, active = ?, record = ? "
                         "WHERE id = ?", row)

    async def delete(self, cid: str) -> bool:
        self._touched.pop(cid, None)
        gone = await self._call(self._delete, [cid])
        return gone > 0

    def _delete(self, ids: list[str]) -> int:
        n = 0
        self._db.execute("BEGIN")
        try:
            for cid in ids:
                n += self._db.execute("DELETE FROM sessions WHERE id = ?", (cid,)).rowcount
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._size -= n
        return n

    async def add(self, conv: Conversation) -> list[str]:
        async with self._adding:
            return await self._add(conv)

    async def _add(self, conv: Conversation) -> list[str]:
        touched, self._touched = self._touched, {}
        n_client, total = await self._call(self._counts, conv.client, touched)
        drop: list[str] = []
        if n_client >= self.max_per_client:
            drop += await self._idle(conv.client, n_client - self.max_per_client + 1, drop)
            if not drop:
                raise StoreFull("busy", f"You have {self.max_per_client} conversations in use; "
                                        "close one and try again.")
        over = total - len(drop) - self.max_sessions + 1
        if over > 0:
            more = await self._idle(None, over, drop)
            if len(more) < over:
                raise StoreFull("overloaded", "The server has too many conversations in use right now. "
                                              "Try again shortly.")
            drop += more
        now = time.time()
        row = (conv.id, conv.owner, conv.client, conv.model, orjson.dumps(conv.params).decode(), conv.title,
               conv.created, listed_at(conv), now, conv.dumps())
        await self._call(self._insert, row, drop)
        return drop

    def _counts(self, client: str, touched: dict) -> tuple[int, int]:
        self._write_touches(self._db, touched)
        n = self._db.execute("SELECT count(*) FROM sessions WHERE client = ?", (client,)).fetchone()[0]
        return n, self._size

    def _insert(self, row: tuple, drop: list[str]) -> None:
        self._delete(drop)
        self._db.execute("INSERT INTO sessions (id, owner, client, model, params, title, created, updated, active, "
                         "record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        self._size += 1

    async def _idle(self, client: str | None, n: int, exclude: list[str]) -> list[str]:
        """Up to ``n`` records not in use, least recently active first (``client``'s only, if given)."""
        found: list[str] = []
        offset = 0
        while len(found) < n:
            page = await self._call(self._oldest, client, offset)
            found += [cid for cid in page if cid not in exclude and not self._in_use(cid)][:n - len(found)]
            if len(page) < PAGE:
                break
            offset += PAGE
        return found

    def _oldest(self, client: str | None, offset: int) -> list[str]:
        if client is None:
            rows = self._db.execute("SELECT id FROM sessions ORDER BY active LIMIT ? OFFSET ?", (PAGE, offset))
        else:
            rows = self._db.execute("SELECT id FROM sessions WHERE client = ? ORDER BY active LIMIT ? OFFSET ?",
                                    (client, PAGE, offset))
        return [r[0] for r in rows]

    async def expire(self, now: float | None = None) -> list[str]:
        """Forget records not in use and idle for ``ttl`` (wall clock: it counts across restarts)."""
        now = time.time() if now is None else now
        touched, self._touched = self._touched, {}
        stale = await self._call(self._stale, now - self.ttl, touched)
        stale = [cid for cid in stale if not self._in_use(cid)]
        if stale:
            await self._call(self._delete, stale)
        return stale

    def _stale(self, cutoff: float, touched: dict) -> list[str]:
        self._write_touches(self._db, touched)
        return [r[0] for r in self._db.execute("SELECT id FROM sessions WHERE active < ? ORDER BY active", (cutoff,))]
