"""Live, process-local state: conversations in use here, their running replies, timers.

A ``Live`` wraps a conversation's record while something happens to it in this
process (a listener, a running reply, a resume window). Each reply is a task
owned by the ``Runner``: a stop, a vanished client (after the resume grace), an
evicted conversation or shutdown cancels it, and ``_finish`` records its
assistant turn exactly once, with exactly the text that was sent. Replies never
wait for clients: their events go through the event log into per-connection
outboxes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from functools import partial
from typing import Callable

from . import wire
from .engine import Turn
from .eventlog import EventLog
from .limits import Limiter
from .providers.base import Queued, ReasoningDelta, StreamError, TextDelta
from .records import Conversation

log = logging.getLogger(__name__)
SETTLE_SECONDS = 2.0  # a slow store delays a reply's done by at most this


class Reply:
    __slots__ = ("id", "client", "turn", "task", "content", "reasoning", "finish_reason")

    def __init__(self, turn: Turn, client: str, reply_id: str | None = None) -> None:
        self.id = reply_id or secrets.token_urlsafe(9)
        self.client = client
        self.turn = turn
        self.task: asyncio.Task | None = None
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.finish_reason: str | None = None  # set once, when the turn is recorded

    @property
    def stop_reason(self) -> str | None:
        """Why we cancelled it: "stopped" or "interrupted" (kept on the turn, which its observers see)."""
        return self.turn.stop_reason

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def model(self) -> str:
        return self.turn.model

    def entry(self, finish: str) -> dict:
        """The assistant turn as the history keeps it (``streaming`` while it runs)."""
        turn = self.turn
        entry = {"role": "assistant", "content": self.text, "finish_reason": finish, "model": turn.model}
        if self.reasoning:
            entry["reasoning"] = "".join(self.reasoning)
        if turn.usage:
            entry["usage"] = turn.usage
        return entry


class Live:
    __slots__ = ("conv", "reply", "grace_timer", "closed")

    def __init__(self, conv: Conversation) -> None:
        self.conv = conv
        self.reply: Reply | None = None  # the running reply, if any
        self.grace_timer: asyncio.TimerHandle | None = None
        self.closed: str | None = None  # why it was dropped (evicted, expired, deleted)

    @property
    def id(self) -> str:
        return self.conv.id


class Runner:
    def __init__(self, events: EventLog, limiter: Limiter, max_history: int,
                 on_commit: Callable[[Live], None], on_released: Callable[[Live], None],
                 background: bool = False, settle: Callable | None = None) -> None:
        self.events = events
        # ``await settle(live, history)`` before ``done`` goes out (a store other instances
        # read: the final turn is stored first, so one asked right after ``done`` has it).
        self._settle = settle
        self.background = background  # replies nobody listens to run to their end
        self.limiter = limiter
        self.max_history = max_history
        self._on_commit = on_commit  # a turn was recorded: write the record back
        self._on_released = on_released  # a closed conversation's last reply ended
        self.tasks: set[asyncio.Task] = set()
        # Replies nobody listens to (in their resume grace): on a single-slot provider they
        # give the slot up as soon as another reply waits for it.
        self._orphans: dict[Reply, Live] = {}

    # -- running

    def launch(self, live: Live, turn: Turn, reply_id: str | None = None) -> Reply:
        reply = Reply(turn, live.conv.client, reply_id)
        live.reply = reply
        self.events.begin(live.id, reply.id)
        self.events.emit(live.conv, reply.id, wire.start(reply.id, reply.model))
        task = asyncio.create_task(self._run(live, reply), name=f"reply {reply.id}")
        reply.task = task
        self.tasks.add(task)
        task.add_done_callback(partial(self._task_done, live, reply))
        return reply

    async def _run(self, live: Live, reply: Reply) -> None:
        conv, rid = live.conv, reply.id
        try:
            async for ev in reply.turn:
                kind = type(ev)
                if kind is TextDelta:
                    reply.content.append(ev.text)
                    self.events.emit(conv, rid, wire.delta(rid, ev.text))
                elif kind is ReasoningDelta:
                    reply.reasoning.append(ev.text)
                    self.events.emit(conv, rid, wire.reasoning(rid, ev.text))
                elif kind is Queued:
                    self.events.emit(conv, rid, wire.status(rid, "queued", ev.ahead))
                    self._release_orphans(reply.turn.provider)
                elif kind is StreamError:
                    self.events.emit(conv, rid, wire.error(ev.code, ev.message, rid))
            finish = reply.turn.finish or "error"
        except asyncio.CancelledError:
            if reply.stop_reason is None:
                raise  # not ours (shutdown): the done-callback records it as interrupted
            asyncio.current_task().uncancel()
            finish = reply.stop_reason
        except Exception:
            log.exception("reply %s failed", rid)
            self.events.emit(conv, rid, wire.error("internal_error",
                                                   "Something went wrong on the server while answering.", rid))
            finish = "error"
        if self._settle is not None and reply.finish_reason is None:
            try:
                await asyncio.wait_for(self._settle(live, self._with_turn(live.conv.history, reply.entry(finish))),
                                       SETTLE_SECONDS)
            except asyncio.CancelledError:
                self._finish(live, reply, finish)
                raise
            except Exception as exc:  # (the commit after done writes it again)
                log.error("reply %s: its final turn was not stored before done: %s", rid, exc)
        self._finish(live, reply, finish)

    def _with_turn(self, history: list[dict], entry: dict) -> list[dict]:
        """``history`` and the reply's turn, cut to ``max_history`` (the record as ``_finish`` leaves it)."""
        history = [*history, entry]
        if len(history) > self.max_history:
            drop = len(history) - self.max_history
            drop += drop % 2  # whole turns, so the history still starts with a user message
            del history[:drop]
        return history

    def _finish(self, live: Live, reply: Reply, finish: str) -> None:
        """Record the assistant turn and send ``done``: exactly once per reply."""
        if reply.finish_reason is not None:
            return
        reply.finish_reason = finish
        turn = reply.turn
        live.conv.history[:] = self._with_turn(live.conv.history, reply.entry(finish))
        now = time.monotonic()
        live.conv.updated = time.time()
        self.events.emit(live.conv, reply.id, wire.done(reply.id, finish, turn.usage, turn.model,
                                                        turn.timing(now), turn.fallback, turn.cached))
        self.events.end(live.id, reply.id, now)
        turn.end(finish)  # observers see what was recorded (a no-op if the turn ended itself)
        if live.reply is reply:
            live.reply = None
        if live.grace_timer is not None:
            live.grace_timer.cancel()
            live.grace_timer = None
        self._orphans.pop(reply, None)
        self.limiter.release_reply(reply.client)
        if live.closed:
            self._on_released(live)
        else:
            self._on_commit(live)

    def _task_done(self, live: Live, reply: Reply, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # _run catches all; belt and braces
            log.error("reply task %s ended with %r", reply.id, task.exception())
        # Cancelled before it ran, or by shutdown: the turn is still recorded.
        self._finish(live, reply, reply.stop_reason or "interrupted")

    # -- stopping

    def cancel(self, reply: Reply, reason: str) -> bool:
        if reply.task is None or reply.task.done() or reply.finish_reason is not None:
            return False
        if reply.turn.stop_reason is None:
            reply.turn.stop_reason = reason
        reply.task.cancel()
        return True

    async def stop(self, live: Live, reason: str = "stopped") -> bool:
        """Cancel the running reply (closing its upstream request) and wait until it is recorded."""
        reply = live.reply
        if reply is None or not self.cancel(reply, reason):
            return False
        await asyncio.wait([reply.task])
        return True

    # -- nobody listening

    def listener_back(self, live: Live) -> None:
        if live.grace_timer is not None:
            live.grace_timer.cancel()
            live.grace_timer = None
        if live.reply is not None:
            self._orphans.pop(live.reply, None)

    def nobody_listening(self, live: Live, grace: float, closing: bool) -> None:
        """The last listener left: the reply runs on for the resume grace (or stops now), or to its
        end with ``background`` (a single-slot model's reply still yields to one that waits)."""
        reply = live.reply
        if reply is None:
            return
        provider = reply.turn.provider
        if closing or (provider.single_slot and provider.waiting()):
            self.cancel(reply, "interrupted")
            return
        if provider.single_slot:
            self._orphans[reply] = live  # still gives the one slot up when another reply waits
        if self.background:
            return  # [chat] background_replies: it runs to its end and is stored, whatever the grace
        if grace <= 0:
            self._orphans.pop(reply, None)
            self.cancel(reply, "interrupted")
            return
        if live.grace_timer is None:
            live.grace_timer = asyncio.get_running_loop().call_later(grace, self._grace_over, live, reply)

    def _grace_over(self, live: Live, reply: Reply) -> None:
        live.grace_timer = None
        if live.reply is reply and not self.events.listeners(live.id):
            log.info("reply %s: nobody came back within the grace period", reply.id)
            self.cancel(reply, "interrupted")

    def _release_orphans(self, provider) -> None:
        """Someone waits for ``provider``'s one slot: replies nobody listens to give it up now
        (their text so far is kept, ``interrupted``) instead of holding it for the resume grace."""
        for reply in [r for r in self._orphans if r.turn.provider is provider]:
            log.info("reply %s: nobody is listening and another reply waits for the model", reply.id)
            self.cancel(reply, "interrupted")

    # -- shutdown

    async def close(self, grace: float, lives, cancel_wait: float | None = None) -> None:
        """Let running replies finish for up to ``grace`` seconds, then interrupt the rest."""
        tasks = set(self.tasks)
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for live in lives:
            if live.reply is not None:
                self.cancel(live.reply, "interrupted")
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=cancel_wait)
