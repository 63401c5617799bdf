"""``POST /v1/responses``: OpenAI's Responses API, stateless, over the gateway.

The request is translated once (``responses_input``), the turn is the gateway's
(admission, limits, fallback), and its events are written by ``ResponseWriter``.
Headers wait for the first delta: a refusal or an upstream failure before it is a
real HTTP status in OpenAI's error envelope (so the ``openai`` package raises its
usual exception); after it, the stream ends with ``response.failed``. A
non-streaming request sends nothing until the end, so every failure is a status.
A client that leaves cancels this handler (``handler_cancellation``), which closes
the turn and with it the upstream request.
"""

from __future__ import annotations

from aiohttp import web

from .. import openai_errors
from ..appkeys import GATEWAY, SETTINGS, STREAMS
from ..clients import identity
from ..responses_input import parse_request
from ..responses_wire import ResponseWriter, is_failure, is_queued
from ..validation import ChatError
from . import clientjson

STREAM_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                  "X-Accel-Buffering": "no"}


def _refused(status: int, message: str, param: str | None = None) -> web.Response:
    return openai_errors.response(openai_errors.failure(status, message, "bad_request", param))


async def responses(request: web.Request) -> web.StreamResponse:
    try:
        body = clientjson.loads(await request.read())
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].limits.max_frame_bytes
        return openai_errors.response(openai_errors.failure(
            413, f"The request body is larger than {limit} bytes.", "too_large"))
    except clientjson.NotJSON:
        return _refused(400, "The request body is not valid JSON.")
    except clientjson.RefusedJSON as exc:
        return _refused(400, f"The request body is refused: {exc}.")
    try:
        req = parse_request(body, request.app[SETTINGS].limits)
        owner, client = identity(request)
        async with request.app[GATEWAY].turn(owner, client, req.model, req.messages, req.params, req.extra,
                                             door="v1") as turn:
            events = aiter(turn)
            first = None
            async for ev in events:
                first = ev
                if not is_queued(ev):  # a place in a single-slot model's queue: no token yet, keep waiting
                    break
            if first is not None and is_failure(first):
                return openai_errors.response(openai_errors.from_stream_error(first))
            writer = ResponseWriter(turn.model, req.echo, stream=req.stream)
            if not req.stream:
                return await _whole(writer, turn, events, first)
            return await _stream(request, writer, turn, events, first)
    except ChatError as exc:
        return openai_errors.response(openai_errors.from_chat_error(exc))


async def _whole(writer: ResponseWriter, turn, events, first) -> web.Response:
    """Non-streaming: the events accumulate; any failure is still an HTTP status."""
    if first is not None:
        writer.feed(first)
    async for ev in events:
        if is_failure(ev):
            return openai_errors.response(openai_errors.from_stream_error(ev))
        writer.feed(ev)
    writer.end(turn.finish, turn.usage)
    return web.json_response(writer.response())


async def _stream(request: web.Request, writer: ResponseWriter, turn, events, first) -> web.StreamResponse:
    resp = web.StreamResponse(headers=STREAM_HEADERS)
    await resp.prepare(request)
    transport = request.transport
    streams = request.app[STREAMS]
    streams.add(transport)  # cut at shutdown if it stops reading
    try:
        out = writer.start() + (writer.feed(first) if first is not None else b"")
        await resp.write(out)
        failed = False
        async for ev in events:
            data = writer.feed(ev)
            if data:
                await resp.write(data)
            if is_failure(ev):
                failed = True
                break
        if not failed:
            await resp.write(writer.end(turn.finish, turn.usage))
        await resp.write_eof()
    finally:
        streams.discard(transport)
    return resp
