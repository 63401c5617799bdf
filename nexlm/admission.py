"""Who may start a reply now: the one admission rule every front door shares.

Stored conversations (``Conversations``) and stateless turns (``Gateway``, /v1)
refuse the same things the same way: the server shutting down (503), a model
that does not resolve (404) or cannot answer (503), a client over its message
rate (429) or its running replies, or a server at its total (503), an identity over its quota
(429) or asking for a model its quota does not allow (403). One
``Limiter`` behind both, so a client's limits count across every door. The
provider's ``fallback`` rule lives here too, for the same reason.
"""

from __future__ import annotations

from .config import Settings
from .limits import LimitError, Limits, make_limiter
from .providers.base import StreamError
from .providers.registry import ModelError, Registry, Resolved
from .quotas import Quotas
from .validation import ChatError

SHUTTING_DOWN = "The server is restarting; try again in a moment."


class Admission:
    def __init__(self, settings: Settings, registry: Registry, limiter: Limits | None = None,
                 quotas: Quotas | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.limiter = limiter if limiter is not None else make_limiter(settings)
        self.quotas = quotas if quotas is not None else Quotas.from_settings(settings)  # opened by the server
        self.closing = False  # set once at shutdown: no new replies from any door

    def check_open(self) -> None:
        if self.closing:
            raise ChatError("shutting_down", SHUTTING_DOWN, 503)

    def resolve(self, model: str) -> Resolved:
        """A model id or alias, usable now; ``unknown_model`` (404) or ``provider_unavailable`` (503)."""
        try:
            return self.registry.resolve(model)
        except ModelError as exc:
            raise ChatError(exc.code, exc.message, 404 if exc.code == "unknown_model" else 503) from None

    async def check_quota(self, who, resolved: Resolved) -> None:
        """``who`` (a ``clients.Who``; None or nameless: no quota) may start a reply with ``resolved``:
        ``forbidden_model`` (403) or ``quota_exceeded`` (429, with ``retry_after``) otherwise."""
        if who is not None:
            await self.quotas.check(who.name, who.groups, resolved.id)

    async def take(self, client: str) -> None:
        """Count a message and reserve a running-reply slot; ``release`` must follow, once.
        (Async: with a shared store the counts live in Redis.)"""
        try:
            await self.limiter.admit(client)
        except LimitError as exc:
            raise ChatError(exc.code, exc.message, 429 if exc.code == "rate_limited" else 503,
                            exc.retry_after) from None

    def release(self, client: str) -> None:
        self.limiter.release_reply(client)

    def fallback_for(self, resolved: Resolved, failure: StreamError) -> Resolved | None:
        """The provider's ``fallback`` model, for a failure worth another try."""
        if not (failure.retryable or failure.code in ("upstream_timeout", "provider_unavailable")):
            return None
        cfg = self.settings.providers.get(resolved.provider.name)
        if cfg is None or not cfg.fallback:
            return None
        try:
            fallback = self.registry.resolve(cfg.fallback)
        except ModelError:
            return None
        return fallback if fallback.id != resolved.id else None
