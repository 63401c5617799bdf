"""The facade's part for instances that share one Redis (``[store] kind = "redis"``).

``Conversations`` inherits it; with any other store ``shared`` stays None and none of this runs,
so the memory store behaves exactly as before. With Redis: a new reply first takes the
session's running lease (``redis_live``), a record that changes is written at once (another
instance may read it next), and the reply is listed for the others once its question is stored.
A reply running elsewhere shows in the ``session`` frame, with its question (the record is read
again when one starts), and can be resumed and stopped here (``reset`` and ``delete`` stop it
first); what another instance finishes or a reaper interrupts is put into the history this
instance holds. A change made here outside a reply (``_changed``: reset, set, rename, edit,
delete) is announced once its record is written; an instance holding that session reads the record
again and sends its listeners the frame a local change sends, and a turn always starts from the
stored record.
"""

from __future__ import annotations

import asyncio

from .redis_live import Busy, open_shared, settle, turn_of
from .validation import ChatError

BUSY = "A reply is still streaming; stop it or wait for it to finish."


class Shared:
    shared = None  # redis_live.RedisLive once started with [store] kind = "redis"
    _reloads: dict[str, asyncio.Task]  # session -> its record being read again (a reply began elsewhere)
    _rereads: set[str]  # sessions whose reload started before the latest news: it reads once more
    _owed: dict[str, set[str]]  # session -> changes made elsewhere its listeners here are not shown yet

    async def _start_shared(self) -> None:
        """Open what the store needs; redis: the live layer shared with the other instances."""
        if self.settings.store.kind == "redis" and self.shared is None:
            keep = max(self.settings.chat.resume_grace_seconds, 5.0)
            shared = await open_shared(self.settings.store.url, self.settings.store.lease_seconds, keep)
            self.shared = shared
            self.events = self.runner.events = shared.events
            shared.on_stop = self._stop_here
            shared.on_reap = self._reaped
            shared.events.on_remote_done = self._remote_done
            shared.events.on_remote_start = self._remote_started
            shared.events.on_remote_change = self._remote_changed
            self._reloads, self._rereads, self._owed = {}, set(), {}
            shared.start()

    async def _close_shared(self) -> None:
        if self.shared is not None:
            await self.shared.close()  # (its reader first: it starts the reloads)
            for task in self._reloads.values():
                task.cancel()
            await asyncio.gather(*self._reloads.values(), return_exceptions=True)

    async def _admit(self, live, model=None, params=None, claim: bool = True, who=None) -> tuple:
        """Check everything a new reply needs (``who``'s quota too); only when all pass, apply
        model/params and take a slot (shared: and the session's running lease, whose reply id is returned)."""
        self.admission.check_open()
        remote = None if live.reply is not None else self._running(live)
        if live.reply is not None or remote is not None and not await self._ended_elsewhere(live, remote):
            raise ChatError("busy", BUSY, 409)
        rid = await self._claim(live, remote.id if remote is not None else None) if claim else None
        try:
            if live.reply is not None:
                raise ChatError("busy", BUSY, 409)
            new_model, new_params = self._choice(live.conv, model, params)
            resolved = self._resolve(new_model)
            await self.admission.check_quota(who, resolved)
            await self.admission.take(live.conv.client)
            if live.reply is not None:  # another request started one while the limits were counted
                self.admission.release(live.conv.client)
                raise ChatError("busy", BUSY, 409)
        except BaseException:
            if rid is not None:
                self.shared.unclaim(live.id, rid)
            raise
        live.conv.model, live.conv.params = new_model, new_params
        return resolved, rid

    async def _claim(self, live, ended: str | None = None) -> str | None:
        if self.shared is None:
            return None
        try:
            return await self.shared.claim(live.conv, ended)
        except Busy:
            raise ChatError("busy", BUSY, 409) from None

    async def _ended_elsewhere(self, live, remote) -> bool:
        """Has the reply another instance runs just ended? That instance sends ``done`` to its own
        clients before Redis has it (a reply never waits for Redis), so a client that acts on it
        through this instance can arrive first: it gets a short wait, not ``busy``."""
        return self.shared is not None and await self.shared.just_ended(live.id, remote.id)

    def _announce(self, live, edited: bool = False) -> None:
        """Shared: list the new reply where the other instances look for one (``RedisEventLog.announce``)
        once the record with its question is stored, so an instance that hears of it and reads the
        record has the question (a ``session`` frame drawn there shows it, with the reply running).
        ``edited``: an edit or a regenerate cut the history first; a change notice goes before it."""
        if self.shared is None:
            return
        cid, rid, write = live.id, live.reply.id, self.persister.write_of(live.id)

        def tell(_=None) -> None:
            if edited:
                self.events.change(cid, "edit")
            self.events.announce(rid)
        tell() if write is None else write.add_done_callback(tell)

    def _changed(self, live, what: str) -> None:
        """A change to the record outside a reply (``what``: reset, set, title, restore): committed,
        then (shared) announced to the other instances once the record is written."""
        self._commit(live)
        self._tell(live.id, what)

    def _tell(self, cid: str, what: str) -> None:
        if self.shared is None:
            return
        write = self.persister.write_of(cid)
        if write is None:
            self.events.change(cid, what)
        else:
            write.add_done_callback(lambda _: self.events.change(cid, what))

    def _cached(self, live) -> bool:
        """Is this instance's copy of a shared record only a cache, to be read again on a lookup:
        nothing of it unwritten here, and no reply running here (another instance may have changed it,
        even while a page is open here)."""
        return getattr(self.store, "shared", False) and live.reply is None and not self.persister.pending(live.id)

    async def _current(self, live) -> None:
        """Before a turn: a copy that may be stale is read again (a change notice can be lost), so a
        turn never answers from history or settings another instance has replaced."""
        if self.shared is None or not self._cached(live):
            return
        conv = await self.store.get(live.id)
        if conv is None:
            self._dropped(live.id, "deleted")
            raise ChatError("not_found", "This conversation was deleted.", 404)
        if self._cached(live):  # (the read yielded)
            live.conv.refresh(conv)

    async def _stop_elsewhere(self, live) -> bool:
        """Stop the session's reply on the instance running it; once its ``done`` is written, this
        instance's snapshot is taken again (a frame drawn next shows nothing running)."""
        stopped = await self.shared.stop_elsewhere(live.id)
        if stopped:
            await self.events.refresh(live.id)
        return stopped

    def _running(self, live):
        """The running reply: this instance's, or (shared) the one another instance runs."""
        if live.reply is not None or self.shared is None:
            return live.reply
        remote = self.events.running_elsewhere(live.id)
        if remote is not None and not remote.model:
            remote.model = live.conv.model
        return remote

    # -------------------------------------------------------------- called by redis_live

    def _stop_here(self, cid: str, rid: str, reason: str) -> None:
        """A stop sent through another instance (or a lost lease): cancel the reply if it runs here."""
        live = self.live.get(cid)
        if live is not None and live.reply is not None and live.reply.id == rid:
            self.runner.cancel(live.reply, reason)

    def _remote_started(self, cid: str) -> None:
        """The reader learnt of a reply begun elsewhere: the record (with its question, see ``_announce``)
        is read again here, off the reader's task."""
        if cid not in self.live:
            return
        if cid in self._reloads:
            self._rereads.add(cid)  # (its read may be older than this news)
            return
        self._reloads[cid] = task = asyncio.create_task(self._reload(cid), name=f"reload {cid[:6]}")
        task.add_done_callback(lambda t: self._reloads.get(cid) is t and self._reloads.pop(cid))

    def _remote_changed(self, cid: str, what: str) -> None:
        """Another instance changed the record outside a reply: read again, then shown to the listeners here."""
        live = self.live.get(cid)
        if live is None:
            return
        if what == "reset" and live.reply is None:  # (now, in the index's order: before any reply after it)
            self.events.forget_here(cid)
        self._owed.setdefault(cid, set()).add(what)
        self._remote_started(cid)

    async def _reload(self, cid: str) -> None:
        while True:
            self._rereads.discard(cid)
            live = self.live.get(cid)
            if live is None or not self._cached(live):
                self._owed.pop(cid, None)  # (a change here, or a reply: it sends its own frame)
                return
            try:
                conv = await self.store.get(cid)
            except ChatError:  # (Redis failing: logged by the store; the next turn reads it again)
                self._owed.pop(cid, None)
                return
            if self.live.get(cid) is live and self._cached(live) and cid not in self._rereads:
                if conv is None:
                    self._owed.pop(cid, None)
                    self._dropped(cid, "deleted")  # deleted elsewhere: what a delete here does
                    return
                live.conv.refresh(conv)
                self._show(live)
            if cid not in self._rereads:
                return

    def _show(self, live) -> None:
        """Changes made elsewhere, now in this copy: to the listeners here as a local change gives them."""
        owed = self._owed.pop(live.id, None)
        if owed and owed != {"title"}:  # (a rename sends no frame here either)
            self.broadcast_frame(live)

    async def _remote_done(self, cid: str, events: list[dict]) -> None:
        """A reply that ran elsewhere ended: this instance's copy of the record is stale (it lacks at
        least that turn), so it is read again; the instance that ran the reply stored its final turn
        before sending ``done``. (Not over a change made here and not yet written: a reset.)"""
        reload = self._reloads.pop(cid, None)
        if reload is not None:  # (its read may be older than this one)
            reload.cancel()
            self._rereads.discard(cid)
        live = self.live.get(cid)
        if live is None or live.reply is not None or self.persister.pending(cid):
            self._owed.pop(cid, None)
            return
        conv = await self.store.get(cid)
        if self.live.get(cid) is not live or live.reply is not None or self.persister.pending(cid):
            self._owed.pop(cid, None)
            return
        if conv is not None:
            live.conv = conv
        if events:
            settle(live.conv.history, turn_of(events))  # (a record that lags behind its stream)
            live.conv.seq = max(live.conv.seq, events[-1].get("seq", 0))
        self._show(live)  # (a change whose reload was cancelled above)

    async def _reaped(self, cid: str, entry: dict) -> None:
        """A dead instance's reply: its turn goes into the stored record as ``interrupted``."""
        conv = await self.store.get(cid)
        if conv is not None and settle(conv.history, dict(entry)):
            await self.store.put(conv)
