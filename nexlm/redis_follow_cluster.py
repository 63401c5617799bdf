"""Following other instances' replies on a Redis Cluster, where one XREAD cannot span sessions.

The single-node reader (``RedisEventLog._read_once``) blocks in one ``XREAD`` over every
watched session's keys, which a cluster refuses (CROSSSLOT). Here instead:

- after each flush the writer PUBLISHes one short message on ``nexlm:live:{all}`` naming the
  sessions it wrote to (sent after the pipeline's answer, so whoever reads then finds the
  entries: a cluster pipeline runs on several nodes at once, in no order between them);
- the reader subscribes once; for the watched sessions a message names, it reads what is new
  without blocking: one ``XREAD`` per session (its index and the replies followed in it share
  the session's slot), all in one cluster pipeline;
- every ``POLL`` seconds it reads every watched session the same way, so a lost message (pub/sub
  is at most once) delays what a listener gets, never loses it.

Positions, mirrors, floors and dedup are the single-node reader's (``_read_entries``,
``_indexed``, ``_deliver``): in order, no gap, no duplicate, whatever woke the read.
"""

from __future__ import annotations

import asyncio
import logging

from redis import exceptions as rexc

from .redis_conn import honour_cancel, tagged, valid_sid
from .redis_events import RedisEventLog, index_key

log = logging.getLogger(__name__)

CHANNEL = tagged("live", "all")
POLL = 1.0  # seconds between safety reads of every watched session
COUNT = 1000  # entries per stream per read; a stream that filled it is read again at once


class ClusterEventLog(RedisEventLog):
    """``RedisEventLog`` for a Redis Cluster: the writer tells the readers (``tell_readers``, not the
    writer's ``announce``, which lists a reply in its session's index), the reader reads per session."""

    def __init__(self, client, instance: str, keep: float, cluster: bool = True) -> None:
        super().__init__(client, instance, keep, True)  # (``cluster``: open_shared's one signature)
        self._due: set[str] = set()  # watched sessions named on the channel since their last read

    # -------------------------------------------------------------- writing, watching

    async def flush(self) -> list[tuple]:
        # After the pipeline's answer: telling the readers never runs ahead of the data.
        ops = await super().flush()
        await self.tell_readers({op[1] for op in ops if op[1]})
        honour_cancel()
        return ops

    async def tell_readers(self, sessions) -> None:
        """Tell the other instances' readers these sessions have new entries (best effort)."""
        if sessions:
            try:
                await self.r.publish(CHANNEL, " ".join(sorted(sessions)))
            except (rexc.RedisError, OSError) as exc:
                log.warning("redis: announcing new reply events failed (%s); others read them on their poll", exc)

    def subscribe(self, cid: str, outbox, after: int | None = None, running: str | None = None) -> None:
        new = cid not in self._watch
        super().subscribe(cid, outbox, after, running)
        if new and cid in self._watch:  # its index may have moved since the snapshot: read it at once
            self._due.add(cid)

    def _wake(self) -> None:
        self._want.set()  # a new watch or follow: the reader is in this process, no wake stream needed

    # -------------------------------------------------------------- reading

    async def run_reader(self) -> None:
        listener = asyncio.create_task(self._listen(), name="redis cluster announcements")
        try:
            while True:
                honour_cancel()
                try:
                    await self._read_cluster_once()
                except (rexc.RedisError, OSError) as exc:
                    log.warning("redis: reading other instances' replies failed (%s); retrying", exc)
                    self._due.update(self._watch)  # read everything again once Redis answers
                    await asyncio.sleep(1.0)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _listen(self) -> None:
        while True:
            pubsub = self.r.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                self._due.update(self._watch)  # what was written while not subscribed
                self._want.set()
                while True:
                    honour_cancel()
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg and msg["type"] == "message":
                        named = [s for s in msg["data"].decode().split() if s in self._watch]
                        if named:
                            self._due.update(named)
                            self._want.set()
            except (rexc.RedisError, OSError) as exc:
                log.warning("redis: the announcement channel failed (%s); subscribing again", exc)
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()

    async def _read_cluster_once(self) -> None:
        self._want.clear()  # before looking: a watch, follow or announcement from now on wakes the wait
        self._prune()
        if not self._watch:
            self._due.clear()
            await self._want.wait()
            return
        await self._catch_up()
        due = [cid for cid in self._watch if cid in self._due]
        if not due:
            try:
                async with asyncio.timeout(POLL):
                    await self._want.wait()
                return  # something changed: look again from the top
            except TimeoutError:
                due = list(self._watch)
        self._due.difference_update(due)
        await self.read_sessions(due)

    async def read_sessions(self, sessions: list[str]) -> None:
        """Read what is new in these watched sessions: one XREAD each (one slot), one pipeline."""
        sessions = [cid for cid in sessions if cid in self._watch and valid_sid(cid)]
        if not sessions:
            return
        pipe = self.r.pipeline(transaction=False)
        asked = []
        for cid in sessions:
            follows = [f for f in self._follows.values() if f.cid == cid]
            streams = {index_key(cid): self._watch[cid]}
            streams.update({f.key: f"0-{f.pos}" for f in follows})
            pipe.xread(streams, count=COUNT)
            asked.append(cid)
        answers = await pipe.execute()
        for cid, answer in zip(asked, answers):
            full = False
            for name, entries in answer or ():
                full = full or len(entries) >= COUNT
                name = name.decode()
                if name in self._follows:
                    await self._read_entries(self._follows[name], entries)
                elif name == index_key(cid) and cid in self._watch:
                    self._indexed(cid, entries)
            if full:  # more than one read's worth: the next round reads on at once
                self._due.add(cid)
                self._want.set()
