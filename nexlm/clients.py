"""Who a request comes from: its owner (for sessions), its client (for limits), its scheme.

Forwarding and identity headers are believed only from ``[server] trusted_proxies``.
"""

from __future__ import annotations

import functools
import ipaddress

from aiohttp import web

from .appkeys import PRINCIPAL, SETTINGS


def identity(request: web.Request) -> tuple[str | None, str]:
    """(owner, client): sessions belong to the owner; limits count per client."""
    owner = request.get(PRINCIPAL)
    return owner, owner or client_address(request)


@functools.lru_cache(maxsize=16)
def _networks(entries: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)  # validated at load


def is_trusted(address: str, entries: tuple[str, ...]) -> bool:
    """Is ``address`` one of ``[server] trusted_proxies`` (addresses or CIDR ranges)?"""
    if not entries:
        return False
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    addr = getattr(addr, "ipv4_mapped", None) or addr
    return any(addr.version == net.version and addr in net for net in _networks(entries))


def from_trusted_proxy(request: web.Request) -> bool:
    """Only such a peer's forwarding and identity headers are believed; anyone can send them."""
    return is_trusted(request.remote or "", request.app[SETTINGS].server.trusted_proxies)


def client_address(request: web.Request) -> str:
    """The client's IP. Behind a listed proxy, the nearest untrusted address in X-Forwarded-For
    (every user would otherwise share the proxy's address, and its rate limit)."""
    peer = request.remote or "unknown"
    trusted = request.app[SETTINGS].server.trusted_proxies
    if not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            return hop[:64]
    return peer


def request_scheme(request: web.Request) -> str:
    """"https" when the request came over TLS, directly or (per X-Forwarded-Proto) to a trusted proxy."""
    if request.secure:
        return "https"
    if from_trusted_proxy(request):
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            return proto
    return request.scheme if request.scheme in ("http", "https") else "http"
