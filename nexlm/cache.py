"""The exact-match response cache (``[cache]``, opt-in): one deterministic question answered once.

One place for every front door: ``ResponseCache.slot(...)`` gives the ``Turn`` a
``CacheSlot`` (or None when the request cannot be cached); the turn loads it before
it asks the provider. A hit replays the stored events at full speed (no upstream call)
and marks ``turn.cached = True``; a miss records the events and stores them when the
turn ends complete (finish ``stop`` or ``tool_calls``, no fallback, not stopped).

The key is the sha256 of the canonical JSON (sorted keys) of the resolved model id, the
exact messages sent upstream, every sampling parameter and extra, the owner (unless
``shared``) and ``VERSION``. Only temperature 0 or a seed is cached unless
``any_temperature``. The backends (memory LRU, SQLite table, Redis SET EX) are in
``cache_backends``, chosen by ``[store] kind``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING, Protocol

import orjson

from .providers.base import ReasoningDelta, TextDelta, ToolCallDelta

if TYPE_CHECKING:
    from .config import CacheConfig
    from .providers.base import ChatRequest

log = logging.getLogger(__name__)

VERSION = 1  # bump when the key's parts or the stored form change: old entries are then never read
COMPLETE = ("stop", "tool_calls")
HIT, MISS, BYPASS = "hit", "miss", "bypass"  # x-nexlm-cache values


class Backend(Protocol):
    """Where entries live; values are opaque bytes. ``owner`` only shapes a key space (redis)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def get(self, owner: str, key: str) -> bytes | None: ...
    async def put(self, owner: str, key: str, value: bytes) -> None: ...


def cache_key(model_id: str, request: ChatRequest, owner: str | None, shared: bool) -> str:
    """The entry's key: a hex sha256 of everything that shapes the upstream's answer."""
    params = {k: float(v) if k != "max_tokens" else v for k, v in request.params.as_dict().items()}  # 0 == 0.0
    doc = {"v": VERSION, "model": model_id, "messages": request.messages, "params": params,
           "extra": request.extra, "owner": None if shared else owner}
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def cacheable(request: ChatRequest, any_temperature: bool) -> bool:
    """Deterministic enough to answer twice the same way: temperature 0 or a seed."""
    if any_temperature:
        return True
    return request.params.temperature == 0 or request.extra.get("seed") is not None


def encode(events: list, usage: dict | None, finish: str) -> bytes:
    rows = []
    for ev in events:
        kind = type(ev)
        if kind is TextDelta:
            rows.append(["t", ev.text])
        elif kind is ReasoningDelta:
            rows.append(["r", ev.text])
        elif kind is ToolCallDelta:
            rows.append(["c", ev.index, ev.id, ev.name, ev.arguments])
    return orjson.dumps({"v": VERSION, "events": rows, "usage": usage, "finish": finish})


def decode(value: bytes) -> tuple[list, dict | None, str] | None:
    """The stored events, usage and finish; None for an entry this version cannot read."""
    try:
        doc = orjson.loads(value)
        if doc.get("v") != VERSION:
            return None
        events = []
        for row in doc["events"]:
            if row[0] == "t":
                events.append(TextDelta(row[1]))
            elif row[0] == "r":
                events.append(ReasoningDelta(row[1]))
            elif row[0] == "c":
                events.append(ToolCallDelta(row[1], row[2], row[3], row[4]))
        return events, doc.get("usage"), doc["finish"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None


class CacheSlot:
    """One turn's view of the cache. ``load()`` (idempotent) reads the entry unless ``read`` is off;
    ``hit`` is then the stored (events, usage, finish) or None. ``status`` is hit, miss or bypass."""

    __slots__ = ("cache", "owner", "key", "read", "write", "hit", "loaded", "events")

    def __init__(self, cache: ResponseCache, owner: str, key: str, read: bool, write: bool) -> None:
        self.cache, self.owner, self.key, self.read, self.write = cache, owner, key, read, write
        self.hit: tuple[list, dict | None, str] | None = None
        self.loaded = False
        self.events: list = []  # a miss's events, recorded by the turn when ``write``

    @property
    def status(self) -> str:
        if self.hit is not None:
            return HIT
        return MISS if self.read else BYPASS

    async def load(self) -> tuple | None:
        if not self.loaded:
            self.loaded = True
            if self.read:
                self.hit = await self.cache.get(self.owner, self.key)
        return self.hit

    def record(self, ev) -> None:
        """A miss's event, while the turn streams (merging deltas of the same kind: fewer rows)."""
        events = self.events
        kind = type(ev)
        if events and kind is not ToolCallDelta and type(events[-1]) is kind:
            events[-1] = kind(events[-1].text + ev.text)
        else:
            events.append(ev)

    def done(self, usage: dict | None, finish: str | None, complete: bool) -> None:
        """The turn ended: store it if it is a complete reply and writing is on."""
        if self.write and self.hit is None and complete and finish in COMPLETE:
            self.cache.store(self.owner, self.key, encode(self.events, usage, finish))
        self.events = []


class ResponseCache:
    """The app's cache: the policy (config), a backend, the metrics' counters, and the write tasks
    (owned here: ``close`` awaits them)."""

    def __init__(self, config: CacheConfig, backend: Backend | None, metrics=None) -> None:
        self.config = config
        self.backend = backend
        self.metrics = metrics  # nexlm.metrics.Metrics or None: cache_hits / cache_misses / cache_bytes
        self._writes: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return self.config.enabled and self.backend is not None

    def slot(self, owner: str | None, model_id: str, request: ChatRequest, *, read: bool = True,
             write: bool = True) -> CacheSlot | None:
        """The slot for one turn, or None when the cache is off or the request is not deterministic."""
        if not self.enabled or not cacheable(request, self.config.any_temperature):
            return None
        owner = owner or "-"
        return CacheSlot(self, owner, cache_key(model_id, request, owner, self.config.shared), read, write)

    def _space(self, owner: str) -> str:
        return "-" if self.config.shared else owner

    async def get(self, owner: str, key: str) -> tuple | None:
        try:
            value = await self.backend.get(self._space(owner), key)
        except Exception as exc:  # a cache that fails is a miss, never a failed reply
            log.warning("response cache read failed: %s", exc)
            value = None
        hit = decode(value) if value is not None else None
        if self.metrics is not None:
            (self.metrics.cache_hits if hit is not None else self.metrics.cache_misses).inc()
        return hit

    def store(self, owner: str, key: str, value: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._put(self._space(owner), key, value))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, owner: str, key: str, value: bytes) -> None:
        try:
            await self.backend.put(owner, key, value)
        except Exception as exc:
            log.warning("response cache write failed: %s", exc)
            return
        if self.metrics is not None:
            self.metrics.cache_bytes.inc(len(value))

    async def flush(self) -> None:
        """Wait for the writes under way (tests; close)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def open(self) -> None:
        if self.backend is not None:
            await self.backend.open()

    async def close(self) -> None:
        await self.flush()
        if self.backend is not None:
            await self.backend.close()
