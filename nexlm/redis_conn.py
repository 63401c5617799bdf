"""One way to reach Redis, shared by the Redis store, the Redis limiter and the live parts.

``connect(url)`` opens redis-py's asyncio client (``redis://``, ``rediss://``, a user and
password in the URL) and checks it answers, so a wrong URL or password stops the server at
start with one line (``StoreError``), never a traceback and never the password. A Redis
Cluster is detected (``INFO cluster``) or chosen explicitly (``cluster=`` or ``?cluster=yes``
in the URL) and opened with redis-py's ``RedisCluster``.

Key layout: every key that belongs to one session is ``nexlm:{<sid>}:...`` (``key``), so all
of a session's keys share one hash slot and a Lua script or MULTI over them works on a
cluster. Keys that are not a session's (``tagged``: an owner's index, a client's counters)
carry their own tag; no command ever spans two tags.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from redis import asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster

from .store import StoreError  # one class for "a store cannot be used", whichever store
from .validation import ChatError

PREFIX = "nexlm"
_SAFE_TAG = re.compile(r"[A-Za-z0-9_.@=+/-]{1,128}")
_SID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # records.new_id: token_urlsafe
# Every command waits at most this long for an answer, so a Redis that stops answering fails a
# request instead of hanging it. Blocking reads (XREAD BLOCK) must block for less than this.
SOCKET_TIMEOUT = 10.0
# Connections a client may open (per node on a cluster). redis-py 8 lowered its default to 100 and
# fails the command past it ("Too many connections"): 200 paced streams opening at once got
# ``store_unavailable`` (bench STORES, B4). Bursts open what they need; idle ones stay pooled.
MAX_CONNECTIONS = 2000


def key(sid: str, *parts: object) -> str:
    """``nexlm:{<sid>}:part:...``: a session's key, hash-tagged by the session id."""
    if not valid_sid(sid):
        raise ValueError("not a session id")
    return f"{PREFIX}:{{{sid}}}" + "".join(f":{p}" for p in parts)


def tagged(kind: str, name: str, *parts: object) -> str:
    """``nexlm:<kind>:{<name>}:...``: a key of something that is not a session (an owner, a
    client), with its own hash tag. A name that could break the tag is hashed."""
    if not _SAFE_TAG.fullmatch(name):
        name = "~" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{PREFIX}:{kind}:{{{name}}}" + "".join(f":{p}" for p in parts)


def valid_sid(sid: object) -> bool:
    """Could this be a session id? (Ids come from clients: never let one shape a key.)"""
    return isinstance(sid, str) and _SID.fullmatch(sid) is not None


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(an unparseable URL)"


def _cluster_switch(url: str, cluster: bool | None) -> tuple[str, bool | None]:
    """Take ``cluster=yes|no`` out of the URL's query (redis-py would refuse an unknown option)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    rest = [(k, v) for k, v in query if k != "cluster"]
    for k, v in query:
        if k == "cluster" and cluster is None:
            cluster = v.lower() in ("1", "yes", "true", "on")
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest))), cluster


@dataclass(slots=True)
class RedisConn:
    """An open connection: ``client`` is a ``redis.asyncio.Redis`` or ``RedisCluster``
    (bytes in, bytes out: ``decode_responses`` is off)."""

    client: Any
    cluster: bool
    where: str  # the URL without its password

    def error(self, exc: BaseException, doing: str) -> StoreError:
        return StoreError(f"redis: {doing} failed: {reason(exc)}")

    async def close(self) -> None:
        await self.client.aclose()


def reason(exc: BaseException) -> str:
    """One line about a redis-py failure (its messages never carry the password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, rexc.AuthenticationError) or "WRONGPASS" in text or "NOAUTH" in text:
        return f"authentication refused ({text})"
    return text


async def connect(url: str, cluster: bool | None = None, *, timeout: float = 5.0,
                  socket_timeout: float | None = SOCKET_TIMEOUT) -> RedisConn:
    """Open and check a connection; ``StoreError`` (one line) when Redis cannot be used.
    ``cluster``: None detects it, True/False forces it."""
    where = redact(url)
    try:
        url, cluster = _cluster_switch(url, cluster)
        opts = {"socket_connect_timeout": timeout, "socket_timeout": socket_timeout, "max_connections": MAX_CONNECTIONS}
        if cluster is not True:
            client = aioredis.Redis.from_url(url, **opts)
            try:
                await client.ping()
                enabled = (await client.info("cluster")).get("cluster_enabled") in (1, "1")
            except BaseException:
                await client.aclose()
                raise
            if not enabled or cluster is False:
                return RedisConn(client, False, where)
            await client.aclose()
        client = RedisCluster.from_url(url, **opts)
        try:
            await client.initialize()
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        return RedisConn(client, True, where)
    except (rexc.RedisError, OSError, ValueError) as exc:
        raise StoreError(f"cannot connect: {reason(exc)}") from None  # (callers name the store)


def honour_cancel() -> None:
    """Re-raise a cancellation that a redis-py command swallowed. With a socket timeout, redis-py
    sends through ``asyncio.wait_for``, which on Python 3.11 returns the finished send instead of
    raising when the cancel lands while it runs; a background loop that goes on after that never
    ends, and its owner's ``cancel`` + ``await`` hangs (a shutdown that never finishes). Each
    Redis loop calls this once a round."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


UNAVAILABLE = "The conversation store cannot be reached right now; try again shortly."
_log = logging.getLogger("nexlm.redis")


def guarded(method):
    """Redis failing under a request: a refusal the front doors already know how to say (503,
    ``store_unavailable``), and one log line; never a traceback to the client. For the methods of
    the store and of the live layer that a request awaits (the object's ``conn``, if any, words it)."""
    @functools.wraps(method)
    async def call(self, *args, **kw):
        try:
            return await method(self, *args, **kw)
        except (StoreError, rexc.RedisError, OSError) as exc:
            conn = getattr(self, "conn", None)
            _log.error("redis: %s", exc if isinstance(exc, StoreError) or conn is None
                       else conn.error(exc, method.__name__))
            raise ChatError("store_unavailable", UNAVAILABLE, 503, 5) from None
    return call
