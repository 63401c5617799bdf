"""Worker threads for the embedded model, and the one slot they take turns on.

Nothing of llama.cpp runs on the event loop: a generation runs in a daemon
thread at a lower priority, hands its output to the loop in batches
(``_Handoff``), and is joined without blocking the loop (``_join``). One
generation at a time: requests queue in arrival order on a ``_Slot`` and can ask
their place in it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Any, Callable

from .base import ProviderEvent

WORKER_NICE = 5  # added to the niceness of generation threads; 0 leaves it alone


class _Handoff:
    """Worker thread -> event loop. ``put`` from the thread, ``get_all`` on the loop.

    The thread appends under a lock and schedules one wake-up only if none is
    pending; the loop takes everything that accumulated. Tokens arriving faster
    than the loop drains them are batched instead of queued as callbacks.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[ProviderEvent] = []
        self._wake_pending = False
        self._ready = asyncio.Event()

    def put(self, item: ProviderEvent) -> None:
        with self._lock:
            self._items.append(item)
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def wake(self) -> None:
        """On the loop: let ``get_all`` return even with nothing new."""
        self._ready.set()

    async def get_all(self) -> list[ProviderEvent]:
        await self._ready.wait()
        self._ready.clear()
        with self._lock:
            items, self._items = self._items, []
            self._wake_pending = False
        return items


def _start_thread(
    name: str, fn: Callable[..., Any], *args: Any
) -> tuple[concurrent.futures.Future, threading.Thread]:
    """Run ``fn(*args)`` in a new daemon thread; its result or exception lands in the future.

    Daemon, so a generation never keeps the interpreter from exiting; the
    provider's exit hook still stops running generations and waits for them
    briefly, so none is inside llama.cpp while the model is freed.
    """
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
            fut.set_exception(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return fut, thread


async def _join(done: asyncio.Future, thread: threading.Thread) -> None:
    """Wait until the worker behind ``done`` has ended, even if cancelled meanwhile.

    Releasing the model while its thread still decodes would let the next
    request use the context concurrently; so a cancellation here is held back
    until the thread is gone (one token at most), then re-raised.
    """
    interrupted = False
    while not done.done():
        try:
            await asyncio.wait({done})
        except asyncio.CancelledError:
            interrupted = True
    # The thread has handed over its result; all that is left is its return from run(),
    # microseconds, so this join does not hold up the loop.
    thread.join(timeout=1.0)
    if interrupted:
        raise asyncio.CancelledError


def _lower_priority() -> None:
    """Make the calling thread (and the OpenMP threads it starts, which inherit it) yield to the loop.

    On Linux ``nice`` is per thread: the event loop's thread keeps its priority,
    so when a 10 ms timer or a socket wakes it, the scheduler runs it ahead of
    llama.cpp's compute threads instead of behind them.
    """
    if WORKER_NICE <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICE))
    except OSError:
        pass


class _Ticket:
    __slots__ = ("granted", "moved")

    def __init__(self) -> None:
        self.granted = False
        self.moved = asyncio.Event()  # set when the ticket is granted or moves up the queue


class _Slot:
    """One holder at a time, the others in arrival order, each able to ask its place."""

    def __init__(self) -> None:
        self._holder: _Ticket | None = None
        self._queue: list[_Ticket] = []

    def take(self) -> _Ticket:
        t = _Ticket()
        if self._holder is None and not self._queue:
            self._holder, t.granted = t, True
        else:
            self._queue.append(t)
        return t

    def ahead(self, t: _Ticket) -> int:
        """How many are before ``t``: the holder and those queued earlier."""
        return self._queue.index(t) + (self._holder is not None)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def leave(self, t: _Ticket) -> None:
        """Give the slot up (or the place in the queue); everyone behind moves up."""
        if self._holder is t:
            self._holder = None
            if self._queue:
                nxt = self._queue.pop(0)
                self._holder, nxt.granted = nxt, True
        elif t in self._queue:
            self._queue.remove(t)
        else:
            return
        if self._holder is not None:
            self._holder.moved.set()
        for other in self._queue:
            other.moved.set()
