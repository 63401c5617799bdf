"""What the transports share beyond the facade: resume positions, cutting a connection."""

from __future__ import annotations

CLOSE_DEADLINE = 1.0  # seconds the end of a stream (a close frame) may take to go out before the connection is cut


def cut(transport) -> None:
    """Drop a connection at once, buffers and all (``close`` would wait for a peer that never reads)."""
    if transport is not None:
        transport.abort()


def parse_after(value: str | None) -> int | None:
    """A resume position (``after`` or ``Last-Event-ID``): a non-negative integer."""
    if value is None or value == "":
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 18:
        raise ValueError(f"not a valid event id: {value[:20]!r}")
    return int(value)
