"""The small JSON API: models, sessions, stop (SSE's control channel), health, metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..chat import Chat
from .common import CHAT, REGISTRY, WEBSOCKETS, identity
from .sse import json_error

LOOP_LAG = web.AppKey("loop_lag", object)


async def models(request: web.Request) -> web.Response:
    return web.json_response(request.app[REGISTRY].listing())


def _session(request: web.Request):
    owner, _ = identity(request)
    return request.app[CHAT].find(request.match_info["sid"], owner)


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
        "loop_lag_ms": lag.snapshot(),
    })
