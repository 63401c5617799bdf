"""The in-memory session store: conversation state, bounded by idle TTL and caps.

A session holds the model and parameters chosen for it, its history, the
connections listening to it, and at most one running reply. The store owns no
tasks of its own but the sweeper the app starts and stops; ending a reply is
the chat layer's job, which the store asks for through ``on_evict``.

The caps (``[chat] max_sessions``, ``[limits] max_sessions_per_client``) make
room by evicting idle sessions only (no running reply, no listener), least
recently used first; when none is idle the new session is refused
(``SessionLimit``): a flood of new sessions never ends someone's live one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .chat import Reply
    from .events import Outbox

log = logging.getLogger(__name__)

RECENT_REPLIES = 3


class Session:
    __slots__ = (
        "id", "owner", "client", "model", "params", "history", "reply", "recent",
        "seq", "listeners", "last_active", "grace_timer", "closed",
    )

    def __init__(self, owner: str | None, client: str, model: str, params: dict) -> None:
        self.id = secrets.token_urlsafe(18)
        self.owner = owner  # the auth principal that made it; None when auth is off
        self.client = client  # who is counted for per-client limits
        self.model = model
        self.params = params
        self.history: list[dict] = []
        self.reply: Reply | None = None  # the running reply, if any
        # The last few replies, with their events, so a client that reconnects with
        # after=SEQ gets exactly what it missed even if another reply came since.
        self.recent: list[Reply] = []  # at most RECENT_REPLIES; a list: 700 bytes smaller than a deque
        self.seq = 0  # last seq handed out; rises by one per reply event
        self.listeners: set[Outbox] = set()
        self.last_active = time.monotonic()
        self.grace_timer: asyncio.TimerHandle | None = None
        self.closed: str | None = None  # why the store dropped it (evicted, expired, deleted)

    def emit(self, event: dict) -> dict:
        """Number a reply event, log it for resume, hand it to every listener."""
        self.seq += 1
        event["seq"] = self.seq
        reply = self.reply
        if reply is not None:
            reply.log.append(event)
        for outbox in self.listeners:
            outbox.put(event)
        return event

    def broadcast(self, event: dict) -> None:
        """An event outside any reply (no seq): a settings change, a reset."""
        for outbox in self.listeners:
            outbox.put(event)

    def frame(self) -> dict:
        """The ``session`` frame: everything a client needs to draw the conversation."""
        frame = {
            "type": "session",
            "session": self.id,
            "model": self.model,
            "params": dict(self.params),
            "history": list(self.history),
            "seq": self.seq,
        }
        if self.reply is not None:
            frame["running"] = {"reply": self.reply.id, "model": self.reply.model}
        return frame

    def public(self) -> dict:
        """``GET /api/sessions/{id}``."""
        f = self.frame()
        del f["type"]
        return f


class SessionLimit(Exception):
    """No room for a new session: every session in the way is in use."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def idle(s: Session) -> bool:
    return s.reply is None and not s.listeners


class SessionStore:
    """Sessions by id, least recently used first."""

    def __init__(self, ttl: float, max_sessions: int, max_per_client: int,
                 on_evict: Callable[[Session, str], None]) -> None:
        self.ttl = ttl
        self.max_sessions = max(1, max_sessions)
        self.max_per_client = max(1, max_per_client)
        self._on_evict = on_evict
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._per_client: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def add(self, session: Session) -> Session:
        """Store a new session, evicting idle ones past the caps; ``SessionLimit`` if none is idle."""
        if self._per_client.get(session.client, 0) >= self.max_per_client:
            oldest = next((s for s in self._sessions.values() if s.client == session.client and idle(s)), None)
            if oldest is None:
                raise SessionLimit("busy", f"You have {self.max_per_client} conversations in use; "
                                           "close one and try again.")
            self.remove(oldest.id, "too many sessions for this client")
        while len(self._sessions) >= self.max_sessions:
            oldest = next((s for s in self._sessions.values() if idle(s)), None)
            if oldest is None:
                raise SessionLimit("overloaded", "The server has too many conversations in use right now. "
                                                 "Try again shortly.")
            self.remove(oldest.id, "session limit reached")
        self._sessions[session.id] = session
        self._per_client[session.client] = self._per_client.get(session.client, 0) + 1
        return session

    def get(self, sid: str | None) -> Session | None:
        if not isinstance(sid, str):
            return None
        s = self._sessions.get(sid)
        if s is not None:
            self.touch(s)
        return s

    def touch(self, session: Session) -> None:
        session.last_active = time.monotonic()
        if session.id in self._sessions:
            self._sessions.move_to_end(session.id)

    def remove(self, sid: str, why: str = "deleted") -> Session | None:
        s = self._sessions.pop(sid, None)
        if s is None:
            return None
        n = self._per_client.get(s.client, 1) - 1
        if n > 0:
            self._per_client[s.client] = n
        else:
            self._per_client.pop(s.client, None)
        self._on_evict(s, why)
        return s

    def expire(self, now: float | None = None) -> int:
        """Forget idle sessions: nobody listening, nothing running, quiet for ``ttl``."""
        now = time.monotonic() if now is None else now
        stale = [s.id for s in self._sessions.values()
                 if not s.listeners and s.reply is None and now - s.last_active > self.ttl]
        for sid in stale:
            self.remove(sid, "expired")
        return len(stale)
