"""The facade's read-only views: one conversation (``view``), all of them, and counters (``stats``).

For metrics and the test invariants (tests/invariants.py), whatever the store: they read
what this process holds and what the store can answer without I/O, never store internals.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class View:
    """A read-only look at one conversation (metrics, tests): no handle to anything live."""

    id: str
    owner: str | None
    model: str
    params: dict
    history: list[dict]
    seq: int
    reply: str | None  # the running reply's id
    listeners: tuple  # each listener's outbox (its length and .bytes: what is queued for it)
    grace_timer: bool


class Views:
    """Mixed into ``Conversations`` (which has ``live``, ``store``, ``events``, ``runner``, ``limiter``)."""

    def view(self, sid: str) -> View | None:
        live = self.live.get(sid)
        conv = live.conv if live is not None else self.store.peek_now(sid)  # (None: not without I/O)
        if conv is None:
            return None
        return View(conv.id, conv.owner, conv.model, dict(conv.params), [dict(t) for t in conv.history], conv.seq,
                    live.reply.id if live is not None and live.reply is not None else None,
                    tuple(self.events.listeners(sid)),
                    live is not None and live.grace_timer is not None)

    def views(self) -> list[View]:
        return [v for sid in dict.fromkeys([*self.store.ids_now(), *self.live]) if (v := self.view(sid)) is not None]

    def stats(self) -> dict:
        """A public view for metrics and the test invariants, whatever the store."""
        lives = list(self.live.values())
        return {
            "sessions": self.store.size,
            "live": len(lives),
            "replies_running": sum(live.reply is not None for live in lives),
            "grace_timers": sum(live.grace_timer is not None for live in lives),
            "listeners": sum(len(self.events.listeners(live.id)) for live in lives),
            "reply_tasks": len(self.runner.tasks),
            "limiter_running": self.limiter.running_total,
            "limiter_clients": self.limiter.running_clients(),
        }
