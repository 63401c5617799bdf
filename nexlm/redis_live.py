"""Several instances, one server: the running-reply lease, stop from anywhere, the reaper.

- Lease: ``SET nexlm:{sid}:running <instance>:<rid> NX PX <lease>`` before a reply starts, so a
  session has one running reply across instances (taken: ``busy``). One task renews every lease
  this instance holds each ``lease/3`` seconds (a Lua compare-and-expire: only while it is still
  ours); it is released (compare-and-delete) in the same pipeline as the reply's ``done``, after
  it. Each lease is also listed in ``nexlm:leases:{all}``, scored by its expiry, so any instance
  finds one whose holder died.
- Stop: ``PUBLISH nexlm:stop:{<instance>} "<sid> <rid>"`` to the holder, which cancels the reply
  as a local stop does (closing its upstream request; the turn keeps exactly the text streamed);
  the sender waits for that reply's ``done`` in its stream.
- Reaper: every ``REAP_EVERY`` seconds each instance looks for leases past their expiry; the one
  that wins ``SET nexlm:{sid}:reap NX`` records the turn as ``interrupted`` with the text of the
  reply's stream (what listeners got), then appends its ``done`` (seq from INCR), so listeners on
  every instance end their turn. A kill -9 is noticed within ``lease + REAP_EVERY`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from typing import Awaitable, Callable

import orjson
from redis import exceptions as rexc

from . import wire
from .events import encode
from .redis_conn import RedisConn, connect, guarded, honour_cancel, key, tagged, valid_sid
from .redis_events import RedisEventLog, reply_key, running_key, seq_key
from .redis_follow_cluster import ClusterEventLog

log = logging.getLogger(__name__)

LEASES = tagged("leases", "all")
REAP_EVERY = 2.0
STOP_WAIT = 5.0  # how long a stop through another instance waits for the reply's done
END_WAIT = 0.05  # how long a chat waits for the done of a reply another instance is ending
RENEW_CHUNK = 20  # leases renewed per pipeline; the loop runs other tasks between them
CLAIM_TRIES, CLAIM_PAUSE = 20, 0.005  # a lease whose reply ended: released one round trip after its done
_CAS_DEL = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_CAS_PEXPIRE = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
                "end return 0")


class Busy(Exception):
    """The session's reply runs (on some instance)."""


def stop_channel(instance: str) -> str:
    return tagged("stop", instance)


def turn_of(events: list[dict], finish: str | None = None) -> dict:
    """The assistant turn a reply's events make (what its listeners got)."""
    text = "".join(e["content"] for e in events if e["type"] == "delta")
    reasoning = "".join(e["content"] for e in events if e["type"] == "reasoning")
    done = events[-1] if events and events[-1]["type"] == "done" else {}
    model = done.get("model") or (events[0].get("model", "") if events else "")
    entry = {"role": "assistant", "content": text, "finish_reason": finish or done.get("finish_reason", "interrupted"),
             "model": model}
    if reasoning:
        entry["reasoning"] = reasoning
    if done.get("usage"):
        entry["usage"] = done["usage"]
    return entry


def settle(history: list[dict], entry: dict) -> bool:
    """Put a finished reply's turn into ``history`` unless it is there: after its user message,
    or over its checkpointed ``streaming`` turn. True if it changed."""
    if history and history[-1]["role"] == "assistant" and history[-1].get("finish_reason") == "streaming":
        history[-1] = entry
        return True
    if history and history[-1]["role"] == "user":
        history.append(entry)
        return True
    return False


class RedisLive:
    def __init__(self, conn: RedisConn, events: RedisEventLog, lease_seconds: float) -> None:
        self.conn = conn
        self.r = conn.client
        self.events = events
        self.instance = events.instance
        self.lease_ms = max(1000, int(lease_seconds * 1000))
        self.held: dict[str, str] = {}  # session -> reply id, leases this instance holds
        self.on_stop: Callable[[str, str, str], None] | None = None  # (sid, rid, reason): cancel a reply here
        self.on_reap: Callable[[str, dict], Awaitable[None]] | None = None  # (sid, turn): record a dead reply
        self._tasks: list[asyncio.Task] = []
        events.on_end = self._released

    def start(self) -> None:
        for name, fn in (("writer", self.events.run_writer), ("reader", self.events.run_reader),
                         ("leases", self._renew), ("stops", self._listen_stops), ("reaper", self._reap_loop)):
            self._tasks.append(asyncio.create_task(fn(), name=f"redis {name}"))

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        await self.events.flush()  # the last done events and lease releases (after a write in flight)
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        await self.events.flush()
        await self.conn.close()

    # -------------------------------------------------------------- the lease

    def _member(self, cid: str, rid: str) -> str:
        return f"{cid} {rid} {self.instance}"

    @guarded
    async def claim(self, conv, ended: str | None = None) -> str:
        """Take the session's running lease for a new reply (its id), or raise ``Busy``. The seq
        counter comes with it: this instance numbers the session's events until it lets go.
        ``ended``: a reply whose ``done`` was seen; its lease, released just after, is waited for."""
        rid = secrets.token_urlsafe(9)
        for attempt in range(CLAIM_TRIES):
            pipe = self.r.pipeline(transaction=False)
            pipe.set(running_key(conv.id), f"{self.instance}:{rid}", nx=True, px=self.lease_ms)
            pipe.get(seq_key(conv.id))
            pipe.zadd(LEASES, {self._member(conv.id, rid): time.time() * 1000 + self.lease_ms})
            pipe.get(running_key(conv.id))
            ok, seq, _, holder = await pipe.execute()
            if ok:
                break
            await self.r.zrem(LEASES, self._member(conv.id, rid))
            inst, _, held = (holder or b"").decode().rpartition(":")
            if attempt == CLAIM_TRIES - 1 or not (inst == self.instance and attempt == 0 or held == ended):
                raise Busy
            if inst == self.instance:
                # A reply that just ended here (the facade saw none running), whose done and lease
                # release may still wait in the writer's queue (a chat sent right after done).
                await self.events.flush()
            else:
                await asyncio.sleep(CLAIM_PAUSE)  # the ended reply's instance releases it right after its done
        if seq:
            conv.seq = max(conv.seq, int(seq))
        self.held[conv.id] = rid
        return rid

    @guarded
    async def just_ended(self, cid: str, rid: str) -> bool:
        """Is ``rid``'s ``done`` in its stream, or does it arrive within ``END_WAIT`` seconds?"""
        k = reply_key(cid, rid)
        last = await self.r.xrevrange(k, count=1)
        if last and orjson.loads(last[0][1][b"e"])["type"] == "done":
            return True
        pos = last[0][0] if last else b"0-0"
        for _, entries in await self.r.xread({k: pos}, block=int(END_WAIT * 1000), count=1000) or ():
            if any(orjson.loads(f[b"e"])["type"] == "done" for _, f in entries):
                return True
        return False

    @guarded
    async def reply_running_elsewhere(self, conv) -> bool:
        """Is the session's running lease held (a dead holder's expires)? (persist.recover asks.)"""
        return valid_sid(conv.id) and bool(await self.r.exists(running_key(conv.id)))

    def unclaim(self, cid: str, rid: str) -> None:
        """Give back a lease whose reply never started (refused after the claim)."""
        self.events._queue(("release", cid, rid))

    def _released(self, pipe, cid: str, rid: str) -> None:
        if self.held.get(cid) == rid:
            del self.held[cid]
        pipe.eval(_CAS_DEL, 1, running_key(cid), f"{self.instance}:{rid}")
        pipe.zrem(LEASES, self._member(cid, rid))

    async def _renew(self) -> None:
        while True:
            honour_cancel()
            await asyncio.sleep(self.lease_ms / 3000)
            held = list(self.held.items())
            for i in range(0, len(held), RENEW_CHUNK):  # (one pipeline for 200 leases held the loop ~30 ms:
                await self._renew_some(held[i:i + RENEW_CHUNK])  # bench STORES B4, a gap in every stream)

    async def _renew_some(self, held: list[tuple[str, str]]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for cid, rid in held:
            pipe.eval(_CAS_PEXPIRE, 1, running_key(cid), f"{self.instance}:{rid}", self.lease_ms)
            pipe.zadd(LEASES, {self._member(cid, rid): time.time() * 1000 + self.lease_ms})
        try:
            results = await pipe.execute(raise_on_error=False)
        except (rexc.RedisError, OSError) as exc:
            log.warning("redis: renewing %d leases failed: %s", len(held), exc)
            return
        for (cid, rid), ok in zip(held, results[::2]):
            if ok == 0 and self.held.get(cid) == rid:  # expired under us (a long stall): another instance reaps it
                log.warning("reply %s lost its lease; stopping it here", rid)
                del self.held[cid]
                if self.on_stop is not None:
                    self.on_stop(cid, rid, "interrupted")

    # -------------------------------------------------------------- stop from anywhere

    @guarded
    async def stop_elsewhere(self, cid: str) -> bool:
        """Stop the session's reply on the instance running it; True once its ``done`` is written."""
        raw = await self.r.get(running_key(cid)) if valid_sid(cid) else None
        if not raw:
            return False
        inst, _, rid = raw.decode().rpartition(":")
        if inst == self.instance:
            return False
        k = reply_key(cid, rid)
        last = await self.r.xrevrange(k, count=1)
        if last and orjson.loads(last[0][1][b"e"])["type"] == "done":
            return False
        pos = last[0][0] if last else b"0-0"
        await self.r.publish(stop_channel(inst), f"{cid} {rid}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_WAIT
        while loop.time() < deadline:
            for _, entries in await self.r.xread({k: pos}, block=1000, count=1000) or ():
                for entry_id, fields in entries:
                    pos = entry_id
                    if orjson.loads(fields[b"e"])["type"] == "done":
                        return True
        return False

    async def _listen_stops(self) -> None:
        while True:
            pubsub = self.r.pubsub()
            try:
                await pubsub.subscribe(stop_channel(self.instance))
                while True:
                    honour_cancel()
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg and msg["type"] == "message" and self.on_stop is not None:
                        cid, _, rid = msg["data"].decode().partition(" ")
                        self.on_stop(cid, rid, "stopped")
            except (rexc.RedisError, OSError) as exc:
                log.warning("redis: the stop channel failed (%s); subscribing again", exc)
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()

    # -------------------------------------------------------------- replies of dead instances

    async def _reap_loop(self) -> None:
        while True:
            honour_cancel()
            await asyncio.sleep(REAP_EVERY)
            try:
                await self.reap_once()
            except (rexc.RedisError, OSError) as exc:
                log.warning("redis: looking for replies of stopped instances failed: %s", exc)

    async def reap_once(self) -> int:
        """Mark the replies whose lease expired ``interrupted``; how many."""
        n = 0
        for member in await self.r.zrangebyscore(LEASES, "-inf", time.time() * 1000):
            cid, rid, inst = member.decode().split(" ", 2)
            if self.held.get(cid) == rid or await self.r.get(running_key(cid)) == f"{inst}:{rid}".encode():
                continue  # alive (its renewal is on its way)
            if not await self.r.set(key(cid, "reap"), self.instance, nx=True, px=30000):
                continue
            await self._reap(cid, rid, member)
            n += 1
        return n

    async def _reap(self, cid: str, rid: str, member: bytes) -> None:
        k = reply_key(cid, rid)
        entries = await self.r.xrange(k)
        events = [orjson.loads(f[b"e"]) for _, f in entries]
        pipe = self.r.pipeline(transaction=False)
        if not (events and events[-1]["type"] == "done"):
            entry = turn_of(events, "interrupted")
            if self.on_reap is not None:
                await self.on_reap(cid, entry)  # the record first: whoever reloads on done sees it
            seq = await self.r.incr(seq_key(cid))
            last = int(entries[-1][0].split(b"-")[1]) if entries else 0
            if seq <= last:
                seq = last + 1
                pipe.set(seq_key(cid), seq)
            done = wire.done(rid, "interrupted", None, entry["model"], {}, None)
            done["seq"] = seq
            pipe.xadd(k, {"e": encode(done)}, id=f"0-{seq}")
            pipe.pexpire(k, self.events.keep_ms)
            log.info("reply %s: its instance stopped answering; marked interrupted", rid)
        pipe.zrem(LEASES, member)
        await pipe.execute()
        if isinstance(self.events, ClusterEventLog):
            await self.events.tell_readers({cid})  # the done, to the other instances' readers


def instance_id() -> str:
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_.")[:24] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


async def open_shared(url: str, lease_seconds: float, keep: float) -> RedisLive:
    """Connect (``StoreError`` if Redis cannot be used) and build this instance's live layer."""
    conn = await connect(url)
    events = (ClusterEventLog if conn.cluster else RedisEventLog)(conn.client, instance_id(), keep, conn.cluster)
    return RedisLive(conn, events, lease_seconds)
