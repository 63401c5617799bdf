"""``create_app(settings)``: routes, templates, static files, and the lifetime of shared resources.

Long-lived things (the one ``ClientSession``, the providers, the chat layer and
its background tasks) are opened and closed in ``cleanup_ctx``, stored on the app
under typed keys; nothing is a module-level singleton. Shutdown lets running
replies finish for a bounded time, records them, then closes WebSockets with
1001 so clients reconnect to the next process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import weakref
from pathlib import Path

import aiohttp
import aiohttp_jinja2
import jinja2
from aiohttp import web

from . import __version__
from .admission import Admission
from .appkeys import (
    CACHE_STATUS,
    CONVERSATIONS,
    GATEWAY,
    GUARD,
    HTTP,
    LOOP_LAG,
    METRICS,
    REGISTRY,
    SETTINGS,
    SSE_STREAMS,
    STREAMS,
    USAGE,
    WEBSOCKETS,
)
from .cache import ResponseCache
from .cache_backends import make_backend
from .config import Settings
from .conversations import Conversations
from .gateway import Gateway
from .looplag import LoopLag
from .metrics import Metrics
from .providers.registry import Registry
from .security import Guard
from .store import StoreError
from .store_factory import describe
from .transports import http, seed_http, seed_ws, sse, ws
from .transports import usage as usage_api
from .transports.common import CLOSE_DEADLINE, cut
from .transports.v1 import chat as v1
from .transports.v1 import responses as v1_responses
from .usage import Recorder, make_usage_log
from .validation import ChatError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
# Module scripts must be served as JavaScript (nosniff): not every system's mime.types knows .mjs.
mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("text/javascript", ".js")


@web.middleware
async def refusals(request: web.Request, handler):
    """A refusal no handler turned into an answer (e.g. ``store_unavailable`` from a store that went
    away while a session was looked up): its status and message, never a 500 with a traceback."""
    try:
        return await handler(request)
    except ChatError as exc:
        headers = None if exc.retry_after is None else {"Retry-After": str(max(1, round(exc.retry_after)))}
        return web.json_response({"type": "error", "code": exc.code, "message": exc.message},
                                 status=exc.status, headers=headers)


async def _cache_header(request: web.Request, response: web.StreamResponse) -> None:
    """``x-nexlm-cache: hit|miss|bypass`` on the responses of the gateway's doors (``CACHE_STATUS``)."""
    status = request.get(CACHE_STATUS)
    if status is not None:
        response.headers["x-nexlm-cache"] = status


def create_app(settings: Settings) -> web.Application:
    guard = Guard(settings)
    app = web.Application(
        middlewares=[guard.middleware, refusals],
        client_max_size=settings.limits.max_frame_bytes,
    )
    app[SETTINGS] = settings
    app[GUARD] = guard
    app[WEBSOCKETS] = weakref.WeakSet()
    app[STREAMS] = set()
    app[SSE_STREAMS] = set()
    metrics = app[METRICS] = Metrics(settings)
    app[USAGE] = Recorder(make_usage_log(settings), settings.auth.tokens)
    app[LOOP_LAG] = LoopLag(observe=metrics.loop_lag.observe)
    app.on_response_prepare.append(guard.on_prepare)
    app.on_response_prepare.append(_cache_header)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(ROOT / "templates"), autoescape=True)

    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(guard.lifetime)  # the JWKS client, if any
    app.on_shutdown.append(_shutdown)

    base = settings.server.base_path
    r = app.router
    r.add_get(base + "/", index)
    if base:
        r.add_get(base, lambda request: _redirect(base + "/"))
    r.add_get(base + "/ws", ws.websocket)
    r.add_get(base + "/api/ai/chat/websocket", seed_ws.websocket)  # the seed's route ([compat] seed_frames)
    r.add_post(base + "/api/ai/chat", seed_http.chat)  # the seed's HTTP routes: stateless, on the gateway
    r.add_get(base + "/api/ai/chat/stream", seed_http.stream, allow_head=False)  # HEAD must not generate
    r.add_route("GET", base + "/sse", sse.sse)
    r.add_route("POST", base + "/sse", sse.sse)
    r.add_get(base + "/api/models", http.models)
    r.add_post(base + "/api/sessions", http.create_session)
    r.add_get(base + "/api/sessions", http.list_sessions)  # the caller's history (needs an identity)
    r.add_get(base + "/api/sessions/{sid}", http.get_session)
    r.add_delete(base + "/api/sessions/{sid}", http.delete_session)
    r.add_patch(base + "/api/sessions/{sid}", http.rename_session)
    r.add_post(base + "/api/sessions/{sid}/stop", http.stop)
    r.add_get(base + "/api/usage", usage_api.usage)
    r.add_get(base + "/api/metrics", http.metrics)
    r.add_get(base + "/metrics", http.prometheus)  # behind access control unless [metrics] public = true
    r.add_get(base + "/healthz", http.healthz)
    r.add_get(base + "/v1/models", v1.models)  # OpenAI's API for programs (stateless; see README)
    r.add_get(base + "/v1/models/{model:.+}", v1.model)
    r.add_post(base + "/v1/chat/completions", v1.chat_completions)
    r.add_post(base + "/v1/responses", v1_responses.responses)
    r.add_get(base + "/v1/responses/{id}", v1_responses.not_stored)
    r.add_delete(base + "/v1/responses/{id}", v1_responses.not_stored)
    r.add_post(base + "/v1/responses/{id}/cancel", v1_responses.not_stored)
    r.add_get(base + "/v1/responses/{id}/input_items", v1_responses.not_stored)
    r.add_get(base + "/login", guard.login_page)
    r.add_post(base + "/login", guard.login)
    r.add_post(base + "/logout", guard.logout)
    r.add_static(base + "/static", ROOT / "static", append_version=False)
    return app


def startup_lines(app: web.Application) -> list[str]:
    """What a user should know at start: who answers by default, and what cannot answer and why."""
    registry = app[REGISTRY]
    listing = registry.listing()
    by_id = {m["id"]: m for m in listing["models"]}
    default = by_id.get(listing["default"])
    lines = []
    if default is not None:
        state = "" if default["available"] else f" (unavailable: {default['reason']})"
        lines.append(f"Default model: {default['id']} ({default['label']}){state}")
    for name, p in registry.providers.items():
        reason = p.unavailable_reason()
        if reason:
            lines.append(f"Unavailable: {name} ({p.label}): {reason}")
    return lines


def _redirect(location: str):
    raise web.HTTPFound(location)


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict:
    return {"embed": request.query.get("embed") == "1", "version": __version__}


async def _resources(app: web.Application):
    settings = app[SETTINGS]
    # No pool cap: aiohttp's default of 100 would silently queue the 101st concurrent stream.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector) as session:  # proxies: see env_proxy
        app[HTTP] = session
        registry = Registry(settings, session)
        app[REGISTRY] = registry
        metrics, recorder = app[METRICS], app[USAGE]
        admission = Admission(settings, registry)
        quotas = admission.quotas

        observers = (metrics.turn_done, recorder.turn_done, quotas.turn_done)

        def turn_done(turn, session=None) -> None:  # every ended turn, every door: metrics, usage, quotas
            for observe in observers:
                try:
                    observe(turn, session)
                except Exception:  # one observer's bug must not cost the others their count
                    log.exception("turn observer %s failed", getattr(observe, "__qualname__", observe))

        chat = Conversations(settings, registry, admission, on_turn_done=turn_done)
        async with contextlib.AsyncExitStack() as opened:  # closed in reverse, also when opening fails
            opened.push_async_callback(registry.close)
            try:
                await chat.start()
                opened.push_async_callback(chat.store.close)
                await chat.limiter.open()  # (with a redis store the limits are counted there too)
                opened.push_async_callback(chat.limiter.close)
                await quotas.open()  # (after the store: sqlite's counters live in its file)
                opened.push_async_callback(quotas.close)
            except StoreError as exc:  # app.py prints it as one line and exits 2
                raise StoreError(f"cannot open the {describe(settings)}: {exc}") from None
            try:
                await recorder.start()  # the usage log, in the same store
            except StoreError as exc:
                raise StoreError(f"cannot open the {describe(settings)} for usage: {exc}") from None
            opened.push_async_callback(recorder.close)  # after the turns: their last entries are written
            cache = ResponseCache(settings.cache, make_backend(settings, chat.store), metrics)  # on the store's connection
            await cache.open()
            opened.push_async_callback(cache.close)  # before the store it shares closes
            chat.cache = cache
            app[CONVERSATIONS] = chat
            gateway = Gateway(admission, on_turn_done=turn_done, cache=cache)  # one admission for every door
            app[GATEWAY] = gateway
            metrics.read_live = lambda: _live_gauges(app)
            sweeper = asyncio.create_task(chat.housekeeping(), name="housekeeping")
            lag = asyncio.create_task(app[LOOP_LAG].run(), name="loop lag")
            try:
                yield
            finally:
                for task in (sweeper, lag):
                    task.cancel()
                await asyncio.wait([sweeper, lag])
                await asyncio.gather(chat.close(0, None), gateway.close(0))  # normally done in _shutdown already


def _live_gauges(app: web.Application) -> dict:
    """What ``/metrics`` reads at scrape time (``Metrics.read_live``)."""
    chat = app[CONVERSATIONS]
    return {
        "connections": {"ws": len(app[WEBSOCKETS]), "sse": len(app[SSE_STREAMS])},
        "active_replies": chat.limiter.running_total,
        "queued_replies": sum(p.waiting() for p in app[REGISTRY].providers.values() if p.single_slot),
        "sessions": chat.store.size,  # (every store has size; only the memory one has len)
    }


async def _shutdown(app: web.Application) -> None:
    """SIGTERM/SIGINT: running replies finish or stop within the grace, then clients are told to
    reconnect; everything is over within the grace plus ``CLOSE_DEADLINE``, whatever clients do."""
    # Closing each outbox (in close) lets its writer flush the final events, then close with 1001
    # (SSE: the stream ends), under the write deadline. A peer that does not read is cut after it.
    grace = app[SETTINGS].server.shutdown_grace_seconds
    await asyncio.gather(app[CONVERSATIONS].close(grace, cancel_wait=1.0), app[GATEWAY].close(grace))
    streams = app[STREAMS]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_DEADLINE
    while streams and loop.time() < deadline:
        await asyncio.sleep(0.02)
    if streams:
        log.info("shutdown: cutting %d connections that did not take their last events", len(streams))
        for transport in list(streams):
            cut(transport)
