"""The original NexLM's HTTP routes: ``POST /api/ai/chat`` and ``GET /api/ai/chat/stream``.

Stateless single turns on the gateway (nothing stored), in the seed's formats
(``seed_wire``): the reply as plain text (or JSON with ``Accept: application/json``),
or an event stream of raw text ended by ``event: done``. A refusal, or an upstream
failure before the first token, is a real HTTP status with a readable message; the
stream's headers wait for the first piece of text. A client that leaves cancels the
handler (``handler_cancellation``, or /v1's ``Watch`` when that is off), and leaving
``gateway.turn`` closes the upstream request. At shutdown a stream still running after
the grace ends with an ``error`` event and ``done`` rather than a cut.
"""

from __future__ import annotations

import asyncio
import math
import time

from aiohttp import web

from .. import seed_wire
from ..appkeys import CACHE_STATUS, GATEWAY, REGISTRY, SETTINGS, STREAMS
from ..clients import identity, who
from ..gateway import GatewayTurn, cache_directives
from ..openai_errors import from_stream_error
from ..validation import ChatError, check_message
from . import clientjson
from .common import CLOSE_DEADLINE
from .v1.chat import Watch

POST_KEYS = ("message", "modelType")
KEEPALIVE_SECONDS = 15.0  # a comment while the model only reasons, so proxies do not time out
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
SHUTDOWN = "The server is restarting; the reply was cut short. Try again in a moment."


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _refusal(request: web.Request, status: int, code: str, message: str, headers: dict | None = None,
             retry_after: float | None = None) -> web.Response:
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if _wants_json(request):
        return web.json_response({"type": "error", "code": code, "message": message}, status=status, headers=headers)
    return web.Response(text=message + "\n", status=status, headers=headers)


def _chat_error(request: web.Request, exc: ChatError) -> web.Response:
    return _refusal(request, exc.status, exc.code, exc.message, retry_after=exc.retry_after)


def _stream_error(request: web.Request, ev) -> web.Response:
    f = from_stream_error(ev)  # the /v1 doors' statuses: 502, 504 timeout, 429, 503
    return _refusal(request, f.status, ev.code, ev.message, f.headers)


def _turn(request: web.Request, message, model, field: str) -> GatewayTurn:
    """The gateway turn for one question (checked here: message, modelType)."""
    settings = request.app[SETTINGS]
    if message is None:
        raise ChatError("bad_request", f"{field} is required")
    message = check_message(settings.limits, message)
    if model is None or model == "":
        model = request.app[REGISTRY].default_model()
    elif not isinstance(model, str):
        raise ChatError("bad_request", "modelType must be a string (a model id or alias)")
    messages = [{"role": "user", "content": message}]
    if settings.chat.system_prompt:
        messages.insert(0, {"role": "system", "content": settings.chat.system_prompt})
    owner, client = identity(request)
    return request.app[GATEWAY].turn(owner, client, model, messages, door="seed", who=who(request),
                                     cache=cache_directives(request.headers.get("Cache-Control")))


def _shut_down(request: web.Request) -> bool:
    """Cancelled by the gateway's shutdown (after its grace) with the client still there: answer it,
    instead of letting the cancellation cut the connection."""
    transport = request.transport
    if not request.app[GATEWAY].closing or transport is None or transport.is_closing():
        return False
    asyncio.current_task().uncancel()
    return True


async def _body(request: web.Request) -> dict:
    try:
        body = clientjson.loads(await request.read())
    except clientjson.NotJSON:
        raise ChatError("bad_request", "The request body is not valid JSON.") from None
    except clientjson.RefusedJSON as exc:
        raise ChatError("bad_request", f"The request body is refused: {exc}.") from None
    if not isinstance(body, dict):
        raise ChatError("bad_request", 'The request body must be a JSON object: {"message": TEXT, "modelType": MODEL}.')
    unknown = [k for k in body if k not in POST_KEYS]
    if unknown:
        raise ChatError("bad_request", f"Unknown field {str(unknown[0])[:40]!r} (known: message, modelType).")
    return body


async def chat(request: web.Request) -> web.StreamResponse:
    """``POST /api/ai/chat {"message", "modelType"?}``: the whole reply at once."""
    watch = Watch(request)
    try:
        body = await _body(request)
        async with _turn(request, body.get("message"), body.get("modelType"), "message") as turn:
            request[CACHE_STATUS] = turn.cache_status
            parts: list[str] = []
            async for ev in turn:
                text = seed_wire.text_of(ev)
                if text is not None:
                    parts.append(text)
                elif (failure := seed_wire.failure_of(ev)) is not None:
                    return _stream_error(request, failure)  # the text so far is not an answer
            reply, finish, model, usage = "".join(parts), turn.finish, turn.model, turn.usage
    except ChatError as exc:
        return _chat_error(request, exc)
    except asyncio.CancelledError:
        if watch.gone and asyncio.current_task().uncancel() == 0:
            return web.Response(status=499)  # nobody is there to read it
        if _shut_down(request):
            return _refusal(request, 503, "shutting_down", SHUTDOWN, retry_after=5)
        raise
    finally:
        watch.close()
    if _wants_json(request):
        return web.json_response({"reply": reply, "model": model, "finish_reason": finish, "usage": usage})
    return web.Response(text=reply)


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /api/ai/chat/stream?prompt=TEXT&modelType=MODEL``: the reply as an event stream."""
    q = request.query
    watch = Watch(request)
    resp: web.StreamResponse | None = None
    streams, transport = request.app[STREAMS], request.transport
    try:
        async with _turn(request, q.get("prompt"), q.get("modelType"), "prompt") as turn:
            request[CACHE_STATUS] = turn.cache_status
            last = time.monotonic()
            async for ev in turn:
                text = seed_wire.text_of(ev)
                if text is not None:
                    if not text:
                        continue
                    if resp is None:
                        resp = await _start(request, streams)
                    await resp.write(seed_wire.sse_text(text))
                    last = time.monotonic()
                elif (failure := seed_wire.failure_of(ev)) is not None:
                    if resp is None:
                        return _stream_error(request, failure)
                    await resp.write(seed_wire.sse_error(failure.message))
                elif resp is not None and time.monotonic() - last >= KEEPALIVE_SECONDS:
                    await resp.write(b": thinking\n\n")
                    last = time.monotonic()
            if resp is None:  # ended without any text (an empty answer): still a stream
                resp = await _start(request, streams)
            await resp.write(seed_wire.sse_done(turn.finish, turn.model, turn.usage))
            await resp.write_eof()
    except ChatError as exc:
        return _chat_error(request, exc)
    except ConnectionResetError:  # the client left mid-stream: the turn (and upstream) is closed already
        pass
    except asyncio.CancelledError:
        if watch.gone and asyncio.current_task().uncancel() == 0:
            return resp or web.Response(status=499)
        if not _shut_down(request):
            raise
        if resp is None:
            return _refusal(request, 503, "shutting_down", SHUTDOWN, retry_after=5)
        try:
            async with asyncio.timeout(CLOSE_DEADLINE):
                await resp.write(seed_wire.sse_error(SHUTDOWN) + seed_wire.sse_done("interrupted", turn.model, None))
                await resp.write_eof()
        except (ConnectionError, TimeoutError):
            pass
    finally:
        watch.close()
        streams.discard(transport)
    return resp


async def _start(request: web.Request, streams: set) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    streams.add(request.transport)  # cut at shutdown if it hangs, like every open stream
    await resp.prepare(request)
    return resp
