"""``POST /v1/responses``: OpenAI's Responses API, stateless, over the ``Gateway``.

The request is translated once (``responses_request``: input items to chat messages),
the turn is the gateway's (admission, limits, fallback), and ``ResponseWriter`` writes
its events. Headers wait for the first delta: a refusal or an upstream failure before
it is a real HTTP status in OpenAI's envelope (so the ``openai`` package raises its
usual exception); after it, the stream ends with ``response.failed``. A non-streaming
request sends nothing until the end, so every failure there is a status. A client that
leaves cancels the handler (``handler_cancellation``, or chat's ``Watch`` without it),
which closes the turn and with it the upstream request.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ...appkeys import CACHE_STATUS, GATEWAY, SETTINGS, STREAMS
from ...clients import identity, who
from ...gateway import cache_directives
from ...openai_errors import failure, from_chat_error, from_stream_error, response
from ...openai_wire import StreamError
from ...responses_wire import ResponseWriter
from ...validation import ChatError
from .chat import SHUTDOWN, SSE_HEADERS, Watch, _read_json, ended_by_shutdown, first_event
from .responses_request import parse_request


async def responses(request: web.Request) -> web.StreamResponse:
    owner, client = identity(request)
    try:
        call = parse_request(await _read_json(request), request.app[SETTINGS].limits)
    except ChatError as exc:
        return response(from_chat_error(exc))
    watch = Watch(request)
    started: list[web.StreamResponse] = []
    try:
        async with request.app[GATEWAY].turn(owner, client, call.model, call.messages, call.params, call.extra,
                                             door="v1", who=who(request),
                                             cache=cache_directives(request.headers.get("Cache-Control"))) as turn:
            request[CACHE_STATUS] = turn.cache_status  # the x-nexlm-cache header (server.py adds it)
            events, first = await first_event(turn)
            if type(first) is StreamError:
                return response(from_stream_error(first))
            # After the first event: a fallback may have changed the model.
            writer = ResponseWriter(turn.model, call.echo, stream=call.stream)
            if call.stream:
                return await _stream(request, writer, turn, events, first, started)
            return await _whole(writer, turn, events, first)
    except ChatError as exc:
        return response(from_chat_error(exc))
    except asyncio.CancelledError:
        if watch.gone and asyncio.current_task().uncancel() == 0:
            return started[0] if started else web.Response(status=499)  # nobody is there to read it
        raise
    finally:
        watch.close()


async def not_stored(request: web.Request) -> web.Response:
    """``GET``/``DELETE /v1/responses/{id}`` (and ``/cancel``, ``/input_items``): nothing is stored."""
    return response(failure(404, "This server does not store responses (yet), so there is none to "
                            f"retrieve, cancel or delete: {request.match_info['id'][:64]!r}.",
                            "not_found", "response_id"))


async def _whole(writer: ResponseWriter, turn, events, first) -> web.Response:
    """Not streamed: the events accumulate, and any failure is still an HTTP status."""
    if first is not None:
        writer.feed(first)
    async for ev in events:
        if type(ev) is StreamError:
            return response(from_stream_error(ev))
        writer.feed(ev)
    writer.end(turn.finish, turn.usage)
    return web.json_response(writer.response())


async def _stream(request: web.Request, writer: ResponseWriter, turn, events, first,
                  started: list) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    started.append(resp)
    streams = request.app[STREAMS]
    transport = request.transport
    streams.add(transport)  # cut at shutdown if it stops reading
    try:
        await resp.prepare(request)
        await resp.write(writer.start() + (writer.feed(first) if first is not None else b""))
        failed = False
        async for ev in events:
            data = writer.feed(ev)  # a StreamError (always the last event) is response.failed
            if data:
                await resp.write(data)
            failed = type(ev) is StreamError
        if not failed:
            await resp.write(writer.end(turn.finish, turn.usage))
        await resp.write_eof()
    except asyncio.CancelledError:
        if not await ended_by_shutdown(request, resp, transport, writer.fail("shutting_down", SHUTDOWN)):
            raise  # (ended by shutdown: response.failed says so rather than a cut stream)
    finally:
        streams.discard(transport)
    return resp
