"""Usage accounting: who spent how many tokens on which model, for every reply on every front door.

A turn's observer (``Recorder.turn_done``, beside the metrics one) turns an ended turn into a
``UsageEntry`` (a few attribute reads: nothing on the token path) and queues it; one background
task owned by the recorder writes the queue in batches to the ``UsageLog`` of the configured store
kind, so a slow or absent database never delays a reply. The logs:

- ``MemoryUsage``: daily aggregates per (day, owner, model), the oldest days dropped past
  ``RETENTION_DAYS`` or ``MAX_MEMORY_KEYS``;
- ``usage_sqlite.SQLiteUsage``: a ``usage`` table (one row per reply) in the store's file;
- ``usage_redis.RedisUsage``: per owner and day aggregate hashes (HINCRBY), expiring after
  ``RETENTION_DAYS``.

Tokens are the provider's usage (the embedded llama.cpp model counts with its own tokenizer);
when a provider reported none they are estimated at ``CHARS_PER_TOKEN`` and the entry says
``estimated``. The owner is ``clients.name_of``: a user's name, ``token-N``, or None without
identity.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from .clients import name_of

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
RETENTION_DAYS = 400
MAX_MEMORY_KEYS = 100_000  # (day, owner, model) aggregates kept in memory
GROUPS = ("day", "model", "user")
FLUSH_SECONDS = 0.5  # the longest an entry waits before it is written
FLUSH_AT = 200  # or as soon as this many wait
MAX_PENDING = 50_000  # a store that stays down: the oldest unwritten entries are dropped (and logged)


@dataclass(frozen=True, slots=True)
class UsageEntry:
    owner: str | None  # user name or token-N; None without identity
    client: str
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    cached: bool
    estimated: bool
    time: float  # wall clock, seconds (UTC when turned into a day)

    @property
    def day(self) -> str:
        return day_of(self.time)


def day_of(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).date().isoformat()


class UsageLog(Protocol):
    """Where entries go. ``query`` returns ``{"totals": {...}, "rows": [...]}`` (see ``summarize``)
    for ``owner`` (a name; None: everyone) over the UTC days ``frm`` to ``to`` inclusive. Replies
    without identity are stored under the owner ``""`` (rows ``"user": None``)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def record(self, entry: UsageEntry) -> None: ...

    async def record_many(self, entries: list[UsageEntry]) -> None: ...

    async def query(self, owner: str | None, frm: dt.date, to: dt.date, group_by: str) -> dict: ...


# An aggregate: replies, input_tokens, output_tokens, cached_replies, estimated_replies.
FIELDS = ("replies", "input_tokens", "output_tokens", "cached_replies", "estimated_replies")


def counts_of(entry: UsageEntry) -> tuple[int, int, int, int, int]:
    return 1, entry.input_tokens, entry.output_tokens, int(entry.cached), int(entry.estimated)


def summarize(aggregates, group_by: str) -> dict:
    """``aggregates``: (day, owner, model, counts) -> the API's answer. Rows are sorted by their key;
    an owner of None (no identity) is the row ``"user": null``."""
    totals = dict.fromkeys(FIELDS, 0)
    rows: dict = {}
    index = {"day": 0, "user": 1, "model": 2}[group_by]
    for day, owner, model, counts in aggregates:
        k = (day, owner or None, model)[index]
        row = rows.setdefault(k, dict.fromkeys(FIELDS, 0))
        for f, n in zip(FIELDS, counts):
            totals[f] += n
            row[f] += n
    out = [{group_by: k, **v} for k, v in sorted(rows.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))]
    return {"totals": totals, "rows": out}


class MemoryUsage:
    """Daily aggregates in a dict: bounded, lost at restart (as the memory store's sessions are)."""

    kind = "memory"

    def __init__(self, max_keys: int = MAX_MEMORY_KEYS) -> None:
        self.max_keys = max_keys
        self.days: dict[tuple[str, str, str], list[int]] = {}
        self._oldest = "9999"  # the oldest day held: a trim check without a scan

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def record(self, entry: UsageEntry) -> None:
        await self.record_many([entry])

    async def record_many(self, entries: list[UsageEntry]) -> None:
        for e in entries:
            key = (e.day, e.owner or "", e.model)
            agg = self.days.get(key)
            if agg is None:
                agg = self.days[key] = [0] * len(FIELDS)
                self._oldest = min(self._oldest, key[0])
            for i, n in enumerate(counts_of(e)):
                agg[i] += n
        self._trim()

    def _trim(self) -> None:
        oldest = (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=RETENTION_DAYS)).isoformat()
        if len(self.days) <= self.max_keys and self._oldest >= oldest:
            return
        # Newest days first, with a tenth of room to spare: the sort is not paid on every new key.
        keep = sorted(self.days, reverse=True)[: max(1, self.max_keys - self.max_keys // 10)]
        self.days = {k: self.days[k] for k in keep if k[0] >= oldest}
        self._oldest = min((k[0] for k in self.days), default="9999")

    async def query(self, owner, frm, to, group_by) -> dict:
        lo, hi = frm.isoformat(), to.isoformat()
        return summarize(((d, o, m, c) for (d, o, m), c in self.days.items()
                          if lo <= d <= hi and (owner is None or o == owner)), group_by)


def entry_of(turn, tokens: tuple[str, ...], now: float | None = None) -> UsageEntry:
    """The usage of an ended turn: the provider's counts, else estimates (marked)."""
    usage = turn.usage if isinstance(turn.usage, dict) else {}
    tin, tout = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    estimated = tin is None or tout is None
    if estimated and turn.finish == "error" and getattr(turn, "first_token", None) is None:
        tin = tin or 0  # refused or failed before answering: nothing to estimate (nor, usually, to pay)
        tout = tout or 0
    if tin is None:
        tin = _estimate(sum(_chars(m.get("content")) for m in turn.request.messages if isinstance(m, dict)))
    if tout is None:
        tout = _estimate(getattr(turn, "chars_out", 0))
    provider = getattr(turn.provider, "name", "") or ""
    return UsageEntry(name_of(getattr(turn, "owner", None), tokens), getattr(turn, "client", "") or "",
                      turn.model or "", provider, tin, tout, turn.finish or "error",
                      bool(getattr(turn, "cached", False)), estimated, time.time() if now is None else now)


def _count(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _chars(content) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # OpenAI content parts
        return sum(len(p.get("text", "")) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _estimate(chars: int) -> int:
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


class Recorder:
    """The turns' usage observer and the writer behind it. ``start``/``close`` own its one task;
    ``flush()`` writes what waits now (close does it too)."""

    def __init__(self, log_: UsageLog, tokens: tuple[str, ...] = ()) -> None:
        self.log = log_
        self.tokens = tokens
        self._pending: list[UsageEntry] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        self.dropped = 0

    def turn_done(self, turn, session: str | None = None) -> None:
        """``Turn.on_done``: queue its entry (no I/O here)."""
        self._pending.append(entry_of(turn, self.tokens))
        if len(self._pending) > MAX_PENDING:
            del self._pending[: len(self._pending) - MAX_PENDING]
            self.dropped += 1
        if len(self._pending) >= FLUSH_AT:
            self._wake.set()

    async def start(self) -> None:
        await self.log.open()
        self._task = asyncio.create_task(self._run(), name="usage writer")

    async def _run(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_SECONDS)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            try:
                await self.log.record_many(batch)
            except Exception as exc:  # the store is down: keep them for the next try (bounded)
                log.warning("usage: %d entries not written yet: %s", len(batch), exc)
                self._pending[:0] = batch
                del self._pending[: max(0, len(self._pending) - MAX_PENDING)]

    async def query(self, *args, **kw) -> dict:
        await self.flush()  # a reply that just ended is in the answer
        return await self.log.query(*args, **kw)

    async def close(self) -> None:
        self._closing = True  # not cancelled: a batch half written would be written again
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
        await self.log.close()


def make_usage_log(settings) -> UsageLog:
    """The log of ``[store] kind``: the same place as the conversations."""
    kind = settings.store.kind
    if kind == "sqlite":
        from .usage_sqlite import SQLiteUsage

        return SQLiteUsage(settings.store.path)
    if kind == "redis":
        from .usage_redis import RedisUsage

        return RedisUsage(settings.store.url)
    return MemoryUsage()
