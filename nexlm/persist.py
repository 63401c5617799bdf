"""Writing records back to a store that outlives the process: coalesced, in order, off the token path.

A change (a committed turn, a setting, an accepted question) asks for a write
(``write_soon``); at most one write per conversation is in flight, and changes
made meanwhile are folded into one more. A running reply's record carries its
assistant turn as ``finish_reason: "streaming"`` with the text so far; the
ticker checkpoints it at most once per ``interval`` while new text arrives, so
``kill -9`` loses at most the last interval's text. Nothing here is awaited by a
reply: replies never wait for the disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import Conversation
    from .runner import Live
    from .store import Store

log = logging.getLogger(__name__)

STREAMING = "streaming"
CHECKPOINT_SECONDS = 1.0
SEQ_SKIP = 100_000


def record_of(live: Live) -> Conversation:
    """What the store keeps for ``live`` now: its record, plus the running reply's turn so far."""
    reply = live.reply
    if reply is None or reply.finish_reason is not None:
        return live.conv
    return replace(live.conv, history=[*live.conv.history, reply.entry(STREAMING)])


def left_streaming(conv: Conversation) -> bool:
    """Does the record end with a running (or, if nothing runs it any more, dead) reply's turn?"""
    h = conv.history
    return bool(h) and h[-1].get("role") == "assistant" and h[-1].get("finish_reason") == STREAMING


def recover(conv: Conversation) -> bool:
    """A record left with a ``streaming`` turn by a process that died: that turn ends ``interrupted``,
    with the text of its last checkpoint. True if it changed.

    Its ``seq`` is as old as that checkpoint, but clients saw the events sent after it (and ignore
    a seq they have seen): it skips ahead by ``SEQ_SKIP``, more than a reply sends between two
    checkpoints, so the next reply's events are new to them."""
    h = conv.history
    if left_streaming(conv):
        h[-1] = {**h[-1], "finish_reason": "interrupted"}
        conv.seq += SEQ_SKIP
        return True
    return False


class Persister:
    def __init__(self, store: Store, interval: float = CHECKPOINT_SECONDS) -> None:
        self.store = store
        self.interval = interval
        self._writing: dict[str, asyncio.Task] = {}
        self._again: set[str] = set()
        self._settled: set[str] = set()  # replies' final records stored by ``settle``, nothing asked since
        # cid -> (live, text pieces at its last write, when it was written: monotonic)
        self._running: dict[str, tuple[Live, int, float]] = {}
        self._ticker: asyncio.Task | None = None

    def write_soon(self, live: Live) -> None:
        """Write ``live``'s record as soon as the write before it (if any) is done."""
        self._settled.discard(live.id)
        if live.id in self._writing:
            self._again.add(live.id)
            return
        self._writing[live.id] = asyncio.create_task(self._write(live), name=f"write {live.id[:6]}")

    def pending(self, cid: str) -> bool:
        """Is a write of ``cid`` asked for or in flight (this process has news the store lacks)?"""
        return cid in self._writing

    async def _write(self, live: Live) -> None:
        try:
            while True:
                self._again.discard(live.id)
                reply = live.reply
                if live.id in self._running and reply is not None:
                    self._running[live.id] = (live, len(reply.content), time.monotonic())
                try:
                    await self.store.put(record_of(live))
                except Exception as exc:  # the next change or checkpoint tries again
                    log.error("session %s..: writing its record failed: %s", live.id[:6], exc)
                if live.id not in self._again:
                    return
        finally:
            self._writing.pop(live.id, None)

    # -- running replies

    def started(self, live: Live) -> None:
        """A reply began: write the question (and the empty streaming turn), checkpoint from now on."""
        self._running[live.id] = (live, 0, time.monotonic())
        self.write_soon(live)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick(), name="checkpoints")

    def ended(self, live: Live) -> None:
        """A reply was recorded (or a setting changed): written now; not when ``settle`` stored this
        very record before the reply's ``done``. Then nothing of the reply is written after its
        ``done``, which another instance may act on: a reset or a delete through it stays done."""
        self._running.pop(live.id, None)
        if live.reply is None and live.id in self._settled:
            self._settled.discard(live.id)
            return
        self.write_soon(live)

    def settler(self):
        """``settle`` for a store other instances read (``shared``), else None: nothing to wait for."""
        return self.settle if getattr(self.store, "shared", False) else None

    async def settle(self, live: Live, history: list[dict]) -> None:
        """Store a reply's final record now (awaited before its ``done``: ``Runner(settle=...)``), after
        the checkpoint in flight, so a shared store never shows an ended reply as streaming. It is
        the record as the reply leaves it (``history`` with its turn, ``seq`` its ``done``'s): the
        runner writes nothing after ``done`` then."""
        self._running.pop(live.id, None)  # no more checkpoints
        pending = self._writing.get(live.id)
        if pending is not None:
            await asyncio.wait([pending])
        self._settled.add(live.id)  # (until a write is asked for meanwhile: then it is written after done)
        try:
            await self.store.put(replace(live.conv, history=history, seq=live.conv.seq + 1, updated=time.time()))
        except BaseException:
            self._settled.discard(live.id)
            raise

    def write_of(self, cid: str) -> asyncio.Task | None:
        """The write of ``cid``'s record asked for or in flight (its end: the store has this process's news)."""
        return self._writing.get(cid)

    async def _tick(self) -> None:
        """Checkpoint each running reply about every ``interval`` from its own start, looking ten
        times per interval: writing them all in one tick stalled every stream at once (bench
        STORES, sqlite, 200 paced streams: 167 of 200 with a gap over 40 ms)."""
        while self._running:
            await asyncio.sleep(self.interval / 10)
            due = time.monotonic() - self.interval
            for cid, (live, written, at) in list(self._running.items()):
                reply = live.reply
                if at <= due and reply is not None and len(reply.content) != written and cid not in self._writing:
                    self.write_soon(live)

    # -- shutdown

    async def flush(self) -> None:
        """Wait for every write asked for so far (shutdown: before the store closes)."""
        while self._writing:
            await asyncio.wait(list(self._writing.values()))

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.wait([self._ticker])
        await self.flush()
