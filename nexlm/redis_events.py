"""Reply events shared through Redis: the event log of several instances behind one address.

Layout (a session's keys share its hash tag, ``redis_conn.key``):

- ``nexlm:{sid}:reply:<rid>``: a Stream of one reply's events (keyed by the reply, so a new turn
  never collides with an old one), entry id ``0-<seq>``, field ``e`` the event's JSON. Reading
  "after seq N" is reading after id ``0-N``. MAXLEN-bounded; expires ``keep`` seconds after its done.
- ``nexlm:{sid}:replies``: a Stream of the session's replies (``r`` reply id, ``i`` instance),
  newest last: what another instance follows to learn that a reply started. Its entries without
  ``r`` are change notices (``c`` what changed: reset, set, title, edit, deleted), written after the
  record: an instance holding the session reads it again (``on_remote_change``).
- ``nexlm:{sid}:seq``: the last seq handed out. Only the instance holding the session's running
  lease (``redis_live``) emits events, so it numbers them itself and writes the counter with its
  events; the next holder starts from it, and a reaper INCRs it: positions rise across instances.

Writing (``redis_writer.RedisWriter``): a reply never awaits Redis.

Following: this instance's listeners of a reply running elsewhere are fed by one reader task:
one ``XREAD BLOCK`` over the replies index of each session listened to here, the reply streams
being followed, and this instance's wake stream (a new follow does not wait for the block to
time out). What it reads goes into the memory log's per-reply logs (a mirror), so replay on
attach is the memory log's; a per-listener floor (the last seq it got) makes the live part
continue exactly after the replay: no gap, no duplicate.

The facade's synchronous questions (``missed``, ``last_reply``, ``running_elsewhere``...) are
answered from a snapshot that ``refresh`` (one round trip) takes when a client looks a session up.
On a Redis Cluster, where one XREAD cannot span slots, ``redis_follow_cluster`` reads per session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import orjson
from redis import exceptions as rexc

from .eventlog import RECENT_REPLIES, EventLog
from .events import Outbox
from .redis_batch import XRead, as_dict
from .redis_conn import guarded, honour_cancel, valid_sid
from .redis_writer import RedisWriter, index_key, reply_key, running_key, seq_key  # noqa: F401 (the layout's names)

log = logging.getLogger(__name__)



class RemoteReply:
    """A reply running on another instance, as the ``session`` frame shows it."""

    __slots__ = ("id", "model", "instance")

    def __init__(self, rid: str, model: str, instance: str) -> None:
        self.id, self.model, self.instance = rid, model, instance


class _Snapshot:
    __slots__ = ("running", "replies", "index_pos")

    def __init__(self, running, replies, index_pos) -> None:
        self.running: tuple[str, str] | None = running  # (instance, reply id) holding the lease
        self.replies: list[list] = replies  # [rid, first seq, last seq, done], oldest first
        self.index_pos = index_pos


class _Follow:
    __slots__ = ("cid", "rid", "key", "pos")

    def __init__(self, cid: str, rid: str, pos: int) -> None:
        self.cid, self.rid, self.key, self.pos = cid, rid, reply_key(cid, rid), pos


def _id_seq(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[1])


# Seconds the reader lets pass after a read that got something: a follower gets a reply's tokens in
# batches, merged into fewer frames (bench/fanout_cpu.py, 50 followed replies: at 16 ms the
# following instance spent ~85 µs per relayed token, at 40 ms ~60; followers are ~30 ms behind).
GATHER = 0.040
INDEX_SCAN = 4 * RECENT_REPLIES  # index entries ``refresh`` reads: replies and change notices (its MAXLEN)


class RedisEventLog(RedisWriter):
    def __init__(self, client, instance: str, keep: float, cluster: bool = False) -> None:
        super().__init__(client, instance, keep, cluster)
        self._want = asyncio.Event()  # something to follow
        self._snap: dict[str, _Snapshot] = {}
        self._floor: dict[Outbox, int] = {}
        self._watch: dict[str, bytes] = {}  # session -> position in its replies index
        self._follows: dict[str, _Follow] = {}  # reply stream key -> follow, in reply order
        self._fresh: list[str] = []  # sessions with follows to catch up (XRANGE) before the next XREAD
        self._wake_pos = b"0-0"
        self._xread = XRead(client)
        self._pruned = False  # listeners left since the reader last dropped what nobody here follows
        self.on_remote_done: Callable[[str, list[dict]], Awaitable[None]] | None = None
        self.on_remote_start: Callable[[str], None] = lambda cid: None  # a reply began elsewhere: reread the record
        self.on_remote_change: Callable[[str, str], None] = lambda cid, what: None  # the record changed elsewhere

    # -------------------------------------------------------------- what other instances run

    @guarded
    async def refresh(self, cid: str) -> None:
        """Take the snapshot of ``cid``'s replies in Redis that the synchronous questions answer from."""
        if not valid_sid(cid):
            return
        pipe = self.r.pipeline(transaction=False)
        pipe.get(running_key(cid))
        pipe.xrevrange(index_key(cid), count=INDEX_SCAN)
        running_raw, entries = await pipe.execute()
        index_pos = entries[0][0] if entries else b"0-0"
        rids = [f[b"r"].decode() for _, f in reversed(entries) if b"r" in f][-RECENT_REPLIES:]  # (not change notices)
        pipe = self.r.pipeline(transaction=False)
        for rid in rids:
            pipe.xrange(reply_key(cid, rid), count=1)
            pipe.xrevrange(reply_key(cid, rid), count=1)
        ends = await pipe.execute() if rids else []
        replies = []
        for i, rid in enumerate(rids):
            first, last = ends[2 * i], ends[2 * i + 1]
            if not last:
                replies.append([rid, None, 0, False])
                continue
            done = orjson.loads(last[0][1][b"e"])["type"] == "done"
            replies.append([rid, _id_seq(first[0][0]), _id_seq(last[0][0]), done])
        running = None
        if running_raw:
            inst, _, rid = running_raw.decode().rpartition(":")
            running = (inst, rid)
        self._snap[cid] = _Snapshot(running, replies, index_pos)

    def running_elsewhere(self, cid: str) -> RemoteReply | None:
        snap = self._snap.get(cid)
        if snap is None or snap.running is None or snap.running[0] == self.instance:
            return None
        inst, rid = snap.running
        if any(r[0] == rid and r[3] for r in snap.replies):
            return None
        t = self._topics.get(cid)
        model = ""
        for r in t.replies if t else ():
            if r.id == rid and r.events:
                if r.finished is not None:
                    return None
                model = r.events[0].get("model", "")
        return RemoteReply(rid, model, inst)

    def missed(self, cid: str, after: int) -> bool:
        snap = self._snap.get(cid)
        return super().missed(cid, after) or bool(snap) and any(r[2] > after for r in snap.replies)

    def last_reply(self, cid: str) -> str | None:
        snap = self._snap.get(cid)
        return snap.replies[-1][0] if snap and snap.replies else super().last_reply(cid)

    def first_seq(self, cid: str, reply_id: str) -> int | None:
        first = super().first_seq(cid, reply_id)
        snap = self._snap.get(cid)
        for r in snap.replies if snap and first is None else ():
            if r[0] == reply_id:
                return r[1]
        return first

    # -------------------------------------------------------------- listeners

    def subscribe(self, cid: str, outbox: Outbox, after: int | None = None, running: str | None = None) -> None:
        remote = self.running_elsewhere(cid) if running is None else None
        super().subscribe(cid, outbox, after, running or (remote.id if remote else None))
        snap = self._snap.setdefault(cid, _Snapshot(None, [], b"0-0"))  # (never looked up: nothing ran yet)
        t = self._topics[cid]
        logs = {r.id: r for r in t.replies}
        local_top = max((r.events[-1]["seq"] for r in t.replies if r.events), default=0)
        if after is not None:
            floor = max(after, local_top)
        elif remote is not None:
            mine = logs.get(remote.id)
            first = self.first_seq(cid, remote.id)
            floor = mine.events[-1]["seq"] if mine and mine.events else (first - 1 if first else self._top(cid, remote.id))
        else:
            floor = max(local_top, self._top(cid, None))
        self._floor[outbox] = floor
        for rid, _first, last, done in snap.replies:
            mine = logs.get(rid)
            complete = rid in self._own or (mine is not None and mine.finished is not None)
            if not complete and ((after is not None and last > after) or (remote is not None and rid == remote.id)):
                self._follow(cid, rid, mine.events[-1]["seq"] if mine and mine.events else 0)
        if cid not in self._watch:
            self._watch[cid] = snap.index_pos
            self._wake()

    def forget_here(self, cid: str) -> None:
        """Drop the kept events of ``cid`` in this process only (a reset made through another
        instance, which cleared the shared index itself: ``forget`` would delete what came since)."""
        EventLog.forget(self, cid)
        snap = self._snap.get(cid)
        if snap is not None:
            snap.replies.clear()

    def _top(self, cid: str, but: str | None) -> int:
        snap = self._snap.get(cid)
        return max((r[2] for r in snap.replies if r[0] != but), default=0) if snap else 0

    def unsubscribe(self, cid: str, outbox: Outbox) -> int:
        self._floor.pop(outbox, None)
        self._pruned = True
        return super().unsubscribe(cid, outbox)

    def release_listeners(self, cid: str, listeners) -> None:
        self._pruned = True
        for outbox in listeners:
            self._floor.pop(outbox, None)

    def release(self, cid: str) -> set[Outbox]:
        listeners = super().release(cid)
        self.release_listeners(cid, listeners)
        self._snap.pop(cid, None)
        return listeners

    def forget_old(self, keep: float, busy, now: float | None = None) -> list[str]:
        gone = super().forget_old(keep, busy, now)
        for cid in [c for c in self._snap if c not in self._topics]:
            del self._snap[cid]
        return gone

    # -------------------------------------------------------------- the reader

    def _follow(self, cid: str, rid: str, pos: int) -> None:
        k = reply_key(cid, rid)
        if k not in self._follows:
            self._follows[k] = _Follow(cid, rid, pos)
            if cid not in self._fresh:
                self._fresh.append(cid)
            self._wake()

    def _wake(self) -> None:
        self._want.set()
        self._queue(("wake", ""))

    def _deliver(self, f: _Follow, ev: dict) -> None:
        t = self._topic(f.cid)
        replies = t.replies  # (the followed reply is nearly always the newest)
        mirror = replies[-1] if replies and replies[-1].id == f.rid else next((r for r in replies if r.id == f.rid), None)
        if mirror is None:
            EventLog.begin(self, f.cid, f.rid)
            mirror = t.replies[-1]
        seq = ev["seq"]
        if mirror.events and mirror.events[-1]["seq"] >= seq:
            return
        mirror.events.append(ev)
        if ev["type"] == "done":
            mirror.finished = time.monotonic()
        floor = self._floor
        for outbox in t.listeners:
            if seq > floor.get(outbox, 0):
                outbox.put(ev)
                floor[outbox] = seq

    async def _read_entries(self, f: _Follow, entries) -> None:
        for entry_id, fields in entries:
            ev = orjson.loads(fields[b"e"] if isinstance(fields, dict) else fields[1])
            f.pos = _id_seq(entry_id)
            self._deliver(f, ev)
            if ev["type"] == "done":
                self._follows.pop(f.key, None)
                snap = self._snap.get(f.cid)
                if snap is not None:
                    if snap.running and snap.running[1] == f.rid:
                        snap.running = None
                    for r in snap.replies:
                        if r[0] == f.rid:
                            r[2], r[3] = f.pos, True
                if self.on_remote_done is not None:
                    t = self._topics.get(f.cid)
                    mirror = next((r for r in t.replies if r.id == f.rid), None) if t else None
                    await self.on_remote_done(f.cid, mirror.events if mirror else [ev])
                return

    def _indexed(self, cid: str, entries) -> None:
        """New replies in a watched session: follow those running elsewhere from their start.
        A change notice (no ``r``) made elsewhere goes to ``on_remote_change``."""
        for entry_id, fields in entries:
            self._watch[cid] = entry_id
            fields = as_dict(fields)
            inst = fields[b"i"].decode()
            if b"r" not in fields:
                if inst != self.instance:
                    self.on_remote_change(cid, fields.get(b"c", b"").decode())
                continue
            rid = fields[b"r"].decode()
            snap = self._snap.get(cid)
            if snap is not None:
                snap.replies.append([rid, None, 0, False])
                del snap.replies[:-RECENT_REPLIES]
                snap.running = (inst, rid)
            if inst != self.instance:
                self._follow(cid, rid, 0)
                self.on_remote_start(cid)

    def _prune(self) -> None:
        if not self._pruned:
            return
        self._pruned = False
        for cid in [c for c in self._watch if not self.listeners(c)]:
            del self._watch[cid]
        for k in [k for k, f in self._follows.items() if f.cid not in self._watch]:
            del self._follows[k]

    async def run_reader(self) -> None:
        while True:
            honour_cancel()
            try:
                await self._read_once()
            except (rexc.RedisError, OSError) as exc:
                log.warning("redis: reading other instances' replies failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _catch_up(self) -> None:
        """Read new follows from their start, in reply order, so a listener gets old replies before new ones."""
        while self._fresh:
            cid = self._fresh.pop(0)
            for f in [f for f in self._follows.values() if f.cid == cid]:
                await self._read_entries(f, await self.r.xrange(f.key, min=f"(0-{f.pos}"))

    async def _read_once(self) -> None:
        self._prune()
        if not self._watch:
            self._want.clear()
            await self._want.wait()
            return
        await self._catch_up()
        names = [self._wake_key, *(index_key(cid) for cid in self._watch), *self._follows]
        positions = [self._wake_pos, *self._watch.values(), *(b"0-%d" % f.pos for f in self._follows.values())]
        got = False
        for name, entries in await self._xread.read(names, positions):
            got = True
            name = name.decode()
            if name == self._wake_key:
                self._wake_pos = entries[-1][0]
            elif name in self._follows:
                await self._read_entries(self._follows[name], entries)
            elif name.endswith(":replies"):
                cid = name[len("nexlm:{"):-len("}:replies")]
                if cid in self._watch:
                    self._indexed(cid, entries)
        if got:  # let the next read gather more: one read per writer batch of every instance was
            await asyncio.sleep(GATHER)  # most of a following instance's CPU per token
