"""What the transports share: the app keys they read and who a request comes from."""

from __future__ import annotations

import weakref

from aiohttp import web

from ..chat import Chat
from ..config import Settings
from ..providers.registry import Registry

SETTINGS = web.AppKey("settings", Settings)
CHAT = web.AppKey("chat", Chat)
REGISTRY = web.AppKey("registry", Registry)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet)
STREAMS = web.AppKey("streams", set)  # transports of open /ws and /sse streams, cut at shutdown if they hang

CLOSE_DEADLINE = 1.0  # seconds the end of a stream (a close frame) may take to go out before the connection is cut


def cut(transport) -> None:
    """Drop a connection at once, buffers and all (``close`` would wait for a peer that never reads)."""
    if transport is not None:
        transport.abort()


# Set by the auth middleware: the principal (token id or trusted user) or None when auth is off.
PRINCIPAL = web.RequestKey("principal", object)


def identity(request: web.Request) -> tuple[str | None, str]:
    """(owner, client): sessions belong to the owner; limits count per client."""
    owner = request.get(PRINCIPAL)
    return owner, owner or client_address(request)


def client_address(request: web.Request) -> str:
    """The client's IP. Behind a listed proxy, the nearest untrusted address in X-Forwarded-For
    (every user would otherwise share the proxy's address, and its rate limit)."""
    peer = request.remote or "unknown"
    trusted = request.app[SETTINGS].server.trusted_proxies
    if not trusted or peer not in trusted:
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if hop not in trusted:
            return hop[:64]
    return peer


def parse_after(value: str | None) -> int | None:
    """A resume position (``after`` or ``Last-Event-ID``): a non-negative integer."""
    if value is None or value == "":
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 18:
        raise ValueError(f"not a valid event id: {value[:20]!r}")
    return int(value)
