"""``GET /ws``: the two-way transport. One reader loop turns frames into chat commands;
one writer task drains the connection's outbox, so a reply never waits for this client.
"""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from ..appkeys import CONVERSATIONS, SETTINGS, STREAMS, WEBSOCKETS
from ..clients import identity
from ..conversations import Conversations
from ..events import Outbox, encode, error_event
from ..validation import ChatError
from . import clientjson
from .common import CLOSE_DEADLINE, cut, parse_after

log = logging.getLogger(__name__)

MAX_QUEUED = 256  # events waiting for one client before its commands are no longer read


async def websocket(request: web.Request) -> web.WebSocketResponse:
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
    owner, client = identity(request)
    try:
        session, existed = await chat.open(request.query.get("session"), owner, client)
    except ChatError as exc:  # no session to be had (rate, cap): say why, then close
        try:
            await ws.send_frame(encode(error_event(exc.code, exc.message)), WSMsgType.TEXT)
        except ConnectionError:
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
    writer = asyncio.create_task(_write(ws, outbox, transport, chat), name=f"ws writer {session.id[:6]}")
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await _command(chat, session, outbox, msg.data)
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
        chat.detach(session, outbox)
        outbox.close()
        # The writer ends by itself: it flushes what is left and closes, under the write deadline.
        done, _ = await asyncio.wait([writer], timeout=CLOSE_DEADLINE + 0.5)
        if not done:
            writer.cancel()
            await asyncio.wait([writer])
        for timer in timers:
            timer.cancel()
        request.app[STREAMS].discard(transport)
    return ws


async def _write(ws: web.WebSocketResponse, outbox: Outbox, transport, chat: Conversations) -> None:
    seq = 0  # the last seq handed to the transport
    try:
        while batch := await outbox.get():
            for event in batch:
                await ws.send_frame(encode(event), WSMsgType.TEXT)
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


async def _command(chat: Conversations, session, outbox: Outbox, data: str) -> None:
    """Run one command; refusals become an error frame and the socket stays open."""
    try:
        frame = _parse(data)
        kind = frame.get("type")
        if kind == "chat":
            chat.send(session, frame.get("message"), frame.get("model"), frame.get("params"), door="ws")
        elif kind == "stop":
            await chat.stop(session)
        elif kind == "set":
            chat.configure(session, frame.get("model"), frame.get("params"))
            chat.broadcast_frame(session)
        elif kind == "reset":
            await chat.reset(session)
            chat.broadcast_frame(session)
        elif kind == "regenerate":
            chat.regenerate(session, frame.get("model"), frame.get("params"), door="ws")
        elif kind == "edit":
            chat.edit(session, frame.get("index"), frame.get("message"), frame.get("model"), frame.get("params"),
                      door="ws")
        elif kind == "restore":
            chat.restore(session, frame.get("history"))
            outbox.put(chat.frame(session))
        elif kind == "ping":
            outbox.put({"type": "pong"})
        else:
            raise ChatError("bad_request", f"Unknown command type {str(kind)[:40]!r}.")
    except ChatError as exc:
        outbox.put(error_event(exc.code, exc.message))
