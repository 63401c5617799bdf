"""An incremental Server-Sent Events decoder (WHATWG "event stream" parsing).

Kept apart from the HTTP client so it can be tested byte by byte: a chunk may end
anywhere, inside a line, inside a CRLF pair or inside a multi-byte UTF-8
character. Only complete lines are decoded, and a line always ends on an ASCII
byte, so a character split across reads is reassembled before it is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Feed bytes, get the events they complete. Comments are counted, not returned.

    ``feed`` gives full ``SSEEvent``s. ``feed_data`` is the hot path for the
    provider client: only the ``data`` payloads, as undecoded bytes, ready for a
    JSON parser that reads UTF-8 itself.
    """

    __slots__ = ("_buf", "_data", "_event", "_id", "_skip_lf", "comments")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._event = ""
        self._id: str | None = None
        self._skip_lf = False  # the last read ended in CR: an LF starting the next one belongs to it
        self.comments = 0  # ": keep-alive" lines seen: activity, not progress

    def _lines(self, chunk: bytes) -> list[bytes]:
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            # CR, LF and CRLF all end a line. A CR ends its line at once (an event
            # ended by CR CR is complete even if no byte ever follows).
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        return lines

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        for raw in self._lines(chunk):
            data = self._line(raw)
            if data is not None:
                out.append(SSEEvent(data.decode("utf-8", errors="replace"), self._event or "message", self._id))
                self._event = ""
        return out

    def feed_data(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        for raw in self._lines(chunk):
            if raw[:6] == b"data: " and not self._data:
                self._data.append(raw[6:])  # the common case, without the general parse
                continue
            data = self._line(raw)
            if data is not None:
                out.append(data)
                self._event = ""
        return out

    def _line(self, raw: bytes) -> bytes | None:
        """Apply one line; return the data of the event it completes, if any."""
        if not raw:
            if self._data:
                data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                self._data = []
                return data
            self._event = ""
            return None
        if raw[0] == 0x3A:  # ":" comment
            self.comments += 1
            return None
        name, sep, value = raw.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", errors="replace")
        elif name == b"id":
            if b"\0" not in value:
                self._id = value.decode("utf-8", errors="replace")
        # "retry" and unknown fields are ignored, as the spec says.
        return None

    @property
    def pending(self) -> bool:
        """True when the stream stopped in the middle of an event or a line."""
        return bool(self._buf) or bool(self._data)
