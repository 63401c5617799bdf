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
    """Feed bytes, get the events they complete. Comments are counted, not returned."""

    __slots__ = ("_buf", "_data", "_event", "_id", "_skip_lf", "comments")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._skip_lf = False  # the last read ended in CR: an LF starting the next one belongs to it
        self.comments = 0  # ": keep-alive" lines seen: activity, not progress

    def feed(self, chunk: bytes) -> list[SSEEvent]:
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
        out: list[SSEEvent] = []
        for raw in lines:
            self._line(raw, out)
        return out

    def _line(self, raw: bytes, out: list[SSEEvent]) -> None:
        if not raw:
            if self._data:
                out.append(SSEEvent("\n".join(self._data), self._event or "message", self._id))
            self._data = []
            self._event = ""
            return
        if raw[0] == 0x3A:  # ":" comment
            self.comments += 1
            return
        line = raw.decode("utf-8", errors="replace")
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        # "retry" and unknown fields are ignored, as the spec says.

    @property
    def pending(self) -> bool:
        """True when the stream stopped in the middle of an event or a line."""
        return bool(self._buf) or bool(self._data)
