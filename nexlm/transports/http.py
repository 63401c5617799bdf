"""The small JSON API: models, sessions, stop (SSE's control channel), health, metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..chat import Chat, ChatError
from .common import CHAT, REGISTRY, WEBSOCKETS, identity
from .sse import json_error

LOOP_LAG = web.AppKey("loop_lag", object)


async def models(request: web.Request) -> web.Response:
    return web.json_response(request.app[REGISTRY].listing())


def _session(request: web.Request):
    owner, _ = identity(request)
    return request.app[CHAT].find(request.match_info["sid"], owner)


async def create_session(request: web.Request) -> web.Response:
    """``POST /api/sessions {"history"?, "model"?, "params"?}``: a new session, optionally seeded.

    For clients without a WebSocket (SSE behind a strict proxy) that need to restore a
    conversation after a server restart.
    """
    chat: Chat = request.app[CHAT]
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        return json_error("bad_request", "The request body is not valid JSON.", 400)
    if not isinstance(body, dict):
        return json_error("bad_request", "The request body must be a JSON object.", 400)
    owner, client = identity(request)
    try:
        session, _ = chat.open_session(None, owner, client)
    except ChatError as exc:
        return json_error(exc.code, exc.message, exc.status, exc.retry_after)
    try:
        chat.configure(session, body.get("model"), body.get("params"))
        if body.get("history"):
            chat.restore(session, body["history"])
    except ChatError as exc:
        chat.sessions.remove(session.id, "deleted")
        return json_error(exc.code, exc.message, exc.status)
    return web.json_response(session.public(), status=201)


async def get_session(request: web.Request) -> web.Response:
    s = _session(request)
    if s is None:
        return json_error("not_found", "No such session (it may have expired).", 404)
    return web.json_response(s.public())


async def delete_session(request: web.Request) -> web.Response:
    chat: Chat = request.app[CHAT]
    s = _session(request)
    if s is None:
        return json_error("not_found", "No such session (it may have expired).", 404)
    await chat.stop(s, "stopped")
    chat.sessions.remove(s.id, "deleted")
    return web.json_response({"deleted": s.id})


async def stop(request: web.Request) -> web.Response:
    s = _session(request)
    if s is None:
        return json_error("not_found", "No such session (it may have expired).", 404)
    stopped = await request.app[CHAT].stop(s, "stopped")
    return web.json_response({"stopped": stopped})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Counters for operators and the benchmark: sessions, replies, tasks, loop lag."""
    chat: Chat = request.app[CHAT]
    lag = request.app[LOOP_LAG]
    return web.json_response({
        "sessions": len(chat.sessions),
        "replies_running": chat.limiter.running_total,
        "websockets": len(request.app[WEBSOCKETS]),
        "tasks": len(asyncio.all_tasks()),
        "loop_lag_ms": lag.snapshot(reset=request.query.get("reset") == "1"),
    })
