"""Conversation records in Redis, shared by every NexLM instance with the same ``[store] url``.

Key layout (``redis_conn.key``/``tagged``; a session's keys share its hash slot):

- ``nexlm:{<sid>}:rec``      the record (``Conversation.dumps()``), expiring ``ttl`` after last activity
- ``nexlm:{<sid>}:busy``     "in use on some instance": set while a reply runs or someone listens,
                             refreshed by that instance, expiring ``3 * refresh`` after it stops
- ``nexlm:client:{<client>}:sessions``  sorted set: the client's session ids by last activity
- ``nexlm:owner:{<owner>}:sessions``    sorted set: the owner's session ids by ``updated`` (``list_owner``)
- ``nexlm:all:{sessions}``   sorted set: every session id by last activity (the global cap)
- ``nexlm:schema``           the layout's version (an older one is migrated, a newer one refused)

The caps are counted across instances: a small Lua script on one sorted set admits a new id
atomically or names the oldest ids in the way. Eviction takes an idle one only: not in use in
this process and without a ``busy`` marker from any other. What it cannot know: a conversation
an instance is starting to use in the same few milliseconds (its marker is written by the next
touch), and an instance that died leaves its markers for at most ``3 * refresh`` seconds. The
sorted sets may name records Redis has already expired; they are pruned by score as they are read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Callable

from redis.exceptions import RedisError

from .records import Conversation
from .redis_batch import packed_pipeline
from .redis_conn import RedisConn, StoreError, connect, guarded, key, tagged, valid_sid
from .store import StoreFull, listed_at

log = logging.getLogger(__name__)

TOUCH_GATHER = 0.5  # seconds touches wait to go out together
SCHEMA = 1  # the key layout above
SCHEMA_KEY = "nexlm:schema"
ALL_KEY = "nexlm:all:{sessions}"
MIGRATIONS: dict[int, Callable] = {}  # version -> async fn(client) bringing it to version + 1

# Admit ARGV[4] into the sorted set KEYS[1] (scores: last activity) if it holds fewer than
# ARGV[3] ids active after ARGV[2]; else answer the oldest ids in the way. One key: cluster-safe.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2])
local cap = tonumber(ARGV[3])
local n = redis.call('ZCARD', KEYS[1])
if n < cap then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return {1, n + 1}
end
return {0, n, unpack(redis.call('ZRANGE', KEYS[1], 0, math.min(n - cap, 30) + 10))}
"""


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    kind = "redis"
    durable = True  # each commit is written, replies are checkpointed
    shared = True  # other instances write too: the facade re-reads a record it holds but does not use

    def __init__(self, url: str, ttl: float, max_sessions: int, max_per_client: int,
                 in_use: Callable[[str], bool], cluster: bool | None = None) -> None:
        self.url = url
        self.ttl = max(1.0, float(ttl))
        self.max_sessions = max(1, max_sessions)
        self.max_per_client = max(1, max_per_client)
        self._in_use = in_use
        self._cluster = cluster
        self.refresh = max(0.5, min(30.0, self.ttl / 4))  # in-use records are touched this often
        self.conn: RedisConn | None = None
        self._admit = None
        # Process-local: sessions this process has read or written (id -> client), for touches
        # and the in-use refresh; last local activity (monotonic) to forget the quiet ones.
        self._known: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._touched: dict[str, None] = {}
        self._flusher: asyncio.Task | None = None
        self._refresher: asyncio.Task | None = None
        self._size = 0
        self._adding = asyncio.Lock()

    # ------------------------------------------------------------ life

    @property
    def client(self):
        if self.conn is None:
            raise StoreError("redis store: not open")
        return self.conn.client

    async def open(self) -> None:
        self.conn = await connect(self.url, self._cluster)
        try:
            await self._schema()
            self._admit = self.client.register_script(_ADMIT)
            self._size = int(await self.client.zcard(ALL_KEY))
        except StoreError:
            await self.close()
            raise
        except Exception as exc:
            err = self.conn.error(exc, "opening")
            await self.close()
            raise err from None
        self._refresher = asyncio.create_task(self._refresh_loop(), name="redis store refresh")

    async def _schema(self) -> None:
        c = self.client
        await c.set(SCHEMA_KEY, SCHEMA, nx=True)
        found = int(await c.get(SCHEMA_KEY))
        if found > SCHEMA:
            raise StoreError(f"its schema version is {found}, newer than this "
                             f"NexLM's ({SCHEMA}); upgrade NexLM or point [store] url at another database")
        while found < SCHEMA:
            await MIGRATIONS[found](c)
            found += 1
            await c.set(SCHEMA_KEY, found)
            log.info("redis store: migrated to schema version %d", found)

    async def close(self) -> None:
        for task in (self._refresher, self._flusher):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._refresher = None
        if self.conn is not None and self._touched:
            try:
                await self._flush_touches()
            except Exception as exc:
                log.warning("redis store: last touches not written: %s", exc)
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close()

    def clock(self) -> float:
        return time.time()

    @property
    def size(self) -> int:
        return self._size

    # ------------------------------------------------------------ records

    def _know(self, conv: Conversation) -> None:
        self._known[conv.id] = (conv.client, time.monotonic())
        self._known.move_to_end(conv.id)
        while len(self._known) > 100_000:
            self._known.popitem(last=False)

    @guarded
    async def get(self, cid: str) -> Conversation | None:
        conv = await self.peek(cid)
        if conv is not None:
            self._know(conv)
            self.touch(cid)
        return conv

    @guarded
    async def peek(self, cid: str) -> Conversation | None:
        if not valid_sid(cid):
            return None
        row = await self._do("reading", self.client.get(key(cid, "rec")))
        return None if row is None else Conversation.loads(row)

    def peek_now(self, cid: str) -> Conversation | None:
        return None  # not without I/O

    def ids_now(self) -> list[str]:
        return list(self._known)

    @guarded
    async def ids(self) -> list[str]:
        await self._settle()
        stale = self.clock() - self.ttl
        return [_s(m) for m in await self._do("listing", self.client.zrangebyscore(ALL_KEY, stale, "+inf"))]

    async def _do(self, doing: str, awaitable):
        try:
            return await awaitable
        except StoreError:
            raise
        except Exception as exc:
            raise self.conn.error(exc, doing) from None

    async def _settle(self) -> None:
        """Write pending touches first: what comes next (a cap, an expiry) ranks by activity."""
        if self._touched:
            await self._do("touching", self._flush_touches())

    @guarded
    async def add(self, conv: Conversation) -> list[str]:
        """One at a time in this process (in call order: the oldest makes room for the newest);
        across instances the scripts keep the caps, in whatever order the adds arrive."""
        async with self._adding:
            return await self._add(conv)

    async def _add(self, conv: Conversation) -> list[str]:
        evicted: list[str] = []
        client_key = tagged("client", conv.client, "sessions")
        await self._take_room(client_key, conv.id, self.max_per_client, evicted, "busy",
                              f"You have {self.max_per_client} conversations in use; close one and try again.")
        try:
            self._size = await self._take_room(ALL_KEY, conv.id, self.max_sessions, evicted, "overloaded",
                                               "The server has too many conversations in use right now. "
                                               "Try again shortly.")
        except StoreFull:
            await self.client.zrem(client_key, conv.id)
            raise
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key(conv.id, "rec"), conv.dumps(), px=self._ttl_ms)
        if conv.owner is not None:
            pipe.zadd(tagged("owner", conv.owner, "sessions"), {conv.id: listed_at(conv)})
        await self._do("adding", pipe.execute())
        self._know(conv)
        return evicted

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    async def _take_room(self, zkey: str, cid: str, cap: int, evicted: list[str], code: str, message: str) -> int:
        """Admit ``cid`` into ``zkey`` under ``cap``, evicting the oldest idle ids in the way (ranked
        after this process's pending touches are written: only then, as most adds evict nothing)."""
        settled = False
        while True:
            now = self.clock()
            answer = await self._do("adding", self._admit(keys=[zkey], args=[
                repr(now), repr(now - self.ttl), cap, cid, self._ttl_ms * 2]))
            if int(answer[0]) == 1:
                return int(answer[1])
            if not settled and self._touched:
                settled = True
                await self._settle()
                continue
            for other in (_s(m) for m in answer[2:]):
                if other != cid and await self._evict(other, zkey):
                    evicted.append(other)
                    break
            else:
                raise StoreFull(code, message)

    async def _evict(self, cid: str, zkey: str) -> bool:
        """Drop ``cid`` if nobody uses it (here or, by its marker, anywhere); True if this call did."""
        if self._in_use(cid) or not valid_sid(cid) or await self.client.exists(key(cid, "busy")):
            return False
        if not await self.client.zrem(zkey, cid):
            return False  # another instance evicted it first
        await self.delete(cid)
        return True

    @guarded
    async def put(self, conv: Conversation) -> None:
        """One round trip: the record (only if it still exists) and its index entries. The indexes'
        ZADD XX add nothing for a record deleted meanwhile; the owner's (which adds) is taken back."""
        now = self.clock()
        cmds = [("SET", key(conv.id, "rec"), conv.dumps(), "PX", self._ttl_ms, "XX"),
                ("ZADD", tagged("client", conv.client, "sessions"), "XX", now, conv.id),
                ("ZADD", ALL_KEY, "XX", now, conv.id)]
        if conv.owner is not None:
            cmds.append(("ZADD", tagged("owner", conv.owner, "sessions"), listed_at(conv), conv.id))
        if self.conn.cluster:  # (the commands span several slots: redis-py's cluster pipeline splits them)
            pipe = self.client.pipeline(transaction=False)
            for cmd in cmds:
                pipe.execute_command(*cmd)
            answers = pipe.execute()
        else:  # a reply's checkpoints put its record about once a second: the packed way costs less
            answers = packed_pipeline(self.client, *cmds)
        answers = await self._do("writing", answers)
        for answer in answers:  # (an error reply fails the put, as redis-py's pipeline raised it)
            if isinstance(answer, Exception):
                raise self.conn.error(answer, "writing")
        written = answers[0]
        if not written:  # deleted or expired meanwhile: stays missing
            if conv.owner is not None:
                await self._do("writing", self.client.zrem(tagged("owner", conv.owner, "sessions"), conv.id))
            return
        self._know(conv)

    @guarded
    async def delete(self, cid: str) -> bool:
        conv = await self.peek(cid)
        if conv is None:
            if valid_sid(cid):
                await self._do("deleting", self.client.zrem(ALL_KEY, cid))
            return False
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(key(cid, "rec"), key(cid, "busy"))
        pipe.zrem(tagged("client", conv.client, "sessions"), cid)
        pipe.zrem(ALL_KEY, cid)
        pipe.zcard(ALL_KEY)
        if conv.owner is not None:
            pipe.zrem(tagged("owner", conv.owner, "sessions"), cid)
        answers = await self._do("deleting", pipe.execute())
        removed, self._size = answers[0], int(answers[3])
        self._known.pop(cid, None)
        self._touched.pop(cid, None)
        return bool(removed)

    @guarded
    async def list_owner(self, owner: str, limit: int, before: float | None = None) -> list[Conversation]:
        okey = tagged("owner", owner, "sessions")
        out: list[Conversation] = []
        top = "+inf" if before is None else f"({before!r}"
        while len(out) < limit:
            want = limit - len(out)
            rows = await self._do("listing", self.client.zrevrangebyscore(okey, top, "-inf", start=0, num=want,
                                                                          withscores=True))
            if not rows:
                break
            ids = [_s(m) for m, _ in rows]
            gone = [cid for cid in ids if not valid_sid(cid)]
            ids = [cid for cid in ids if valid_sid(cid)]
            pipe = self.client.pipeline(transaction=False)
            for cid in ids:
                pipe.get(key(cid, "rec"))
            got = await self._do("listing", pipe.execute()) if ids else []
            gone += [cid for cid, row in zip(ids, got) if not isinstance(row, bytes)]
            out += [c for row in got if isinstance(row, bytes) and (c := Conversation.loads(row)).owner == owner]
            if gone:
                await self._do("listing", self.client.zrem(okey, *gone))  # expired records: prune the index
            if len(rows) < want:
                break
            top = f"({rows[-1][1]!r}"
        out.sort(key=listed_at, reverse=True)
        return out[:limit]

    # ------------------------------------------------------------ activity and expiry

    def touch(self, cid: str) -> None:
        """Fire and forget: batched by one task, written in one pipeline."""
        if not valid_sid(cid) or self.conn is None:
            return
        self._touched[cid] = None
        if cid in self._known:
            self._known[cid] = (self._known[cid][0], time.monotonic())
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="redis store touches")

    async def _flush_loop(self) -> None:
        # Touches of the next moment go in the same pipeline: a pipeline per touch was a tenth of an
        # instance's CPU under many short sessions (bench/fanout_cpu.py). Activity only ranks idle
        # records for expiry and eviction, which write what is pending first (``_settle``).
        await asyncio.sleep(TOUCH_GATHER)
        while self._touched:
            try:
                await self._flush_touches()
            except Exception as exc:  # the next touch or refresh tries again
                log.warning("redis store: touches not written: %s", exc)
                return

    async def _flush_touches(self) -> None:
        batch, self._touched = list(self._touched), {}
        now = self.clock()
        busy_ms = int(self.refresh * 3000)
        pipe = self.client.pipeline(transaction=False)
        for cid in batch:
            pipe.pexpire(key(cid, "rec"), self._ttl_ms)
            pipe.zadd(ALL_KEY, {cid: now}, xx=True)
            known = self._known.get(cid)
            if known is not None:
                pipe.zadd(tagged("client", known[0], "sessions"), {cid: now}, xx=True)
            if self._in_use(cid):
                pipe.set(key(cid, "busy"), b"1", px=busy_ms)
        await pipe.execute()

    async def _refresh_loop(self) -> None:
        """Keep what this process uses alive and marked busy, however long it stays quiet."""
        while True:
            await asyncio.sleep(self.refresh)
            for cid in [c for c in self._known if self._in_use(c)]:
                self.touch(cid)

    async def expire(self, now: float | None = None) -> list[str]:
        """Forget records idle for ``ttl`` as of ``now`` (not in use here nor marked busy elsewhere;
        Redis's own key expiry is the backstop), and answer with them the ids this process knew
        whose record is gone (deleted or evicted through another instance)."""
        try:
            return await self._expire(now)
        except (StoreError, RedisError, OSError) as exc:  # housekeeping goes on; the next round tries again
            log.error("redis store: expiring: %s", exc)
            return []

    async def _expire(self, now: float | None) -> list[str]:
        await self._settle()
        now = self.clock() if now is None else now
        stale = [_s(m) for m in await self._do("expiring", self.client.zrangebyscore(
            ALL_KEY, "-inf", f"({now - self.ttl!r}", start=0, num=1000))]
        dropped = []
        for cid in stale:
            if self._in_use(cid) or not valid_sid(cid) or await self.client.exists(key(cid, "busy")):
                continue
            last = await self.client.zscore(ALL_KEY, cid)  # (touched through another instance meanwhile?)
            if last is not None and last >= now - self.ttl:
                continue
            await self.delete(cid)
            dropped.append(cid)
        ids = [c for c in self._known if c not in dropped]
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(ALL_KEY)
        for cid in ids:
            pipe.exists(key(cid, "rec"))
        answers = await self._do("expiring", pipe.execute())
        self._size = int(answers[0])
        gone = [cid for cid, there in zip(ids, answers[1:]) if not there]
        quiet = time.monotonic() - self.ttl
        for cid in gone + [c for c, (_, last) in self._known.items() if last < quiet and not self._in_use(c)]:
            self._known.pop(cid, None)
        return dropped + gone
