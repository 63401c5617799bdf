"""``GET /ws``: the two-way transport. One reader loop turns frames into chat commands;
one writer task drains the connection's outbox, so a reply never waits for this client.

``serve`` is the loop for any dialect of it: NexLM's JSON frames here, the seed's plain
text frames in ``seed_ws`` (another ``encode`` and ``parse``, and an ``admit`` step that
reads the token frame before anything is done for the client).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from ..appkeys import CONVERSATIONS, SETTINGS, STREAMS, WEBSOCKETS
from ..clients import Who, identity, who
from ..conversations import Conversations
from ..events import Outbox, encode, error_event
from ..validation import ChatError
from . import clientjson
from .common import CLOSE_DEADLINE, cut, parse_after

log = logging.getLogger(__name__)

MAX_QUEUED = 256  # events waiting for one client before its commands are no longer read


Encode = Callable[[dict], "bytes | None"]  # an event as a text frame's bytes; None: not sent
Parse = Callable[[str], dict]  # a text frame as a command (raises ChatError)
# After the upgrade, before any session: the text of a first frame to run as a command once the
# client is admitted, or None when it was refused (and the socket closed).
Admit = Callable[[web.WebSocketResponse], Awaitable["str | None"]]


async def websocket(request: web.Request) -> web.WebSocketResponse:
    return await serve(request, encode, _parse)


async def serve(request: web.Request, encoder: Encode, parse: Parse,
                admit: Admit | None = None, ephemeral: bool = False) -> web.WebSocketResponse:
    """The connection's loop. ``ephemeral``: its client never learns the session's id (no
    ``session`` frame), so nobody can come back to it: a session it made ends with it."""
    chat: Conversations = request.app[CONVERSATIONS]
    settings = request.app[SETTINGS]
    try:
        after = parse_after(request.query.get("after"))
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps(error_event("bad_request", str(exc))),
                                 content_type="application/json") from None
    ws = web.WebSocketResponse(
        compress=False,  # token frames are tiny: deflate costs more CPU than it saves bytes
        max_msg_size=settings.limits.max_frame_bytes,
        heartbeat=settings.server.heartbeat_seconds or None,
    )
    await ws.prepare(request)
    transport = request.transport
    first = None
    if admit is not None:
        first = await admit(ws)
        if first is None:
            return ws
    owner, client = identity(request)
    person = who(request)  # (after a late admission: its token decides)
    try:
        session, existed = await chat.open(request.query.get("session"), owner, client)
    except ChatError as exc:  # no session to be had (rate, cap): say why, then close
        if not await send_now(ws, encoder(error_event(exc.code, exc.message))):
            return ws
        await close(ws, transport, WSCloseCode.TRY_AGAIN_LATER, f"{exc.code}: try again later")
        return ws
    timers: list[asyncio.TimerHandle] = []  # set when the outbox overflows: the writer may be stuck in a send

    def overflowed() -> None:
        log.info("ws %s..: the client is too far behind; closing", session.id[:6])
        timers.append(asyncio.get_running_loop().call_later(CLOSE_DEADLINE, cut, transport))

    outbox = Outbox(overflowed)
    outbox.put(chat.frame(session))
    chat.attach(session, outbox, after if existed else None)
    outbox.bound(settings.limits.max_queued_bytes)
    request.app[WEBSOCKETS].add(ws)
    request.app[STREAMS].add(transport)
    writer = asyncio.create_task(_write(ws, outbox, transport, chat, encoder), name=f"ws writer {session.id[:6]}")
    try:
        if first is not None:
            await _command(chat, session, outbox, first, parse, person)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await _command(chat, session, outbox, msg.data, parse, person)
                # Answers pile up when the client sends without reading: stop reading it until
                # it catches up, so its own TCP window slows it down (replies' deltas merge anyway).
                if len(outbox) >= MAX_QUEUED:
                    await outbox.drained(MAX_QUEUED)
            elif msg.type == WSMsgType.BINARY:
                await close(ws, transport, WSCloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                break
            # CLOSE / ERROR end the loop by themselves (aiohttp closes with 1009 on an oversized frame)
    finally:
        request.app[WEBSOCKETS].discard(ws)
        # Ephemeral: its reply stops now (closing the upstream request), not after the resume grace.
        chat.detach(session, outbox, 0 if ephemeral else None)
        outbox.close()
        try:
            # The writer ends by itself: it flushes what is left and closes, under the write deadline.
            await asyncio.wait([writer], timeout=CLOSE_DEADLINE + 0.5)
        finally:
            # Also when this handler is cancelled meanwhile (its client's connection is gone, and
            # aiohttp cancels the handler): the rest must still be let go of, or STREAMS keeps it.
            if not writer.done():
                writer.cancel()
                await asyncio.wait([writer])
            for timer in timers:
                timer.cancel()
            request.app[STREAMS].discard(transport)
            if ephemeral and not existed:
                await chat.delete(session)
    return ws


async def send_now(ws: web.WebSocketResponse, data: bytes | None) -> bool:
    """One frame outside the writer (before it runs); False if the connection is gone."""
    if data is None:
        return True
    try:
        await ws.send_frame(data, WSMsgType.TEXT)
    except ConnectionError:
        return False
    return True


async def _write(ws: web.WebSocketResponse, outbox: Outbox, transport, chat: Conversations,
                 encoder: Encode = encode) -> None:
    seq = 0  # the last seq handed to the transport
    try:
        while batch := await outbox.get():
            for event in batch:
                data = encoder(event)
                if data is not None:
                    await ws.send_frame(data, WSMsgType.TEXT)
                seq = event.get("seq", seq)
    except ConnectionError:  # reset, or lost while draining
        return  # the reader loop sees the close and cleans up
    if outbox.overflowed:  # dropped: the client resumes from what it has
        await close(ws, transport, WSCloseCode.TRY_AGAIN_LATER, f"too far behind; reconnect with after={seq}")
    else:  # closed under us (session evicted, server stopping): let the client reconnect
        await close(ws, transport, WSCloseCode.GOING_AWAY, "server shutting down" if chat.closing else "session closed")


async def close(ws: web.WebSocketResponse, transport, code: int, reason: str) -> None:
    """Send a close frame and wait for the answer, for at most ``CLOSE_DEADLINE``; then cut the
    connection (a peer that does not read would otherwise hold it, and its buffers, forever)."""
    try:
        async with asyncio.timeout(CLOSE_DEADLINE):
            await ws.close(code=code, message=reason.encode()[:123])
    except TimeoutError:
        cut(transport)


def _parse(data: str) -> dict:
    """A frame as a command. Text that is not JSON is a chat message; JSON must be a command object."""
    try:
        frame = clientjson.loads(data)
    except clientjson.NotJSON:
        if data.lstrip().startswith("{"):
            raise ChatError("bad_request", "The frame starts with '{' but is not valid JSON.") from None
        return {"type": "chat", "message": data}
    except clientjson.RefusedJSON as exc:
        raise ChatError("bad_request", f"The frame's JSON is refused: {exc}.") from None
    if not isinstance(frame, dict):
        raise ChatError("bad_request", "A JSON frame must be a command object; text that is not JSON is a chat message.")
    if "type" not in frame:
        if "message" in frame:  # the seed's frame: {"modelType": "deepseek", "message": "..."}
            return {"type": "chat", "message": frame["message"], "model": frame.get("modelType", frame.get("model"))}
        raise ChatError("bad_request", "A command needs a \"type\".")
    return frame


async def _command(chat: Conversations, session, outbox: Outbox, data: str, parse: Parse = _parse,
                   person: Who | None = None) -> None:
    """Run one command (for ``person``: quotas and usage); refusals become an error frame and the socket stays open."""
    try:
        frame = parse(data)
        kind = frame.get("type")
        if kind == "chat":
            await chat.send(session, frame.get("message"), frame.get("model"), frame.get("params"), door="ws",
                            who=person)
        elif kind == "stop":
            await chat.stop(session)
        elif kind == "set":
            chat.configure(session, frame.get("model"), frame.get("params"))
            chat.broadcast_frame(session)
        elif kind == "reset":
            await chat.reset(session)
            chat.broadcast_frame(session)
        elif kind == "regenerate":
            await chat.regenerate(session, frame.get("model"), frame.get("params"), door="ws", who=person)
        elif kind == "edit":
            await chat.edit(session, frame.get("index"), frame.get("message"), frame.get("model"),
                            frame.get("params"), door="ws", who=person)
        elif kind == "restore":
            chat.restore(session, frame.get("history"))
            outbox.put(chat.frame(session))
        elif kind == "ping":
            outbox.put({"type": "pong"})
        else:
            raise ChatError("bad_request", f"Unknown command type {str(kind)[:40]!r}.")
    except ChatError as exc:
        outbox.put(error_event(exc.code, exc.message))
