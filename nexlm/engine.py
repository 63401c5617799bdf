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
``turn.usage`` and ``turn.timing()`` then say how it ended. Cancelling the task
that iterates closes the provider stream, which closes the upstream request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import AsyncIterator, Callable, Union

from .providers.base import (
    ChatRequest,
    Finish,
    Queued,
    ReasoningDelta,
    StreamError,
    TextDelta,
    ToolCallDelta,
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
    ``fallback`` as it goes and when it ends (also after a cancellation). ``door`` is the
    front door it came through (one of ``DOORS``)."""

    __slots__ = ("resolved", "request", "model", "usage", "finish", "fallback", "started", "first_token",
                 "provider", "door", "_fallback_to")

    def __init__(self, resolved: Resolved, request: ChatRequest,
                 fallback_to: Callable[[Resolved, StreamError], Resolved | None] | None = None,
                 *, door: str = "ws") -> None:
        self.resolved = resolved
        self.door = door
        self.request = request
        self.model = resolved.id  # changes when the fallback answers
        self.provider = resolved.provider
        self.usage: dict | None = None
        self.finish: str | None = None  # "stop", "length", "error", ... once ended by the upstream
        self.fallback: dict | None = None  # {"from", "to", "reason"}
        self.started = time.monotonic()
        self.first_token: float | None = None
        self._fallback_to = fallback_to

    def timing(self, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        return {
            "ttft_ms": None if self.first_token is None else round((self.first_token - self.started) * 1000, 1),
            "total_ms": round((now - self.started) * 1000, 1),
        }

    async def __aiter__(self) -> AsyncIterator[TurnEvent]:
        resolved, request, streamed = self.resolved, self.request, False
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
            nxt = None
            if not streamed and self.fallback is None and self._fallback_to is not None:
                nxt = self._fallback_to(resolved, failure)
                if nxt is not None and request.extra.get("tools") and not getattr(nxt.provider, "supports_tools", False):
                    nxt = None  # a fallback that cannot call the tools would answer another question
            if nxt is None:
                self.finish = "error"
                yield failure
                return
            self.fallback = {"from": resolved.id, "to": nxt.id, "reason": failure.message}
            log.info("%s failed (%s), falling back to %s", resolved.id, failure.code, nxt.id)
            resolved = nxt
            request = dataclasses.replace(request, model=nxt.model)
            self.model, self.provider = nxt.id, nxt.provider
