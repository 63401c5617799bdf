"""The small JSON API: models, sessions, stop (SSE's control channel), health, metrics (JSON and Prometheus)."""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from ..appkeys import CONVERSATIONS, LOOP_LAG, METRICS, REGISTRY, WEBSOCKETS
from ..clients import identity
from ..conversations import Conversations
from ..validation import ChatError
from . import clientjson
from .sse import json_error


async def models(request: web.Request) -> web.Response:
    return web.json_response(request.app[REGISTRY].listing())


async def _session(request: web.Request):
    owner, _ = identity(request)
    return await request.app[CONVERSATIONS].find(request.match_info["sid"], owner)


async def create_session(request: web.Request) -> web.Response:
    """``POST /api/sessions {"history"?, "model"?, "params"?}``: a new session, optionally seeded.

    For clients without a WebSocket (SSE behind a strict proxy) that need to restore a
    conversation after a server restart.
    """
    chat: Conversations = request.app[CONVERSATIONS]
    try:
        body = clientjson.loads(await request.read()) if request.can_read_body else {}
    except clientjson.NotJSON:
        return json_error("bad_request", "The request body is not valid JSON.", 400)
    except clientjson.RefusedJSON as exc:
        return json_error("bad_request", f"The request body is refused: {exc}.", 400)
    if not isinstance(body, dict):
        return json_error("bad_request", "The request body must be a JSON object.", 400)
    owner, client = identity(request)
    try:
        session = await chat.create_seeded(owner, client, body.get("model"), body.get("params"),
                                           body.get("history") or None)
    except ChatError as exc:
        return json_error(exc.code, exc.message, exc.status, exc.retry_after)
    return web.json_response(chat.public(session), status=201)


NO_IDENTITY = ("Listing conversations needs an identity (an access token, a signed-in user or a trusted "
               "proxy's user header); without one, a session id stays a capability only its holder knows.")
PAGE_MAX = 200


def _page_query(query) -> tuple[int, float | None]:
    """``?limit=`` (1..200, default 50) and ``?before=`` (the ``next`` of the previous page)."""
    try:
        limit = int(query.get("limit", "50"))
    except ValueError:
        raise ChatError("bad_request", "limit must be a whole number from 1 to 200") from None
    if not 1 <= limit <= PAGE_MAX:
        raise ChatError("bad_request", "limit must be a whole number from 1 to 200")
    before = None
    if "before" in query:
        try:
            before = float(query["before"])
        except ValueError:
            before = math.nan
        if not math.isfinite(before):
            raise ChatError("bad_request", "before must be a number: the next value of the previous page")
    return limit, before


async def list_sessions(request: web.Request) -> web.Response:
    """``GET /api/sessions?limit=&before=``: the caller's conversations, newest first."""
    owner, _ = identity(request)
    if owner is None:
        return json_error("no_identity", NO_IDENTITY, 403)
    try:
        limit, before = _page_query(request.query)
    except ChatError as exc:
        return json_error(exc.code, exc.message, exc.status)
    sessions, cursor = await request.app[CONVERSATIONS].history.list_for(owner, limit, before)
    return web.json_response({"sessions": sessions, "next": cursor})


async def rename_session(request: web.Request) -> web.Response:
    """``PATCH /api/sessions/{id} {"title"}``: answered with the session's updated list entry."""
    s = await _session(request)
    if s is None:
        return json_error("not_found", "No such session (it may have expired).", 404)
    try:
        body = clientjson.loads(await request.read())
    except (clientjson.NotJSON, clientjson.RefusedJSON):
        return json_error("bad_request", "The request body must be a JSON object: {\"title\": \"...\"}.", 400)
    if not isinstance(body, dict) or "title" not in body:
        return json_error("bad_request", "The request body must be a JSON object: {\"title\": \"...\"}.", 400)
    try:
        entry = await request.app[CONVERSATIONS].history.rename(s, body["title"])
    except ChatError as exc:
        return json_error(exc.code, exc.message, exc.status)
    return web.json_response(entry)


async def get_session(request: web.Request) -> web.Response:
    s = await _session(request)
    if s is None:
        return json_error("not_found", "No such session (it may have expired).", 404)
    return web.json_response(request.app[CONVERSATIONS].public(s))


async def delete_session(request: web.Request) -> web.Response:
    s = await _session(request)
    if s is None:
        return json_error("not_found", "No such session (it may have expired).", 404)
    await request.app[CONVERSATIONS].delete(s)
    return web.json_response({"deleted": s.id})


async def stop(request: web.Request) -> web.Response:
    s = await _session(request)
    if s is None:
        return json_error("not_found", "No such session (it may have expired).", 404)
    stopped = await request.app[CONVERSATIONS].stop(s, "stopped")
    return web.json_response({"stopped": stopped})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Counters for operators and the benchmark: sessions, replies, tasks, loop lag."""
    stats = request.app[CONVERSATIONS].stats()
    lag = request.app[LOOP_LAG]
    return web.json_response({
        "sessions": stats["sessions"],
        "sessions_live": stats["live"],
        "replies_running": stats["limiter_running"],
        "websockets": len(request.app[WEBSOCKETS]),
        "tasks": len(asyncio.all_tasks()),
        "loop_lag_ms": lag.snapshot(reset=request.query.get("reset") == "1"),
    })


async def prometheus(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format (``nexlm.metrics``)."""
    metrics = request.app[METRICS]
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})
