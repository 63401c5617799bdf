"""``GET /v1/models`` and ``POST /v1/chat/completions``, streamed or not, over the ``Gateway``.

Headers wait for the turn's first event, so a failure before the first token is a real
HTTP status in OpenAI's envelope; after it, the stream carries ``data: {"error": ...}``
and ends. A client that goes away cancels the handler (``handler_cancellation=True``, as
app.py and aiohttp's test server run it; ``Watch`` does the same when it is off), which
closes the turn and with it the upstream request.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ...appkeys import CACHE_STATUS, GATEWAY, REGISTRY, SETTINGS, STREAMS
from ...clients import identity, who
from ...gateway import cache_directives
from ...openai_errors import failure, from_chat_error, from_stream_error, response
from ...openai_wire import (
    DONE,
    ChunkStream,
    Completion,
    Queued,
    StreamError,
    error_chunk,
    model_object,
    models_list,
)
from ...validation import ChatError
from .. import clientjson
from ..common import CLOSE_DEADLINE
from .request import parse_chat

log = logging.getLogger(__name__)
INTERNAL = "Something went wrong on the server while answering."
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SHUTDOWN = "The server is restarting; the reply was cut short. Try again in a moment."
WATCH_INTERVAL = 0.25  # seconds between looks at the connection, when aiohttp does not cancel for us


async def models(request: web.Request) -> web.Response:
    return web.json_response(models_list(request.app[REGISTRY].listing()))


async def model(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``: an id or an alias, as everywhere a model is named."""
    name = request.match_info["model"]
    for m in request.app[REGISTRY].listing()["models"]:
        if name == m["id"] or name in m["aliases"]:
            return web.json_response(model_object(m))
    return response(failure(404, f"The model {name[:100]!r} does not exist.", "model_not_found", "model"))


class Watch:
    """Cancels the handler's task once its client's connection is gone: a safety net for a server
    run without ``handler_cancellation`` (aiohttp's default since 3.9), where nothing else would
    stop a generation nobody reads."""

    __slots__ = ("_handle", "_loop", "gone", "request", "task")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.task = asyncio.current_task()
        self.gone = False
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(WATCH_INTERVAL, self._check)

    def _check(self) -> None:
        transport = self.request.transport
        if transport is None or transport.is_closing():
            self.gone = True
            self.task.cancel()
            return
        self._handle = self._loop.call_later(WATCH_INTERVAL, self._check)

    def close(self) -> None:
        self._handle.cancel()


async def _read_json(request: web.Request):
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].limits.max_frame_bytes
        raise ChatError("too_large", f"The request body is larger than {limit} bytes "
                        "([limits] max_frame_bytes).", 413) from None
    try:
        return clientjson.loads(raw)
    except clientjson.NotJSON:
        raise ChatError("bad_request", "The request body is not valid JSON.") from None
    except clientjson.RefusedJSON as exc:
        raise ChatError("bad_request", f"The request body is refused: {exc}.") from None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    owner, client = identity(request)
    try:
        call = parse_chat(await _read_json(request), settings.limits.max_tokens_cap)
    except ChatError as exc:
        return response(from_chat_error(exc))
    watch = Watch(request)
    started: list[web.StreamResponse] = []
    try:
        async with request.app[GATEWAY].turn(owner, client, call.model, call.messages, call.params, call.extra,
                                             door="v1", who=who(request),
                                             cache=cache_directives(request.headers.get("Cache-Control"))) as turn:
            request[CACHE_STATUS] = turn.cache_status  # the x-nexlm-cache header (server.py adds it)
            if call.stream:
                return await _stream(request, turn, call.include_usage, started)
            return await _complete(turn)
    except ChatError as exc:
        return response(from_chat_error(exc))
    except asyncio.CancelledError:
        if watch.gone and asyncio.current_task().uncancel() == 0:
            return started[0] if started else web.Response(status=499)  # nobody is there to read it
        raise
    except Exception:  # a bug, not a client's or an upstream's failure: still OpenAI's shape
        log.exception("/v1/chat/completions failed")
        if started:
            raise
        return response(failure(500, INTERNAL, "internal_error"))
    finally:
        watch.close()


async def first_event(turn):
    """(the turn's event iterator, its first real event or None): what decides the HTTP status.
    ``Queued`` notices (waiting for a single-slot model) are not a token yet."""
    events = aiter(turn)
    async for ev in events:
        if type(ev) is not Queued:
            return events, ev
    return events, None


async def ended_by_shutdown(request: web.Request, resp: web.StreamResponse, transport, last: bytes) -> bool:
    """Inside ``except CancelledError``: if shutdown ended the turn after its grace (and the client
    is still there), end the stream with ``last`` rather than cut it, and say it was handled."""
    if not request.app[GATEWAY].closing or transport is None or transport.is_closing():
        return False
    asyncio.current_task().uncancel()
    try:
        async with asyncio.timeout(CLOSE_DEADLINE):
            await resp.write(last)
            await resp.write_eof()
    except (ConnectionError, TimeoutError):
        pass
    return True


async def _stream(request: web.Request, turn, include_usage: bool, started: list) -> web.StreamResponse:
    events, first = await first_event(turn)
    if type(first) is StreamError:
        return response(from_stream_error(first))
    enc = ChunkStream(turn.model)  # after the first event: a fallback may have changed the model
    resp = web.StreamResponse(headers=SSE_HEADERS)
    started.append(resp)
    streams = request.app[STREAMS]
    transport = request.transport
    streams.add(transport)
    try:
        await resp.prepare(request)
        head = enc.role()
        if first is not None:
            head += enc.event(first) or b""
        await resp.write(head)
        failed = None
        try:
            async for ev in events:
                data = enc.event(ev)
                if data is not None:
                    await resp.write(data)
                elif type(ev) is StreamError:
                    failed = from_stream_error(ev)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("/v1/chat/completions failed mid-stream")
            failed = failure(500, INTERNAL, "internal_error")
        if failed is not None:
            await resp.write(error_chunk(failed.error))
        else:
            tail = enc.finish(turn.finish or "stop")
            if include_usage:
                tail += enc.usage(turn.usage)
            await resp.write(tail + DONE)
        await resp.write_eof()
    except asyncio.CancelledError:
        if not await ended_by_shutdown(request, resp, transport,
                                       error_chunk(from_chat_error(ChatError("shutting_down", SHUTDOWN, 503)).error)):
            raise
    finally:
        streams.discard(transport)
    return resp


async def _complete(turn) -> web.Response:
    acc = Completion()
    async for ev in turn:
        if type(ev) is StreamError:
            return response(from_stream_error(ev))
        acc.add(ev)
    return web.Response(body=acc.body(turn.model, turn.finish, turn.usage), content_type="application/json")
