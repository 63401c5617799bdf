"""The turn engine: one reply from a provider, as an async iterator of typed chat events.

It owns what every front door needs the same way: the provider loop, the
provider's ``fallback`` model (once, before any text), and timing. It knows
nothing of sessions, listeners or wire formats: /ws and /sse encode its events
into NexLM's JSON, other front doors into theirs. A caller may wait for the
first event before it commits HTTP headers, so a failure before the first token
can still be a real status.

A turn's events are the providers' own: ``Queued`` notices (single-slot
models), ``TextDelta``/``ReasoningDelta``/``ToolCallDelta`` (any of them is the
first token), then at most one ``StreamError`` (the
failure that no fallback saved) before the iterator ends; ``turn.finish``,
``turn.usage`` and ``turn.timing()`` then say how it ended, and ``on_done`` is told. Cancelling the task
that iterates closes the provider stream, which closes the upstream request.

With a ``cache`` slot (``nexlm.cache.CacheSlot``, from ``ResponseCache.slot``: the facade and the
gateway both ask it) a hit is replayed with no provider call and ``turn.cached`` is True; a miss
is recorded and stored when it ends complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import AsyncIterator, Callable, Union

from .providers.base import (
    ChatRequest,
    Finish,
    Queued,
    ReasoningDelta,
    StreamError,
    TextDelta,
    ToolCallDelta,
    UpstreamTiming,
    Usage,
)
from .providers.registry import Resolved

log = logging.getLogger(__name__)


# A turn's events are the providers' own (one vocabulary): text, reasoning and tool-call deltas,
# Queued notices from a single-slot model, and at most one StreamError, the last event.
TurnEvent = Union[TextDelta, ReasoningDelta, ToolCallDelta, Queued, StreamError]
DOORS = ("ws", "sse", "v1", "seed")  # the front doors a turn can come through (labels for logs and metrics)


class Turn:
    """One reply. Iterate it once; read ``model``, ``usage``, ``finish``, ``timing()`` and
    ``fallback`` as it goes and when it ends (also after a cancellation).

    ``door`` names the front door that runs it (one of ``DOORS``), for metrics and
    logs; ``who`` (a ``clients.Who``, or None) who asked, for quotas and usage.
    ``on_done(turn)`` is called exactly once when the turn ends, finished, failed or
    cancelled (the observers' one hook: nothing is observed per token). Whoever cancels the
    task that iterates sets ``stop_reason`` first ("stopped", "interrupted"); an owner that
    records the turn calls ``end(finish)`` with what it recorded, which also covers a turn
    cancelled before it ever ran."""

    __slots__ = ("resolved", "request", "model", "usage", "finish", "fallback", "started", "first_token",
                 "provider", "_fallback_to", "door", "on_done", "stop_reason", "ended", "upstream", "failures",
                 "owner", "client", "chars_out", "cached", "who", "cache")

    def __init__(self, resolved: Resolved, request: ChatRequest,
                 fallback_to: Callable[[Resolved, StreamError], Resolved | None] | None = None, *,
                 door: str = "ws", on_done: Callable[[Turn], None] | None = None,
                 owner: str | None = None, client: str = "", who=None, cache=None) -> None:
        self.resolved = resolved
        self.request = request
        self.model = resolved.id  # changes when the fallback answers
        self.provider = resolved.provider
        self.usage: dict | None = None
        self.finish: str | None = None  # "stop", "length", "error", ... once ended by the upstream
        self.fallback: dict | None = None  # {"from", "to", "reason"}
        self.started = time.monotonic()
        self.first_token: float | None = None
        self._fallback_to = fallback_to
        self.door = door
        self.on_done = on_done
        self.stop_reason: str | None = None  # set by whoever cancels it, before cancelling
        self.ended: float | None = None  # when end() ran
        self.upstream = UpstreamTiming()  # the upstream's own time to first token (providers fill it)
        self.failures: list[tuple[str, str]] = []  # (provider name, error code), fallbacks' too
        self.owner = owner  # who asked (the auth principal; None without identity) and from where: for usage
        self.client = client
        self.cache = cache  # a cache.CacheSlot (or None): a hit is replayed, a complete miss stored
        self.cached = False  # answered from the cache: no upstream call, no upstream tokens (usage counts it so)
        self.chars_out = 0  # text and reasoning streamed: the usage estimate when a provider reports none
        self.who = who  # clients.Who of whoever asked (None: unknown): its name and groups, for quotas

    def end(self, finish: str | None = None) -> None:
        """The turn is over (with ``finish``, when its owner recorded one): call ``on_done``, once."""
        if self.ended is not None:
            return
        self.ended = time.monotonic()
        if finish is not None:
            self.finish = finish
        elif self.finish is None:
            self.finish = "error"
        if self.cache is not None and not self.cached:
            try:  # a complete miss is stored (in the background: the cache owns the write)
                self.cache.done(self.usage, self.finish, self.stop_reason is None and self.fallback is None)
            except Exception:
                log.exception("response cache store failed")
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # an observer's bug must not break a reply
                log.exception("turn observer failed")

    def timing(self, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        return {
            "ttft_ms": None if self.first_token is None else round((self.first_token - self.started) * 1000, 1),
            "total_ms": round((now - self.started) * 1000, 1),
        }

    async def __aiter__(self) -> AsyncIterator[TurnEvent]:
        resolved, request, streamed = self.resolved, replace(self.request, timing=self.upstream), False
        slot = self.cache
        try:
            if slot is not None and await slot.load() is not None:
                events, self.usage, finish = slot.hit
                self.cached = True
                self.first_token = time.monotonic()
                for ev in events:
                    yield ev
                self.finish = finish
                return
            record = slot.record if slot is not None and slot.write else None
            while True:
                stream = resolved.provider.stream(request)
                failure: StreamError | None = None
                try:
                    async for ev in stream:
                        kind = type(ev)
                        if kind is TextDelta or kind is ReasoningDelta or kind is ToolCallDelta:
                            if self.first_token is None:
                                self.first_token = time.monotonic()
                            streamed = True
                            if kind is not ToolCallDelta:
                                self.chars_out += len(ev.text)
                            if record is not None:
                                record(ev)
                            yield ev
                        elif kind is Usage:
                            self.usage = ev.data
                        elif kind is Finish:
                            self.finish = ev.reason
                        elif kind is StreamError:
                            failure = ev
                        elif kind is Queued:
                            yield ev
                finally:
                    await stream.aclose()
                if failure is None:
                    if self.finish is None:  # a provider breaking its contract: say so rather than "stop"
                        self.finish = "error"
                    return
                self.failures.append((resolved.provider.name, failure.code))
                nxt = None
                if not streamed and self.fallback is None and self._fallback_to is not None:
                    nxt = self._fallback_to(resolved, failure)
                    if nxt is not None and request.extra.get("tools") and not getattr(nxt.provider, "supports_tools",
                                                                                      False):
                        nxt = None  # a fallback that cannot call the tools would answer another question
                if nxt is None:
                    self.finish = "error"
                    yield failure
                    return
                self.fallback = {"from": resolved.id, "to": nxt.id, "reason": failure.message}
                log.info("%s failed (%s), falling back to %s", resolved.id, failure.code, nxt.id)
                resolved = nxt
                request = replace(request, model=nxt.model)  # the same UpstreamTiming: see its docstring
                self.model, self.provider = nxt.id, nxt.provider
        except Exception:  # a provider's bug: the turn failed
            self.finish = "error"
            raise
        finally:
            # Ended by the upstream, or cancelled by its owner (stop_reason) or otherwise, or closed.
            self.end(self.stop_reason or (None if self.finish else "interrupted"))
