"""Who may talk to the server: security headers, the Origin check, and optional tokens.

All three are one middleware so every route gets them in the same order, and a
refusal (403 cross-origin, 401 no token, 429 too many wrong ones) happens before any
WebSocket upgrade. Credentials, in order: a trusted proxy's user header, a Bearer token
(static or JWT; ``?token=`` on the WebSocket upgrade only), the login cookie (a
server-side session id), the ``AUTH-TOKEN`` JWT cookie.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from typing import Awaitable, Callable

import aiohttp_jinja2
from aiohttp import web
from yarl import URL

from .appkeys import GROUPS, LATE_AUTH, PRINCIPAL
from .clients import client_address, from_trusted_proxy, principal_of, request_scheme  # noqa: F401 (principal_of)
from .config import MAX_TOKEN_CHARS, Settings
from .events import error_event
from .logins import FailureThrottle, LoginSessions
from .logsafe import printable
from .openai_errors import as_openai
from .validation import ChatError

log = logging.getLogger(__name__)

COOKIE = "nexlm_token"  # the login cookie: a random session id (see logins.py), not the token
JWT_COOKIE = "AUTH-TOKEN"  # a JWT set by the identity service
SEED_WS = "/api/ai/chat/websocket"
SEED_HTTP = ("/api/ai/chat", "/api/ai/chat/stream")  # the seed's HTTP routes: CORS for listed origins, as /v1
WS_PATHS = ("/ws", SEED_WS)  # the only routes that take ?token= (browsers cannot set headers there)
LATE = object()  # _authenticate: no credentials yet, the route takes them after the upgrade
UNAUTHORIZED = "A valid access token is required."
TOO_MANY = "Too many failed sign-in attempts; try again later."
MAX_WARNED_ORIGINS = 64  # refused origins logged at WARNING (once each); more go to DEBUG
MIN_TOKEN_CHARS = 16
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def content_security_policy(settings: Settings) -> str:
    ancestors = " ".join(("'self'", *settings.server.frame_ancestors))
    return "; ".join((
        "default-src 'self'",
        "img-src 'self' data:",
        "style-src 'self'",
        "script-src 'self'",
        "font-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        f"frame-ancestors {ancestors}",
    ))


def same_origin(origin: str, request: web.Request) -> bool:
    """Scheme, host and port all equal; the request's scheme is TLS or not as seen by the client
    (directly, or per a trusted proxy's X-Forwarded-Proto)."""
    try:
        o = URL(origin)
        h = URL("//" + request.host)
    except ValueError:
        return False
    if not o.scheme or not o.host or not h.host:
        return False
    scheme = request_scheme(request)
    if o.scheme.lower() != scheme:
        return False
    o_port = o.explicit_port or DEFAULT_PORTS.get(o.scheme.lower())
    h_port = h.explicit_port or DEFAULT_PORTS.get(scheme)
    return o.host.lower() == h.host.lower() and o_port == h_port


def origin_allowed(request: web.Request, allowed: frozenset[str]) -> bool:
    """No Origin (a program, not a browser) is allowed; a browser must be same-origin or listed.

    Browsers omit Origin on some cross-site GETs (a link, an <img>), but then say
    ``Sec-Fetch-Site: cross-site``: such a request could start a generation with the
    victim's cookie, so it is refused too.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return request.headers.get("Sec-Fetch-Site", "none") in ("same-origin", "none")
    if origin in allowed:
        return True
    return same_origin(origin, request)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _unauthorized() -> web.Response:
    return web.json_response(error_event("unauthorized", UNAUTHORIZED), status=401,
                             headers={"WWW-Authenticate": 'Bearer realm="nexlm"'})


def _too_many(wait: int) -> web.Response:
    return web.json_response(error_event("rate_limited", TOO_MANY),
                             status=429, headers={"Retry-After": str(wait)})


class Guard:
    """The middleware. Paths are relative to ``base_path``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base = settings.server.base_path
        self.csp = content_security_policy(settings)
        self.allowed = frozenset(o.rstrip("/") for o in settings.server.allowed_origins)
        self.tokens = tuple(settings.auth.tokens)
        users = settings.auth.users
        # Every accepted token, anonymous ([auth] tokens) or a named user's: its digest, principal, groups.
        self._token_digests = tuple((_digest(t), principal_of(t), ()) for t in self.tokens) + tuple(
            (_digest(u.token), "u:" + u.name, u.groups) for u in users)
        self.user_groups = {"u:" + u.name: u.groups for u in users}  # a login cookie carries only the principal
        self.hosts = self._host_names(settings)
        self.user_header = settings.auth.trusted_user_header
        self.groups_header = settings.auth.trusted_groups_header
        self.jwt = None
        if settings.auth.jwt.enabled:
            from .jwt_auth import (
                JwtVerifier,  # PyJWT is needed only when JWTs are configured
            )

            self.jwt = JwtVerifier(settings.auth.jwt)
        self.required = bool(self._token_digests or self.jwt)
        self.logins = LoginSessions(settings.auth.login_ttl_seconds, settings.auth.max_logins)
        self.throttle = FailureThrottle()
        self.late_route = settings.compat.seed_frames  # the seed's page sends its token in a frame
        self._warned_origins: set[str] = set()
        every = self.tokens + tuple(u.token for u in users)
        short = sum(1 for t in every if len(t) < MIN_TOKEN_CHARS)
        if short:
            log.warning("[auth] tokens and [auth.users]: %d of %d tokens are shorter than %d characters and could "
                        "be guessed; use long random ones (e.g. python -c 'import secrets; "
                        "print(secrets.token_urlsafe(24))')", short, len(every), MIN_TOKEN_CHARS)

    async def lifetime(self, app: web.Application):
        """cleanup_ctx: the JWKS fetcher's HTTP client, when jwks_url is configured."""
        if self.jwt is not None:
            await self.jwt.start()
        try:
            yield
        finally:
            if self.jwt is not None:
                await self.jwt.close()

    @staticmethod
    def _host_names(settings: Settings) -> frozenset[str] | None:
        """Which Host headers to answer. Bound to loopback with no list: loopback names only,
        so a page on a rebound DNS name cannot become "same origin" with this server."""
        if settings.server.allowed_hosts:
            return frozenset(h.lower() for h in settings.server.allowed_hosts)
        if settings.server.host in ("127.0.0.1", "localhost", "::1"):
            return LOOPBACK_NAMES
        return None

    def host_allowed(self, request: web.Request) -> bool:
        if self.hosts is None:
            return True
        try:
            host = URL("//" + request.host).host or ""
        except ValueError:
            return False
        return host.lower() in self.hosts

    def static_principal(self, supplied: str) -> str | None:
        """The principal of a static token (anonymous or a named user's)."""
        who = self.static_who(supplied)
        return who[0] if who is not None else None

    def static_who(self, supplied: str) -> tuple[str, tuple[str, ...]] | None:
        """(principal, groups) of a static token, compared in constant time: both sides hashed to a
        fixed length, every configured token compared."""
        if not supplied or len(supplied) > MAX_TOKEN_CHARS:
            return None
        digest = _digest(supplied)
        found = None
        for known, principal, groups in self._token_digests:
            if hmac.compare_digest(digest, known):
                found = (principal, groups)
        return found

    async def _jwt(self, token: str, client: str, where: str):
        """(principal, groups), or None (the reason goes to the log, never the token)."""
        from .jwt_auth import JwtRefused

        try:
            who = await self.jwt.verify(token)
        except JwtRefused as exc:
            log.info("JWT refused (%s from %s): %s", where, client, exc)
            return None
        return "u:" + who.user, who.groups

    async def _guess(self, supplied: str, client: str, where: str):
        """A token a client offers: (principal, groups), or the seconds it must wait first
        (0: the token is wrong). Throttled per client, and refused unchecked while throttled."""
        if not supplied:
            return 0
        wait = self.throttle.retry_after(client)
        if wait:
            return wait
        found = self.static_who(supplied)
        if found is not None:
            return found
        if self.jwt is not None and supplied.count(".") == 2:
            who = await self._jwt(supplied, client, where)
            if who is not None:
                return who
        self.throttle.failed(client)
        return 0

    async def _late(self, request: web.Request, token) -> None:
        """``request[LATE_AUTH]``: the token from the seed page's frame, checked like a header's."""
        who = await self._guess(token.strip() if isinstance(token, str) else "", client_address(request), "frame")
        if isinstance(who, int):
            if who:
                raise ChatError("rate_limited", TOO_MANY, 429, who)
            raise ChatError("unauthorized", UNAUTHORIZED, 401)
        request[PRINCIPAL], request[GROUPS] = who

    async def _authenticate(self, request: web.Request, path: str, late: bool = False):
        """(principal, groups), principal ``None`` when auth is off; or a refusal response; or
        ``LATE`` when ``late`` and no credentials came with the request."""
        if self.user_header and from_trusted_proxy(request):
            user = request.headers.get(self.user_header, "").strip()
            if user:
                groups = ()
                if self.groups_header:
                    raw = request.headers.get(self.groups_header, "")
                    groups = tuple(g.strip()[:200] for g in raw.split(",") if g.strip())[:64]
                return "u:" + user[:200], groups
        if not self.required:
            return None, ()
        client = client_address(request)
        supplied, where = None, ""
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            supplied, where = auth[7:].strip(), "Bearer"
        elif path in WS_PATHS and "token" in request.query:
            supplied, where = request.query["token"].strip(), "query"
        if supplied is not None:
            who = await self._guess(supplied, client, where)
            if isinstance(who, int):
                return _too_many(who) if who else _unauthorized()
            return who
        # Cookies are not guesses (a 256-bit id, a signed JWT): a stale one is just 401.
        principal = self.logins.get(request.cookies.get(COOKIE, ""))
        if principal is not None:
            return principal, self.user_groups.get(principal, ())
        if self.jwt is not None and request.cookies.get(JWT_COOKIE):
            who = await self._jwt(request.cookies[JWT_COOKIE], client, "cookie")
            if who is not None:
                return who
        return LATE if late else _unauthorized()

    def public(self, path: str) -> bool:
        if path == "/metrics":
            return self.settings.metrics.public  # [metrics] public = true: for a scraper without a token
        return path in ("/healthz", "/login", "/logout") or path.startswith("/static/")

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        path = request.path[len(self.base):] if self.base and request.path.startswith(self.base) else request.path
        if path.startswith("/v1/"):
            if request.method == "OPTIONS" and self._cors_origin(request) and self.host_allowed(request):
                return self._preflight(request)  # carries no credentials: answered before the token check
            # Programs on OpenAI's API read its error envelope (the openai package picks its exception by status).
            try:
                return as_openai(await self._check(request, handler, path))
            except web.HTTPException as exc:  # no such route or method
                if exc.status < 400:
                    raise
                return as_openai(web.json_response(error_event("not_found" if exc.status == 404 else "bad_request",
                                                               exc.reason), status=exc.status))
        if path in SEED_HTTP and request.method == "OPTIONS" and self._cors_origin(request) \
                and self.host_allowed(request):
            return self._preflight(request)  # an old NexLM page on a listed origin calling fetch()
        return await self._check(request, handler, path)

    async def _check(self, request: web.Request, handler, path: str):
        if not self.host_allowed(request):
            return web.json_response(error_event("forbidden_host", "This server does not answer to that host name "
                                                 "(see [server] allowed_hosts)."), status=421)
        streaming = path in ("/ws", "/sse", SEED_WS, "/api/ai/chat/stream")  # GETs that start a generation
        if (streaming or request.method not in ("GET", "HEAD", "OPTIONS")) and not origin_allowed(request, self.allowed):
            self._log_refused_origin(request, path)
            return web.json_response(
                error_event("forbidden_origin", "Cross-origin requests are not allowed from this origin."), status=403)
        if not self.public(path):
            who = await self._authenticate(request, path, self.late_route and path == SEED_WS)
            if who is LATE:
                request[PRINCIPAL], request[GROUPS] = None, ()
                request[LATE_AUTH] = functools.partial(self._late, request)
                return await handler(request)
            if isinstance(who, web.StreamResponse):
                if who.status == 401 and path in ("", "/") and request.method == "GET":
                    raise web.HTTPFound(self.base + "/login")
                return who
            request[PRINCIPAL], request[GROUPS] = who
        return await handler(request)

    def _log_refused_origin(self, request: web.Request, path: str) -> None:
        """A page on another origin fails with a 403 its user never sees (a WebSocket's close
        event has no status): say in the log who was refused and which key would allow it.
        Each origin once at WARNING, a bounded number of them; the rest at DEBUG."""
        origin = request.headers.get("Origin")
        shown = printable(origin, 100) if origin is not None else "(none; Sec-Fetch-Site: cross-site)"
        level = logging.DEBUG
        if shown not in self._warned_origins and len(self._warned_origins) < MAX_WARNED_ORIGINS:
            self._warned_origins.add(shown)
            level = logging.WARNING
        log.log(level, "403 forbidden_origin: %s %s from Origin %s; if that page is yours, add %s to "
                "[server] allowed_origins", request.method, printable(path, 100), shown,
                shown if origin is not None else "its origin")

    def _cors_origin(self, request: web.Request) -> str | None:
        """A listed cross-origin page calling /v1 from the browser: its origin, else None
        (programs send no Origin; same-origin pages need no CORS)."""
        origin = request.headers.get("Origin")
        return origin if origin is not None and origin in self.allowed else None

    def _preflight(self, request: web.Request) -> web.Response:
        asked = request.headers.get("Access-Control-Request-Headers", "authorization, content-type")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": request.headers["Origin"], "Vary": "Origin",
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": asked[:1000], "Access-Control-Max-Age": "600"})

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Security headers on every response, streamed ones and errors included."""
        h = response.headers
        if request.path.startswith(self.base + "/v1/") and (origin := self._cors_origin(request)):
            h["Access-Control-Allow-Origin"] = origin  # Bearer tokens, no cookies: no Allow-Credentials
            h["Vary"] = "Origin"
            h["Access-Control-Expose-Headers"] = "Retry-After, x-should-retry"
        elif request.path[len(self.base):] in SEED_HTTP and (origin := self._cors_origin(request)):
            h["Access-Control-Allow-Origin"] = origin
            h["Vary"] = "Origin"
            h["Access-Control-Expose-Headers"] = "Retry-After"
        h.setdefault("Content-Security-Policy", self.csp)
        h.setdefault("X-Content-Type-Options", "nosniff")
        # same-origin, not no-referrer: with no-referrer Chrome sends "Origin: null" on form posts.
        h.setdefault("Referrer-Policy", "same-origin")
        if "/static/" in request.path:
            h.setdefault("Cache-Control", "no-cache")  # modules import each other unversioned: revalidate

    async def login_page(self, request: web.Request) -> web.Response:
        return aiohttp_jinja2.render_template("login.html", request, {"error": False})

    async def login(self, request: web.Request) -> web.Response:
        """The page's way in: a form posts the token; the cookie then carries a login session id."""
        client = client_address(request)
        wait = self.throttle.retry_after(client)
        if wait:
            resp = aiohttp_jinja2.render_template("login.html", request, {"error": True, "throttled": True},
                                                  status=429)
            resp.headers["Retry-After"] = str(wait)
            return resp
        form = await request.post()
        token = str(form.get("token", "")).strip()
        principal = self.static_principal(token)
        if principal is None:
            if token:
                self.throttle.failed(client)
            return aiohttp_jinja2.render_template("login.html", request, {"error": True}, status=401)
        self.logins.revoke(request.cookies.get(COOKIE, ""))
        resp = web.HTTPFound((self.base or "") + "/")
        resp.set_cookie(COOKIE, self.logins.create(principal), httponly=True, samesite="Strict",
                        path=(self.base or "") + "/", secure=request_scheme(request) == "https",
                        max_age=int(self.settings.auth.login_ttl_seconds))
        raise resp

    async def logout(self, request: web.Request) -> web.Response:
        """``POST /logout``: the login session is revoked and its cookie cleared."""
        self.logins.revoke(request.cookies.get(COOKIE, ""))
        resp = web.HTTPSeeOther((self.base or "") + "/login")
        resp.del_cookie(COOKIE, path=(self.base or "") + "/")
        raise resp
