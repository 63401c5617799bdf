"""The writing half of the Redis event log: this instance's reply events into Redis.

``emit`` is the memory log's (local listeners get the event at once) plus an op in a buffer; one
writer task sends the buffer every ``COALESCE`` seconds (each run of events as one EVAL, the rest
in a pipeline: ``redis_batch``), so what is emitted meanwhile goes in one round trip. A reply never
awaits Redis; only its ``done`` reaches local listeners after the batch that writes it and the
lease's release (a client that acts on ``done`` through another instance finds the reply ended).

Key names (the layout is described in ``redis_events``) live here, the first module to use them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable

from redis import exceptions as rexc

from .eventlog import RECENT_REPLIES, EventLog
from .events import encode
from .redis_batch import INDEX_TTL_MS, append, command, split
from .redis_conn import honour_cancel, key, tagged

log = logging.getLogger(__name__)

COALESCE = 0.016  # seconds the writer gathers events before sending them


def reply_key(cid: str, rid: str) -> str:
    return key(cid, "reply", rid)


def running_key(cid: str) -> str:
    return key(cid, "running")


def seq_key(cid: str) -> str:
    return key(cid, "seq")


@functools.lru_cache(maxsize=1 << 14)  # the reader names every watched index on each read
def index_key(cid: str) -> str:
    return key(cid, "replies")


class RedisWriter(EventLog):
    def __init__(self, client, instance: str, keep: float, cluster: bool = False) -> None:
        super().__init__()
        self.r = client
        self.cluster = cluster
        self.instance = instance
        self.keep_ms = max(1000, int(keep * 1000))
        self._ops: list[tuple] = []
        self._kick = asyncio.Event()
        self._nap: asyncio.Future | None = None  # the writer's gathering pause
        self._later: list[tuple] = []  # (cid, listeners, done event): handed to them after the next flush
        self._lock = asyncio.Lock()
        self._own: dict[str, str] = {}  # reply id -> session id, replies running here
        self._unlisted: dict[str, str] = {}  # the same, begun but not in the replies index yet
        self._wake_key = tagged("wake", instance)
        self.on_end: Callable | None = None  # (pipe, cid, rid): commands after a reply's done (the lease's release)

    # -------------------------------------------------------------- writing (this instance's replies)

    def begin(self, cid: str, reply_id: str) -> None:
        super().begin(cid, reply_id)
        self._own[reply_id] = cid
        self._unlisted[reply_id] = cid  # listed in the index by announce (once its record is stored) or end

    def announce(self, reply_id: str) -> None:  # (so whoever hears of the reply reads a record with its question)
        if (cid := self._unlisted.pop(reply_id, None)) is not None:
            self._queue(("begin", cid, reply_id))

    def change(self, cid: str, what: str) -> None:
        """Tell the other instances that ``cid``'s record changed outside a reply (``what``: reset, set,
        title, edit, deleted...): an entry without ``r`` in its replies index, once the record is written."""
        self._queue(("change", cid, what))

    def emit(self, conv, reply_id: str, event: dict) -> dict:
        if reply_id not in self._own:
            return super().emit(conv, reply_id, event)
        if event["type"] != "done":
            ev = super().emit(conv, reply_id, event)
        else:  # its listeners here get it once Redis has it, and the lease's release after it: whoever
            t = self._topics.get(conv.id)  # acts on done through another instance finds the reply ended
            self._later.append((conv.id, set(t.listeners) if t else set(), event))
            ev = super().emit(conv, reply_id, event, fan_out=False)  # (kept: a listener from now on replays it)
        self._queue(("xadd", conv.id, reply_id, ev["seq"], encode(ev)))
        return ev

    def end(self, cid: str, reply_id: str, now: float | None = None) -> None:
        super().end(cid, reply_id, now)
        self.announce(reply_id)
        if self._own.pop(reply_id, None) is not None:
            self._queue(("end", cid, reply_id))

    def forget(self, cid: str) -> None:
        super().forget(cid)
        self._queue(("forget", cid))

    def _queue(self, op: tuple) -> None:
        self._ops.append(op)
        self._kick.set()
        if op[0] in ("end", "release") and self._nap is not None and not self._nap.done():
            self._nap.set_result(None)  # a reply's end (its lease's release) goes at once

    def _build(self, pipe, ops: list[tuple]) -> None:
        batch: list[tuple] = []  # consecutive events (cid, rid, seq, data) (a cluster's)
        for op in ops:
            kind, cid = op[0], op[1]
            if kind == "xadd":
                batch.append(op[1:])
                continue
            append(pipe, batch)  # events and counters before anything that may let another instance number events
            batch = []
            if kind in ("begin", "change"):  # (a change notice: no "r", never taken for a reply)
                pipe.xadd(index_key(cid), {"r" if kind == "begin" else "c": op[2], "i": self.instance},
                          maxlen=4 * RECENT_REPLIES, approximate=True)
                pipe.pexpire(index_key(cid), INDEX_TTL_MS)
            elif kind in ("end", "release"):  # release: a lease whose reply never started
                if kind == "end":
                    pipe.pexpire(reply_key(cid, op[2]), self.keep_ms)
                if self.on_end is not None:
                    self.on_end(pipe, cid, op[2])
            elif kind == "forget":
                pipe.delete(index_key(cid))
            elif kind == "wake":
                pipe.xadd(self._wake_key, {"w": 1}, maxlen=16, approximate=True)
        append(pipe, batch)

    async def flush(self) -> list[tuple]:
        """Send what is buffered, in order: on a single Redis each run of events as one packed
        ``EVAL``, the other ops (a reply's begin and end, the lease's release) in a pipeline after
        the events before them; on a cluster all in one pipeline. The ops it sent."""
        async with self._lock:
            ops, self._ops = self._ops, []
            later, self._later = self._later, []
            if not ops:
                return ops
            try:
                for part in [ops] if self.cluster else split(ops):
                    if isinstance(part, bytes):
                        try:
                            await command(self.r, part)
                        except rexc.ResponseError as exc:
                            log.warning("redis: reply events not shared: %s", exc)
                        continue
                    pipe = self.r.pipeline(transaction=False)
                    self._build(pipe, part)
                    await pipe.execute(raise_on_error=False)
            except (rexc.RedisError, OSError) as exc:
                log.warning("redis: %d reply events not shared: %s", len(ops), exc)
            except Exception:  # the writer must outlive anything: local listeners wait on it for done
                log.exception("redis: %d reply events not shared", len(ops))
            finally:
                for cid, listeners, ev in later:
                    for outbox in listeners & self.listeners(cid):
                        outbox.put(ev)
        return ops

    async def run_writer(self) -> None:
        while True:
            honour_cancel()
            await self._kick.wait()
            # Gather what the next few ms emit into the same pipeline: one round trip for many
            # replies' events, where flushing every event alone cost a redis-py pipeline per
            # token (bench STORES fan-out). Followers on other instances see it COALESCE later.
            loop = asyncio.get_running_loop()
            self._nap = loop.create_future()
            timer = loop.call_later(COALESCE, self._nap.set_result, None)
            try:
                await self._nap
            finally:
                timer.cancel()
                self._nap = None
            self._kick.clear()
            await self.flush()
