"""Reply events of each conversation: numbered (``seq``), kept for resume, fanned out to listeners.

Every reply event gets the conversation's next ``seq``. The events of its last
few replies are kept (for ``resume_grace_seconds`` after they end) so a client
that reconnects with ``after=SEQ`` gets exactly what it missed, even if another
reply came since. The listeners are per-connection outboxes: an event is put
into each, never awaited, so no reader can stall a reply.

Kept per reply, not per conversation: a new turn never collides with an old
one's events. In memory for now; a shared store can keep the same shape in
Redis Streams (one stream per reply) with pub/sub for the listeners.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .events import Outbox
    from .records import Conversation

RECENT_REPLIES = 3


class _ReplyLog:
    __slots__ = ("id", "events", "finished")

    def __init__(self, reply_id: str) -> None:
        self.id = reply_id
        self.events: list[dict] = []
        self.finished: float | None = None  # monotonic time of its done


class _Topic:
    __slots__ = ("listeners", "replies")

    def __init__(self) -> None:
        self.listeners: set[Outbox] = set()
        self.replies: list[_ReplyLog] = []  # at most RECENT_REPLIES, oldest first


class EventLog:
    def __init__(self) -> None:
        self._topics: dict[str, _Topic] = {}

    def _topic(self, cid: str) -> _Topic:
        t = self._topics.get(cid)
        if t is None:
            t = self._topics[cid] = _Topic()
        return t

    # -- writing

    def begin(self, cid: str, reply_id: str) -> None:
        t = self._topic(cid)
        t.replies.append(_ReplyLog(reply_id))
        if len(t.replies) > RECENT_REPLIES:
            del t.replies[0]

    def emit(self, conv: Conversation, reply_id: str, event: dict, fan_out: bool = True) -> dict:
        """Number a reply event, keep it for resume, hand it to every listener (unless not ``fan_out``)."""
        conv.seq += 1
        event["seq"] = conv.seq
        t = self._topic(conv.id)
        if t.replies and t.replies[-1].id == reply_id:
            t.replies[-1].events.append(event)
        for outbox in t.listeners if fan_out else ():
            outbox.put(event)
        return event

    def end(self, cid: str, reply_id: str, now: float | None = None) -> None:
        t = self._topics.get(cid)
        for r in t.replies if t else ():
            if r.id == reply_id:
                r.finished = time.monotonic() if now is None else now

    def broadcast(self, cid: str, event: dict) -> None:
        """An event outside any reply (no seq): a settings change, a reset."""
        t = self._topics.get(cid)
        for outbox in t.listeners if t else ():
            outbox.put(event)

    # -- listeners

    def subscribe(self, cid: str, outbox: Outbox, after: int | None = None, running: str | None = None) -> None:
        """Add a listener; replay the events after ``after``, else the running reply's so far."""
        t = self._topic(cid)
        t.listeners.add(outbox)
        if after is not None:
            for r in t.replies:
                if r.events and r.events[-1]["seq"] > after:
                    for ev in r.events:
                        if ev["seq"] > after:
                            outbox.put(ev)
        elif running is not None:
            for r in t.replies:
                if r.id == running:
                    for ev in r.events:
                        outbox.put(ev)

    def unsubscribe(self, cid: str, outbox: Outbox) -> int:
        """Remove a listener; how many are left."""
        t = self._topics.get(cid)
        if t is None:
            return 0
        t.listeners.discard(outbox)
        return len(t.listeners)

    def listeners(self, cid: str) -> set[Outbox]:
        t = self._topics.get(cid)
        return t.listeners if t else set()

    def release(self, cid: str) -> set[Outbox]:
        """Forget the conversation; its listeners, for the caller to close."""
        t = self._topics.pop(cid, None)
        return t.listeners if t else set()

    # -- resume

    def missed(self, cid: str, after: int) -> bool:
        """Are there kept events after ``after``?"""
        t = self._topics.get(cid)
        return bool(t) and any(r.events and r.events[-1]["seq"] > after for r in t.replies)

    def last_reply(self, cid: str) -> str | None:
        t = self._topics.get(cid)
        return t.replies[-1].id if t and t.replies else None

    def first_seq(self, cid: str, reply_id: str) -> int | None:
        t = self._topics.get(cid)
        for r in t.replies if t else ():
            if r.id == reply_id and r.events:
                return r.events[0]["seq"]
        return None

    def forget(self, cid: str) -> None:
        """Drop the kept events (a reset)."""
        t = self._topics.get(cid)
        if t is not None:
            t.replies.clear()

    def forget_old(self, keep: float, busy, now: float | None = None) -> list[str]:
        """Drop the events of replies that ended more than ``keep`` seconds ago; drop
        conversations with nothing left and no listener unless ``busy(cid)``. Returns those dropped."""
        now = time.monotonic() if now is None else now
        gone = []
        for cid, t in list(self._topics.items()):
            while t.replies and t.replies[0].finished is not None and now - t.replies[0].finished > keep:
                del t.replies[0]
            if not t.replies and not t.listeners and not busy(cid):
                del self._topics[cid]
                gone.append(cid)
        return gone

    def active(self) -> int:
        return len(self._topics)
