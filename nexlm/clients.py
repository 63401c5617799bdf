"""Who a request comes from: its owner (for sessions), its name and groups (for usage and quotas),
its client (for limits), its scheme.

Forwarding and identity headers are believed only from ``[server] trusted_proxies``.

Principals (session owners) are ``"u:" + name`` for a named user (``[auth.users.NAME]``, a JWT's
user claim, the trusted user header: one name, one owner whichever way it signs in) and
``"t:" + hash`` for an ``[auth] tokens`` entry (stable when the list is reordered). ``who()`` gives
the human name: the user's, or ``token-N`` by the token's place in the list.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from typing import NamedTuple

from aiohttp import web

from .appkeys import GROUPS, PRINCIPAL, SETTINGS


class Who(NamedTuple):
    """For usage and quotas. ``name`` is None without identity (auth off, or not yet signed in)."""
    name: str | None
    groups: tuple[str, ...]
    client: str


def principal_of(token: str) -> str:
    """A stable, non-secret name for an ``[auth] tokens`` entry: sessions are filed under it, logs may show it."""
    return "t:" + hashlib.sha256(token.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def token_names(tokens: tuple[str, ...]) -> dict[str, str]:
    """principal -> ``token-N`` (1-based, in the order of ``[auth] tokens``)."""
    return {principal_of(t): f"token-{i}" for i, t in enumerate(tokens, 1)}


def name_of(principal: str | None, tokens: tuple[str, ...]) -> str | None:
    if not principal:
        return None
    if principal.startswith("u:"):
        return principal[2:]
    return token_names(tokens).get(principal, principal)


def identity(request: web.Request) -> tuple[str | None, str]:
    """(owner, client): sessions belong to the owner; limits count per client."""
    owner = request.get(PRINCIPAL)
    return owner, owner or client_address(request)


def who(request: web.Request) -> Who:
    """The one answer to "who is this" for usage, quotas and admin checks, on every front door."""
    owner, client = identity(request)
    return Who(name_of(owner, request.app[SETTINGS].auth.tokens), tuple(request.get(GROUPS) or ()), client)


def is_admin(request: web.Request, person: Who | None = None) -> bool:
    """In one of ``[auth] admin_groups``."""
    person = person or who(request)
    return person.name is not None and bool(set(person.groups) & set(request.app[SETTINGS].auth.admin_groups))


def auth_off(request: web.Request) -> bool:
    """No credentials of any kind are configured: a single-user install, where everyone is the owner."""
    auth = request.app[SETTINGS].auth
    return not (auth.tokens or auth.users or auth.jwt.enabled or auth.trusted_user_header)


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
