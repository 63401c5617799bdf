"""``/api/ai/chat/websocket``: with ``[compat] seed_frames`` the seed article's page, unchanged.

The same loop as ``/ws`` (``ws.serve``) in the seed's dialect: ``{"modelType", "message",
"token"}`` frames in, plain text frames out (``seed_wire.Frames``). Without the setting the
route is ``/ws`` itself.

With access control on, the seed's page sends its token in every frame, not on the upgrade.
The guard then lets the upgrade through with ``LATE_AUTH`` instead of a principal, and
nothing happens for the client (no session, no model, no limit taken) until its first
frame's token is checked, throttled like any other guess; a refused or missing token is an
error frame and a close (1008), so every guess costs a new connection. The first frame
must come within ``[server] header_timeout_seconds`` (it is this route's credentials).
"""

from __future__ import annotations

import hmac

from aiohttp import WSCloseCode, WSMsgType, web

from .. import seed_wire
from ..appkeys import LATE_AUTH, SETTINGS, STREAMS
from ..events import error_event
from ..validation import ChatError
from . import clientjson, ws

FIRST_FRAME_SECONDS = 10.0  # when [server] header_timeout_seconds is 0: still not forever


async def websocket(request: web.Request) -> web.WebSocketResponse:
    if not request.app[SETTINGS].compat.seed_frames:
        return await ws.websocket(request)
    conn = SeedConnection(request)
    # Ephemeral: the seed's page never learns its session's id, so it cannot resume; a reply
    # whose page left is stopped at once and the session does not linger for its TTL.
    return await ws.serve(request, conn.frames.encode, conn.parse,
                          conn.admit if conn.late is not None else None, ephemeral=True)


def _read(data: str):
    """A frame's JSON, or the text itself when it is not JSON (a chat message, as on /ws)."""
    try:
        return clientjson.loads(data)
    except clientjson.NotJSON:
        if data.lstrip().startswith("{"):
            raise ChatError("bad_request", "The frame starts with '{' but is not valid JSON.") from None
        return data
    except clientjson.RefusedJSON as exc:
        raise ChatError("bad_request", f"The frame's JSON is refused: {exc}.") from None


class SeedConnection:
    """One seed client: its encoder, and the token its connection was admitted with."""

    __slots__ = ("frames", "late", "request", "token")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.frames = seed_wire.Frames()
        self.late = request.get(LATE_AUTH)  # set when the token comes in the frames
        self.token: bytes | None = None

    def parse(self, data: str) -> dict:
        frame = _read(data)
        if self.token is not None:
            token = frame.get("token") if isinstance(frame, dict) else None
            # One connection, one identity: another token is not quietly ignored (nor checked
            # here: that would make frames a way to guess around the throttle).
            if isinstance(token, str) and not hmac.compare_digest(token.strip().encode(), self.token):
                raise ChatError("bad_request", "This connection signed in with another token; "
                                               "reconnect to use a new one.")
        return seed_wire.command(frame)

    async def admit(self, sock: web.WebSocketResponse) -> str | None:
        """Wait for the first frame and check its token; the frame's text if it is good."""
        transport = self.request.transport
        settings = self.request.app[SETTINGS]
        streams = self.request.app[STREAMS]
        streams.add(transport)  # cut at shutdown like any open stream
        try:
            try:
                msg = await sock.receive(timeout=settings.server.header_timeout_seconds or FIRST_FRAME_SECONDS)
            except TimeoutError:
                await self._refuse(sock, ChatError("unauthorized", "No token frame came in time."))
                return None
            if msg.type == WSMsgType.BINARY:
                await ws.close(sock, transport, WSCloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                return None
            if msg.type != WSMsgType.TEXT:
                return None  # closed, or an error aiohttp has answered already
            try:
                frame = _read(msg.data)
                token = frame.get("token") if isinstance(frame, dict) else None
                await self.late(token)
            except ChatError as exc:
                await self._refuse(sock, exc)
                return None
            self.token = token.strip().encode()
            return msg.data
        finally:
            streams.discard(transport)

    async def _refuse(self, sock: web.WebSocketResponse, exc: ChatError) -> None:
        if await ws.send_now(sock, self.frames.encode(error_event(exc.code, exc.message))):
            code = WSCloseCode.TRY_AGAIN_LATER if exc.status == 429 else WSCloseCode.POLICY_VIOLATION
            await ws.close(sock, self.request.transport, code, exc.code)
