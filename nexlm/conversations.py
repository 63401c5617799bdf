"""The one facade every front door talks to: conversations, their turns, their listeners.

Transports (/ws, /sse, the HTTP API) hold a ``Live`` handle and call methods
here; they never reach into the store, the event log or a reply. Durable data
(``records.Conversation``) lives in the ``store``; what is live in this process
(running replies, listeners, timers) lives beside it (``runner``, ``eventlog``)
only while it is in use, so an idle conversation costs one stored record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial

from . import wire
from .admission import Admission
from .cache import ResponseCache
from .collector import collect_young
from .config import Settings
from .context import context
from .context import params as turn_params
from .engine import Turn
from .eventlog import EventLog
from .events import Outbox
from .facade_views import View, Views  # noqa: F401  (View: imported from here by tests)
from .history import History
from .limits import LimitError
from .persist import Persister, left_streaming, record_of, recover
from .providers.base import ChatRequest
from .providers.registry import Registry, Resolved
from .records import Conversation
from .runner import Live, Reply, Runner
from .shared_facade import Shared
from .store import StoreFull
from .store_factory import make_store
from .validation import ChatError, check_history, check_message, check_params

log = logging.getLogger(__name__)

BUSY = "A reply is still streaming; stop it or wait for it to finish."


class Conversations(Shared, Views):
    def __init__(self, settings: Settings, registry: Registry, admission: Admission | None = None,
                 on_turn_done: Callable[..., None] | None = None) -> None:
        self.settings = settings
        self.registry = registry
        # Shared with the stateless Gateway (/v1): one set of limits and one shutdown flag for all doors.
        self.admission = admission if admission is not None else Admission(settings, registry)
        self.limiter = self.admission.limiter
        # Told once per ended turn, as on_turn_done(turn, session=id): metrics and the reply log line.
        self.on_turn_done = on_turn_done
        self.events = EventLog()
        self.live: dict[str, Live] = {}  # conversations in use in this process
        self.store = make_store(settings, in_use=self._in_use)  # opened by open()
        self.persister = Persister(self.store)  # a durable store: every change written soon, replies checkpointed
        self.runner = Runner(self.events, self.limiter, settings.limits.max_history_messages,
                             on_commit=self._commit, on_released=self._release_listeners,
                             background=settings.background_replies, settle=self.persister.settler())
        self._dirty: set[str] = set()  # live records changed since they were last written (memory store)
        self.history = History(self.store, self.live, partial(self._changed, what="title"))  # GET, PATCH /api/sessions
        self.cache: ResponseCache | None = None  # the response cache (server.py sets it once the store is open)

    async def start(self) -> None:
        """Open the store (``StoreError``: it cannot be used; the server says why and exits)."""
        await self.store.open()
        await self._start_shared()

    async def reply_running_elsewhere(self, conv: Conversation) -> bool:
        """Is a stored ``streaming`` turn still running in another process? A shared store answers."""
        check = getattr(self.shared or self.store, "reply_running_elsewhere", None)  # redis: its lease is held
        return bool(await check(conv)) if check is not None else False

    @property
    def closing(self) -> bool:
        return self.admission.closing

    @closing.setter
    def closing(self, value: bool) -> None:
        self.admission.closing = value

    def _in_use(self, cid: str) -> bool:
        live = self.live.get(cid)
        return live is not None and (live.reply is not None or bool(self.events.listeners(cid)))

    # ------------------------------------------------------------ lookup

    async def open(self, sid: str | None, owner: str | None, client: str) -> tuple[Live, bool]:
        """The conversation ``sid`` if it exists and belongs to ``owner``, else a new one."""
        if sid:
            live = await self.find(sid, owner)
            if live is not None:
                return live, True
        return await self.create(owner, client), False

    async def find(self, sid, owner: str | None) -> Live | None:
        """A conversation by id, as its owner sees it: another owner's does not exist."""
        if not isinstance(sid, str):
            return None
        live = self.live.get(sid)
        if self.shared is not None:
            await self.events.refresh(sid)  # what runs elsewhere, for the frame, resume and busy
        if live is None:
            conv = await self.store.get(sid)
            if conv is None:
                return None
            stale = left_streaming(conv) and not await self.reply_running_elsewhere(conv) and recover(conv)
            if sid not in self.live:  # (another lookup may have won meanwhile)
                self.live[sid] = Live(conv)
                if stale:  # its process died mid-reply: the turn is interrupted, with its last checkpoint
                    self._commit(self.live[sid])
            live = self.live[sid]
        elif self._cached(live):
            conv = await self.store.get(sid)  # another instance may have changed it: the copy is a cache
            if conv is None:
                self._dropped(sid, "deleted")
                return None
            if self._cached(live):  # (the read yielded)
                live.conv.refresh(conv)
        else:
            self.store.touch(sid)
        return live if live.conv.owner == owner else None

    async def create(self, owner: str | None, client: str) -> Live:
        """A new conversation. It counts against the client's ``sessions_per_minute`` (``rate_limited``,
        429) and needs room in the store (``overloaded``/``busy``, 503, when all in the way are in use)."""
        conv = await self._add(Conversation(owner, client, self.registry.default_model()))
        live = self.live[conv.id] = Live(conv)
        return live

    async def _add(self, conv: Conversation) -> Conversation:
        try:
            await self.limiter.admit_session(conv.client)
        except LimitError as exc:
            raise ChatError(exc.code, exc.message, 429 if exc.code == "rate_limited" else 503, exc.retry_after) from None
        try:
            evicted = await self.store.add(conv)
        except StoreFull as exc:
            raise ChatError(exc.code, exc.message, 503, 5) from None
        for cid in evicted:
            self._dropped(cid, "session limit reached")
        return conv

    async def create_seeded(self, owner: str | None, client: str, model=None, params=None,
                            history=None) -> Live:
        """A new conversation with a model, params and a history (``POST /api/sessions``),
        all checked before it exists. Nothing runs in it and nobody listens yet, so it is
        stored as a record only, not kept live (the client's /ws or /sse makes it live)."""
        conv = Conversation(owner, client, self.registry.default_model())
        conv.model, conv.params = self._choice(conv, model, params)
        conv.history = check_history(self.settings.limits, history) if history is not None else []
        return Live(await self._add(conv))

    async def delete(self, live: Live) -> None:
        await self.stop(live)  # (shared: also a reply running on another instance, its upstream request closed)
        await self.store.delete(live.id)
        self._dropped(live.id, "deleted")
        self._tell(live.id, "deleted")

    def _dropped(self, cid: str, why: str) -> None:
        """The store no longer has ``cid``: end its reply, then tell its listeners and let them go."""
        live = self.live.get(cid)
        if live is None:
            return
        log.info("session %s.. removed: %s", cid[:6], why)
        live.closed = why
        if live.reply is None or not self.runner.cancel(live.reply, "interrupted"):
            self._release_listeners(live)
        # else: the runner sends the reply's done first, then releases the listeners.

    def _release_listeners(self, live: Live) -> None:
        if live.closed != "deleted":
            self.events.broadcast(live.id, wire.error(
                "session_expired", f"This conversation was closed on the server ({live.closed})."))
        for outbox in self.events.release(live.id):
            outbox.close()
        self.live.pop(live.id, None)
        self._dirty.discard(live.id)

    def _commit(self, live: Live) -> None:
        if self.store.durable:
            self.persister.ended(live)  # (a turn ended, or a setting changed): written now
        else:
            self._dirty.add(live.id)
        self.store.touch(live.id)

    # ------------------------------------------------------------ choices

    def _resolve(self, model: str) -> Resolved:
        return self.admission.resolve(model)

    def _choice(self, conv: Conversation, model=None, params=None) -> tuple[str, dict]:
        """The model and params a ``set`` would give the conversation; raises, changes nothing."""
        new_model = conv.model
        if model is not None:
            if not isinstance(model, str):
                raise ChatError("bad_request", "model must be a string")
            new_model = self._resolve(model).id
        new_params = conv.params
        if params is not None:
            checked = check_params(self.settings.limits, params)
            new_params = {k: v for k, v in {**conv.params, **checked}.items() if v is not None}
        return new_model, new_params

    def configure(self, live: Live, model=None, params=None) -> None:
        """Apply a ``set``: all of it or, on any error, none of it."""
        live.conv.model, live.conv.params = self._choice(live.conv, model, params)
        self._changed(live, "set")

    def restore(self, live: Live, history) -> None:
        """Seed an empty conversation with a client's copy of it (after a restart)."""
        if live.reply is not None or live.conv.history:
            raise ChatError("bad_request", "restore works only on a new, empty session")
        live.conv.history = check_history(self.settings.limits, history)
        self._changed(live, "restore")

    async def reset(self, live: Live) -> None:
        await self.stop(live)  # (as delete)
        live.conv.history.clear()
        self.events.forget(live.id)
        self._changed(live, "reset")

    # ------------------------------------------------------------ turns

    async def send(self, live: Live, message, model=None, params=None, door: str = "ws", who=None) -> Reply:
        """Accept a user message and start its reply. Raises ``ChatError`` if refused.
        ``door`` (here and below) names the front door, for the turn's logs and metrics; ``who``
        (``clients.Who``) who asks, for quotas and usage (None: nobody known, no quota)."""
        message = check_message(self.settings.limits, message)
        await self._current(live)  # shared: the stored record, whatever another instance changed
        resolved, rid = await self._admit(live, model, params, who=who)
        live.conv.history.append({"role": "user", "content": message})
        return self._launch(live, resolved, door, rid, who)

    async def send_new(self, owner: str | None, client: str, message, model=None,
                       params=None, door: str = "sse", who=None) -> tuple[Live, Reply]:
        """A first message without a conversation (``POST /sse``): everything is checked before
        the conversation exists, so a refusal leaves nothing behind."""
        message = check_message(self.settings.limits, message)
        probe = Live(Conversation(owner, client, self.registry.default_model()))
        resolved, _ = await self._admit(probe, model, params, claim=False, who=who)  # a reply slot: given back if refused
        try:
            live = await self.create(owner, client)
            rid = await self._claim(live)
        except ChatError:
            self.limiter.release_reply(client)
            raise
        live.conv.model, live.conv.params = probe.conv.model, probe.conv.params
        live.conv.history.append({"role": "user", "content": message})
        return live, self._launch(live, resolved, door, rid, who)

    async def regenerate(self, live: Live, model=None, params=None, door: str = "ws", who=None) -> Reply:
        """Replace the last reply with a new one."""
        await self._current(live)
        if live.reply is not None:
            raise ChatError("busy", BUSY, 409)
        h = live.conv.history
        if len(h) < 2 or h[-1]["role"] != "assistant":
            raise ChatError("bad_request", "There is no reply to regenerate yet.")
        resolved, rid = await self._admit(live, model, params, who=who)
        h.pop()
        return self._launch(live, resolved, door, rid, who, edited=True)

    async def edit(self, live: Live, index, message, model=None, params=None, door: str = "ws",
                   who=None) -> Reply:
        """Replace the user message at ``index`` (and everything after it) and answer it."""
        message = check_message(self.settings.limits, message)
        await self._current(live)
        if live.reply is not None:
            raise ChatError("busy", BUSY, 409)
        h = live.conv.history
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(h) \
                or h[index]["role"] != "user":
            raise ChatError("bad_request", "index must point at one of your messages in the history")
        resolved, rid = await self._admit(live, model, params, who=who)
        del h[index:]
        h.append({"role": "user", "content": message})
        return self._launch(live, resolved, door, rid, who, edited=True)

    def _launch(self, live: Live, resolved: Resolved, door: str = "ws", rid: str | None = None, who=None,
                edited: bool = False) -> Reply:
        conv = live.conv
        conv.updated = time.time()
        request = ChatRequest(resolved.model, context(conv, self.settings.chat), turn_params(conv))
        observer = self.on_turn_done
        on_done = None if observer is None else partial(observer, session=live.id)
        slot = None  # params "cache": false bypasses the response cache (reads and writes)
        if self.cache is not None and conv.params.get("cache") is not False:
            slot = self.cache.slot(conv.owner, resolved.id, request)
        reply = self.runner.launch(live, Turn(resolved, request, self.admission.fallback_for, door=door,
                                              on_done=on_done, owner=conv.owner, client=conv.client,
                                              who=who, cache=slot), rid)
        if self.store.durable:
            self.persister.started(live)  # the question and the streaming turn, then checkpoints
            self._announce(live, edited)  # shared: other instances hear of the reply once that is stored
        else:
            self._dirty.add(live.id)
        self.store.touch(live.id)
        return reply

    async def stop(self, live: Live, reason: str = "stopped") -> bool:
        if live.reply is None and self.shared is not None:  # it may run on another instance
            return await self._stop_elsewhere(live)
        return await self.runner.stop(live, reason)

    # ------------------------------------------------------------ listeners and views

    def frame(self, live: Live) -> dict:
        return wire.session(live.conv, self._running(live))

    def public(self, live: Live) -> dict:
        """``GET /api/sessions/{id}``."""
        f = self.frame(live)
        del f["type"]
        return f

    def broadcast_frame(self, live: Live) -> None:
        self.events.broadcast(live.id, self.frame(live))

    def attach(self, live: Live, outbox: Outbox, after: int | None = None) -> None:
        """Add a listener; replay what it missed: the events after ``after``, or the running reply."""
        self.runner.listener_back(live)
        self.live.setdefault(live.id, live)
        self.events.subscribe(live.id, outbox, after, live.reply.id if live.reply else None)
        self.store.touch(live.id)

    def detach(self, live: Live, outbox: Outbox, grace: float | None = None) -> None:
        """Remove a listener. The last one leaving starts the resume grace (``grace`` instead of
        ``[chat] resume_grace_seconds``: 0 for a client that cannot resume), or stops the reply."""
        left = self.events.unsubscribe(live.id, outbox)
        self.store.touch(live.id)
        if left == 0:
            grace = self.settings.chat.resume_grace_seconds if grace is None else grace
            self.runner.nobody_listening(live, grace, self.closing)

    def can_resume(self, live: Live, after: int) -> bool:
        """Is there anything to follow after ``after``: a running reply, or missed events?"""
        return self._running(live) is not None or self.events.missed(live.id, after)

    def last_reply(self, live: Live) -> str | None:
        return self.events.last_reply(live.id)

    def running_since(self, live: Live) -> int | None:
        """The seq just before the running reply's ``start`` (to follow it from the beginning)."""
        running = self._running(live)
        if running is None:
            return None
        first = self.events.first_seq(live.id, running.id)
        return None if first is None else first - 1

    # ------------------------------------------------------------ housekeeping

    async def housekeeping_once(self, now: float | None = None) -> None:
        """Expire idle conversations, drop old replay logs, and let go of what is no longer live."""
        for cid in await self.store.expire(now):
            self._dropped(cid, "expired")
        keep = max(self.settings.chat.resume_grace_seconds, 5.0)
        self.events.forget_old(keep, self._in_use, now)
        for cid, live in list(self.live.items()):
            # Nothing running, nobody listening, nothing kept to resume: the record is all it needs.
            if not self._in_use(cid) and self.events.last_reply(cid) is None:
                await self._write_back(live)
                if not self._in_use(cid):  # (the write may have yielded)
                    self.live.pop(cid, None)
        if not self.limiter.running_total:  # no reply anywhere (any front door): a quiet moment
            collect_young()

    async def _write_back(self, live: Live) -> None:
        if live.id in self._dirty:
            self._dirty.discard(live.id)
            await self.store.put(record_of(live))

    async def housekeeping(self) -> None:
        interval = max(1.0, min(30.0, self.settings.chat.session_ttl_seconds / 4,
                                self.settings.chat.resume_grace_seconds or 30.0))
        while True:
            await asyncio.sleep(interval)
            await self.housekeeping_once()

    async def close(self, grace: float, cancel_wait: float | None = 1.0) -> None:
        """Let running replies finish for up to ``grace`` seconds, then interrupt the rest (and wait
        up to ``cancel_wait`` seconds for them to record their turn: shutdown has a deadline)."""
        self.closing = True
        await self.runner.close(grace, list(self.live.values()), cancel_wait)
        for live in list(self.live.values()):
            await self._write_back(live)
            # Closing each outbox lets its writer flush the final events, then close with 1001.
            for outbox in list(self.events.listeners(live.id)):
                outbox.close()
        await self.persister.close()  # every finished or interrupted turn is written before the store closes
        await self._close_shared()

    # ------------------------------------------------------------ stats
