"""What the transports share beyond the facade: resume positions."""

from __future__ import annotations


def parse_after(value: str | None) -> int | None:
    """A resume position (``after`` or ``Last-Event-ID``): a non-negative integer."""
    if value is None or value == "":
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 18:
        raise ValueError(f"not a valid event id: {value[:20]!r}")
    return int(value)
