"""The facade for stateless turns: a reply to messages a client sends whole (``/v1``, and
other front doors that store no conversation).

Nothing is stored. Admission is the page's (``Admission``: shutdown, model and
aliases, the client's message rate and running replies), the turn is the engine's
with the provider's fallback, and the reply slot is given back when the turn ends,
however it ends::

    async with gateway.turn(owner, client, model, messages, params, extra, door="v1") as turn:
        async for ev in turn:      # TurnEvents; turn.model / usage / finish / timing() as in Turn
            ...

``turn(...)`` raises ``ChatError`` (code, message, status, retry_after) when refused.
The events run in the caller's task: cancelling it (a client that left) closes the
provider stream, hence the upstream request, at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from .admission import Admission
from .cache import BYPASS, ResponseCache
from .engine import Turn, TurnEvent
from .providers.base import ChatRequest, Params
from .validation import ChatError


class GatewayTurn:
    """One admitted stateless turn: an async context manager, then an async iterator (once).

    Attribute reads fall through to the engine's ``Turn`` (``model``, ``usage``, ``finish``,
    ``fallback``, ``timing()``, ``door``, ``first_token``...)."""

    __slots__ = ("_events", "_held", "_spec", "_task", "client", "gateway", "turn")

    def __init__(self, gateway: Gateway, client: str, spec: tuple) -> None:
        self.gateway = gateway
        self.client = client
        self.turn: Turn | None = None
        self._spec = spec
        self._events: AsyncIterator[TurnEvent] | None = None
        self._task: asyncio.Task | None = None
        self._held = False

    def __getattr__(self, name: str):
        turn = object.__getattribute__(self, "turn")
        if turn is None:
            raise AttributeError(name)
        return getattr(turn, name)

    async def __aenter__(self) -> GatewayTurn:  # noqa: PYI034
        self.turn = await self.gateway._start(self.client, *self._spec)  # raises ChatError; holds nothing then
        self._held = True
        self._task = asyncio.current_task()
        self.gateway._active.add(self)
        return self

    @property
    def cache_status(self) -> str | None:
        """``x-nexlm-cache``: hit, miss or bypass (None when the cache is off)."""
        cache = self.gateway.cache
        if cache is None or not cache.enabled or self.turn is None:
            return None
        return BYPASS if self.turn.cache is None else self.turn.cache.status

    def __aiter__(self) -> AsyncIterator[TurnEvent]:
        if self._events is None:
            self._events = self.turn.__aiter__()
        return self._events

    async def __aexit__(self, *exc) -> None:
        try:
            if self.turn is not None and isinstance(exc[1], Exception):
                self.turn.end("error")  # a bug while relaying: observed as failed, before the close says otherwise
            if self._events is not None:
                await self._events.aclose()  # the provider stream and its upstream request, closed now
        finally:
            if self.turn is not None:  # observed once, also when it was never iterated (a no-op otherwise)
                self.turn.end(None if self.turn.finish else "interrupted")
            self.gateway._active.discard(self)
            if self._held:
                self._held = False
                self.gateway.admission.release(self.client)




def cache_directives(value: str | None) -> tuple[bool, bool]:
    """``Cache-Control`` to (read, write): ``no-cache`` does not read the response cache, ``no-store``
    does not write it."""
    words = {w.strip().lower() for w in (value or "").split(",")}
    return "no-cache" not in words, "no-store" not in words


class Gateway:
    def __init__(self, admission: Admission, on_turn_done: Callable[[Turn], None] | None = None,
                 cache: ResponseCache | None = None) -> None:
        self.admission = admission
        self.cache = cache  # the response cache (shared with the page's facade), or None
        self.on_turn_done = on_turn_done  # each turn's on_done (metrics, the reply log line): no session
        self._active: set[GatewayTurn] = set()

    def turn(self, owner: str | None, client: str, model, messages: list[dict], params: Params | dict | None = None,
             extra: dict | None = None, door: str = "v1", who=None,
             cache: tuple[bool, bool] = (True, True)) -> GatewayTurn:
        """A turn for ``messages`` (OpenAI chat messages, already checked by the front door) with
        ``model`` (an id or alias), ``params`` (``Params`` or its dict: temperature, top_p,
        max_tokens) and ``extra`` (``base.EXTRA_KEYS``, already checked). ``owner`` is who asked
        (for logs); limits count per ``client``; ``who`` (``clients.Who``) is checked against its
        quota (None: no quota) and the turn is counted against it when it ends. ``cache``: (read,
        write), from the request's ``Cache-Control`` (``cache_directives``). Admitted on entry."""
        return GatewayTurn(self, client, (owner, model, messages, params, extra, door, who, cache))

    async def _start(self, client: str, owner, model, messages, params, extra, door, who, cache) -> Turn:
        self.admission.check_open()
        if not isinstance(model, str):
            raise ChatError("bad_request", "model must be a string", param="model")
        resolved = self.admission.resolve(model)
        extra = dict(extra or {})
        if extra.get("tools") and not getattr(resolved.provider, "supports_tools", False):
            raise ChatError("tools_unsupported", f"{resolved.id} cannot call tools; send the request without "
                            "tools, or choose a model served by an OpenAI-compatible provider.", 400, param="tools")
        if isinstance(params, dict):
            params = Params(params.get("temperature"), params.get("top_p"), params.get("max_tokens"))
        request = ChatRequest(resolved.model, messages, params or Params(), extra)
        await self.admission.check_quota(who, resolved)  # before anything is sent upstream
        slot = None
        if self.cache is not None and (cache[0] or cache[1]):
            slot = self.cache.slot(owner, resolved.id, request, read=cache[0], write=cache[1])
            if slot is not None:
                await slot.load()  # before the headers: x-nexlm-cache says hit or miss
        await self.admission.take(client)  # last: nothing to give back if anything above refused
        return Turn(resolved, request, self.admission.fallback_for, door=door, on_done=self.on_turn_done,
                    owner=owner, client=client, who=who, cache=slot)

    @property
    def closing(self) -> bool:
        """Shutting down: new turns are refused, running ones end after the grace."""
        return self.admission.closing

    @property
    def running(self) -> int:
        """Stateless turns running now."""
        return len(self._active)

    async def close(self, grace: float) -> None:
        """Shutdown: no new turns; running ones get ``grace`` seconds, then their tasks are cancelled
        (which closes their upstream requests and ends their responses)."""
        self.admission.closing = True
        tasks = {t._task for t in self._active if t._task is not None and not t._task.done()}
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        left = {t._task for t in self._active if t._task is not None and not t._task.done()}
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=1.0)
