"""Choosing the store by ``[store] kind`` (or ``NEXLM_STORE``): one place that knows them all.

The Redis store is imported only when chosen, so redis-py is needed only by those who use it.
"""

from __future__ import annotations

from typing import Callable

from .config import Settings
from .store import MemoryStore, Store, StoreError


def make_store(settings: Settings, in_use: Callable[[str], bool]) -> Store:
    """The configured store, not yet opened (no I/O). ``in_use(cid)``: is that conversation busy
    in this process (a running reply or a listener)? Caps and expiry never touch one that is.

    Every store takes the same caps: ``[chat] session_ttl_seconds`` (idle TTL), ``[chat]
    max_sessions``, ``[limits] max_sessions_per_client``. The Redis store is
    ``nexlm.store_redis.RedisStore(url, ttl, max_sessions, max_per_client, in_use)``.
    """
    kind = settings.store.kind
    caps = (settings.chat.session_ttl_seconds, settings.chat.max_sessions, settings.limits.max_sessions_per_client)
    if kind == "memory":
        return MemoryStore(*caps, in_use=in_use)
    if kind == "sqlite":
        from .store_sqlite import SQLiteStore

        return SQLiteStore(settings.store.path, *caps, in_use=in_use)
    if kind == "redis":
        try:
            from .store_redis import RedisStore
        except ImportError as exc:
            raise StoreError(f"the redis store is not available: {exc}") from None
        return RedisStore(settings.store.url, *caps, in_use=in_use)
    raise StoreError(f"unknown store kind {kind!r}")


async def open_store(settings: Settings, in_use: Callable[[str], bool]) -> Store:
    """``make_store``, opened: raises ``StoreError`` with one line naming the reason."""
    store = make_store(settings, in_use)
    await store.open()
    return store


def describe(settings: Settings) -> str:
    """The store in a start-up line, without a password a redis URL may carry."""
    kind = settings.store.kind
    if kind == "sqlite":
        return f"sqlite store {settings.store.path}"
    if kind == "redis":
        from urllib.parse import urlsplit

        u = urlsplit(settings.store.url)
        try:
            port = f":{u.port}" if u.port else ""
        except ValueError:
            port = ""
        return f"redis store {u.scheme}://{u.hostname or '?'}{port}{u.path}"
    return "memory store"
