"""Stream timeouts that cost one attribute store per chunk.

Re-arming a timer on every chunk (aiohttp's ``sock_read``, ``Timeout.reschedule``)
was a fifth of the relay's CPU on paced streams. A watchdog keeps one timer per
stream and re-arms it lazily: progress only records the time, and when the
timer fires it either finds the stream quiet for too long (and cancels the
task) or sets itself for the new due time.
"""

from __future__ import annotations

import asyncio


class Watchdog:
    """First-token and idle bounds for the stream being read by the current task.

    Until the response headers arrive only the first-token deadline applies (or,
    without one, the idle bound); then both do (keep-alive comments are activity, not progress: they reset the
    idle bound but not the first-token deadline); after the first token only the
    idle bound does. It cancels the task only while the stream is
    waiting for the upstream (``reading``), never while the consumer holds a
    yielded event.
    """

    __slots__ = ("_loop", "_task", "_first", "_idle", "idle_on", "last", "got_token", "reading", "fired",
                 "_handle")

    def __init__(self, first_token: float | None, idle: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        now = self._loop.time()
        self._first = now + first_token if first_token else None
        self._idle = idle or None
        self.idle_on = False  # set when the response has begun
        self.last = now
        self.got_token = False
        self.reading = True
        self.fired: str | None = None  # "first_token" or "idle" once it has cancelled the task
        self._handle: asyncio.TimerHandle | None = None
        self._arm()

    def start_idle(self) -> None:
        """The response has begun: from now on silence counts."""
        self.last = self._loop.time()
        self.idle_on = True
        if self._handle is not None:
            self._handle.cancel()
        self._arm()

    def _due(self) -> float | None:
        idle_due = self.last + self._idle if self._idle else None
        if self._first is None or self.got_token:
            return idle_due
        if not self.idle_on:
            return self._first  # waiting for headers: the first-token deadline alone bounds it
        return self._first if idle_due is None else min(self._first, idle_due)

    def _arm(self) -> None:
        due = self._due()
        self._handle = None if due is None else self._loop.call_at(due, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        due = self._due()
        if due is None:
            self._handle = None
            return
        if now < due or not self.reading:
            self._handle = self._loop.call_at(max(due, now + 0.01), self._check)
            return
        first_missed = not self.got_token and self._first is not None and now >= self._first
        self.fired = "first_token" if first_missed else "idle"
        self._handle = None
        self._task.cancel()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
