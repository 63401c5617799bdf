"""What only the SQLite store has: its file's schema version, its lock, and how it fails to open."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from invariants import free_port, spawn_app

from nexlm.records import Conversation
from nexlm.store import StoreError
from nexlm.store_sqlite import MIGRATIONS, SCHEMA_VERSION, SQLiteStore


def store(path) -> SQLiteStore:
    return SQLiteStore(str(path), 3600, 100, 50, in_use=lambda cid: False)


def version(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


async def test_a_new_file_gets_the_current_schema_and_keeps_records_across_opens(tmp_path):
    path = tmp_path / "n.db"
    s = store(path)
    await s.open()
    c = Conversation("u:a", "c", "fake/fake-model", history=[{"role": "user", "content": "q"}])
    await s.add(c)
    await s.close()
    assert version(path) == SCHEMA_VERSION
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s = store(path)
    await s.open()
    try:
        assert s.size == 1 and (await s.get(c.id)).history == c.history
    finally:
        await s.close()


async def test_an_older_file_is_migrated_with_its_records(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # a version-1 file, as the first release wrote it
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        c = Conversation("u:a", "c", "fake/fake-model", title="kept")
        db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, '{}', ?, ?, ?, ?, ?)",
                   (c.id, c.owner, c.client, c.model, c.title, c.created, c.created, c.created, c.dumps()))
        db.execute("PRAGMA user_version = 1")
    s = store(path)
    await s.open()
    try:
        assert version(path) == SCHEMA_VERSION == 2
        with sqlite3.connect(path) as db:
            indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "sessions_client_active" in indexes
        assert (await s.get(c.id)).title == "kept" and s.size == 1
    finally:
        await s.close()


async def test_a_newer_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE future (x)")
        db.execute("PRAGMA user_version = 9")
    with pytest.raises(StoreError, match="schema version 9, newer than this NexLM's"):
        await store(path).open()
    assert version(path) == 9


async def test_not_a_database_and_a_missing_directory_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database file at all, just some text. " * 40)
    with pytest.raises(StoreError, match="not a database"):
        await store(junk).open()
    with pytest.raises(StoreError, match="No such file or directory"):
        await store(tmp_path / "missing" / "n.db").open()


async def test_one_process_per_file(tmp_path):
    path = tmp_path / "n.db"
    first = store(path)
    await first.open()
    try:
        with pytest.raises(StoreError, match="in use by another NexLM"):
            await store(path).open()
    finally:
        await first.close()
    again = store(path)  # released on close
    await again.open()
    await again.close()


async def test_the_server_names_the_store_it_cannot_open_and_exits_2(tmp_path):
    bad = tmp_path / "nowhere" / "nexlm.db"
    cfg = tmp_path / "nexlm.toml"
    cfg.write_text(f'[store]\nkind = "sqlite"\npath = "{bad}"\n')
    proc = await spawn_app(cfg, free_port())
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 2, (out, err)
    lines = err.decode().strip().splitlines()
    assert lines == [f"nexlm: cannot open the sqlite store {bad}: No such file or directory"], lines
    assert b"NexLM is running" not in out


async def test_database_work_runs_on_the_store_thread_never_on_the_loop(tmp_path):
    """Every statement goes through the one worker thread (so the loop never waits on the disk)."""
    import threading

    s = store(tmp_path / "n.db")
    await s.open()
    threads = []

    class Watched:
        def __init__(self, db) -> None:
            self._db = db

        def __getattr__(self, name):
            if name in ("execute", "executemany"):
                threads.append(threading.current_thread().name)
            return getattr(self._db, name)

    s._db = Watched(s._db)
    c = Conversation("u:a", "c", "fake/fake-model")
    await s.add(c)
    s.touch(c.id)
    await s.get(c.id)
    await s.peek(c.id)
    await s.put(c)
    await s.list_owner("u:a", 5)
    await s.ids()
    await s.expire(s.clock() + 7200)
    await s.add(Conversation("u:a", "c", "fake/fake-model"))
    await s.delete(c.id)
    await s.close()
    loop_thread = threading.current_thread().name
    assert len(threads) >= 10 and all(t.startswith("nexlm-sqlite") for t in threads), (
        loop_thread, set(threads))
