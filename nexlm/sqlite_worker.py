"""One SQLite connection on one dedicated thread: what every SQLite-backed part shares.

The store, the quota counters and the usage log each keep their own connection to the same file
(WAL lets them write one after another), and each runs every statement on its own single worker
thread, so database work never blocks the event loop and a connection is only ever used by the
thread that opened it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor

from .store import StoreError


class SQLiteWorker:
    thread_name = "nexlm-sqlite"
    what = "the sqlite store"  # for "... is not open"

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None

    async def _call(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread."""
        if self._pool is None:
            raise StoreError(f"{self.what} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _start(self, opener, *args):
        """Start the thread and run ``opener`` there (it opens ``self._db``); on failure, stop it."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        try:
            return await self._call(opener, *args)
        except BaseException:
            self._pool.shutdown(wait=True)
            self._pool = None
            raise

    async def _stop(self, closer=None, *args) -> None:
        """Run ``closer`` (default: close the connection) on the thread, then stop the thread."""
        if self._pool is None:
            return
        try:
            await self._call(closer or self._close_db, *args)
        finally:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
