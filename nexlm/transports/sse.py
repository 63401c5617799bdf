"""``/sse``: one turn as a Server-Sent Events stream (GET for EventSource, POST for fetch).

Everything that can be refused is checked before the response starts, so a
refusal is a real HTTP status with a JSON error body. A request carrying
``Last-Event-ID`` (EventSource's automatic reconnect) never starts a new
generation: it resumes the session's reply after that id, or gets 204, which
tells the browser to stop reconnecting.
"""

from __future__ import annotations

import asyncio
import math

from aiohttp import web
from aiohttp_sse import sse_response

from ..appkeys import CONVERSATIONS, SETTINGS, SSE_STREAMS, STREAMS
from ..clients import identity, who
from ..conversations import Conversations
from ..events import Outbox, error_event, sse_frame
from ..validation import ChatError
from . import clientjson
from .common import CLOSE_DEADLINE, cut, parse_after

PARAM_QUERY_KEYS = ("temperature", "top_p", "max_tokens", "system")


def json_error(code: str, message: str, status: int, retry_after: float | None = None) -> web.Response:
    headers = None if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
    return web.json_response(error_event(code, message), status=status, headers=headers)


async def _fields(request: web.Request) -> dict:
    if request.method == "POST":
        body = _json(await request.read(), "The request body")
        if not isinstance(body, dict):
            raise ChatError("bad_request", "The request body must be a JSON object.")
        return _post_fields(body)
    q = request.query
    fields: dict = {k: q[k] for k in ("type", "message", "model", "session", "after") if k in q}
    if "index" in q:
        fields["index"] = _number("max_tokens", q["index"])  # an integer
    if "params" in q:
        fields["params"] = _json(q["params"], "params")
    else:
        params = {}
        for key in PARAM_QUERY_KEYS:
            if key in q:
                params[key] = _number(key, q[key]) if key != "system" else q[key]
        if params:
            fields["params"] = params
    return fields


POST_KEYS = frozenset(("type", "message", "model", "session", "after", "index", "params", *PARAM_QUERY_KEYS))


def _post_fields(body: dict) -> dict:
    """A POST body has the same fields as GET's query, as JSON: parameters at the top level
    (``params`` works too), unknown fields refused by name rather than silently ignored."""
    for key in body:
        if key not in POST_KEYS:
            raise ChatError("bad_request", f"Unknown field {str(key)[:40]!r} (known: {', '.join(sorted(POST_KEYS))}).")
    top = {k: body[k] for k in PARAM_QUERY_KEYS if k in body}
    if not top:
        return body
    params = body.get("params")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        raise ChatError("bad_request", "params must be an object")
    both = sorted(set(top) & set(params))
    if both:
        raise ChatError("bad_request", f"{both[0]} is given both at the top level and in params; give it once.")
    fields = {k: v for k, v in body.items() if k not in top}
    fields["params"] = {**params, **top}
    return fields


def _json(data: str | bytes, what: str):
    try:
        return clientjson.loads(data)
    except clientjson.NotJSON:
        raise ChatError("bad_request", f"{what} is not valid JSON.") from None
    except clientjson.RefusedJSON as exc:
        raise ChatError("bad_request", f"{what} is refused: {exc}.") from None


def _number(key: str, raw: str):
    try:
        return int(raw) if key == "max_tokens" else float(raw)
    except ValueError:
        raise ChatError("bad_request", f"{key} must be a number") from None


async def sse(request: web.Request) -> web.StreamResponse:
    chat: Conversations = request.app[CONVERSATIONS]
    owner, client = identity(request)
    person = who(request)
    try:
        fields = await _fields(request)
        after_raw = request.headers.get("Last-Event-ID")
        if after_raw is None and fields.get("after") is not None:
            after_raw = str(fields["after"])
        try:
            after = parse_after(after_raw)
        except ValueError as exc:
            raise ChatError("bad_request", str(exc)) from None
        sid = fields.get("session")
        if sid is not None and not isinstance(sid, str):
            raise ChatError("bad_request", "session must be a string")
        session = await chat.find(sid, owner) if sid else None

        if after is not None:
            # A reconnect: resume, never generate.
            if session is None or not chat.can_resume(session, after):
                return web.Response(status=204)
            return await _stream(request, chat, session, after, chat.last_reply(session))

        kind = fields.get("type", "chat")
        message = fields.get("message")
        model, params = fields.get("model"), fields.get("params")
        if kind in ("regenerate", "edit"):
            if session is None:
                raise ChatError("not_found", "No such session (it may have expired).", 404)
            if kind == "regenerate":
                reply = await chat.regenerate(session, model, params, door="sse", who=person)
            else:
                reply = await chat.edit(session, fields.get("index"), message, model, params, door="sse",
                                        who=person)
        elif kind != "chat":
            raise ChatError("bad_request", f"Unknown type {str(kind)[:40]!r} (chat, regenerate or edit).")
        elif message is None or message == "":
            since = chat.running_since(session) if session is not None else None
            if since is not None:  # watch the running reply
                return await _stream(request, chat, session, since, chat.last_reply(session))
            raise ChatError("bad_request", "message is required")
        elif session is None:
            session, reply = await chat.send_new(owner, client, message, model, params, door="sse", who=person)
        else:
            reply = await chat.send(session, message, model, params, door="sse", who=person)
    except ChatError as exc:
        return json_error(exc.code, exc.message, exc.status, exc.retry_after)
    return await _stream(request, chat, session, chat.running_since(session), reply.id)


async def _stream(request: web.Request, chat: Conversations, session, after: int, reply_id: str) -> web.StreamResponse:
    """``session`` first (its id is what the client has so far), then the reply until its ``done``."""
    transport = request.transport
    timers: list[asyncio.TimerHandle] = []

    def overflowed() -> None:  # too far behind: the stream ends (the client resumes with Last-Event-ID)
        timers.append(asyncio.get_running_loop().call_later(CLOSE_DEADLINE, cut, transport))

    outbox = Outbox(overflowed)
    frame = chat.frame(session)
    outbox.put(frame)
    chat.attach(session, outbox, after)
    outbox.bound(request.app[SETTINGS].limits.max_queued_bytes)
    request.app[STREAMS].add(transport)
    request.app[SSE_STREAMS].add(transport)
    try:
        async with sse_response(request, allow_all_methods=True, sep="\n") as resp:
            while batch := await outbox.get():
                parts = []
                finished = False
                for ev in batch:
                    parts.append(sse_frame(ev, after) if ev is frame else sse_frame(ev))
                    if ev["type"] == "done" and ev.get("reply") == reply_id:
                        finished = True
                        break
                await resp.write(b"".join(parts))
                if finished:
                    break  # an empty batch instead means the session was closed under us
    finally:
        chat.detach(session, outbox)
        outbox.close()
        for timer in timers:
            timer.cancel()
        request.app[STREAMS].discard(transport)
        request.app[SSE_STREAMS].discard(transport)
    return resp
