"""Reading one chunk of an OpenAI-compatible stream: its JSON, text whose surrogate pairs an
upstream split across chunks, and ``delta.tool_calls`` fragments."""

from __future__ import annotations

import json
import re

import orjson

from .base import ToolCallDelta


def _add_calls(out: list[ToolCallDelta], calls: list) -> None:
    """``delta.tool_calls`` fragments onto ``out``; an argument piece of the call just before it
    is appended to that fragment (one event per call per read, not one per upstream chunk)."""
    for c in calls:
        if not isinstance(c, dict):
            continue
        index = c.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            index = out[-1].index if out else 0
        fn = c.get("function") if isinstance(c.get("function"), dict) else {}
        cid = c.get("id") if isinstance(c.get("id"), str) and c.get("id") else None
        name = fn.get("name") if isinstance(fn.get("name"), str) and fn.get("name") else None
        args = fn.get("arguments") if isinstance(fn.get("arguments"), str) else ""
        if _SURROGATE.search(args):  # a lone surrogate escape cannot go out as UTF-8
            args = args.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if out and cid is None and name is None and out[-1].index == index:
            last = out[-1]
            out[-1] = ToolCallDelta(index, last.id, last.name, last.arguments + args)
        elif cid is not None or name is not None or args:
            out.append(ToolCallDelta(index, cid, name, args))


_SURROGATE = re.compile("[\ud800-\udfff]")


class SurrogateJoiner:
    """Rejoin a UTF-16 surrogate pair that an upstream split across two chunks.

    JSON escapes like ``"\\ud83d"`` + ``"\\ude00"`` in consecutive chunks decode to
    two lone surrogates; joined they are one emoji. A high surrogate at the end of
    a delta waits for the next; anything still unpaired becomes U+FFFD, because a
    lone surrogate cannot be encoded as UTF-8 for the client.
    """

    __slots__ = ("carry",)

    def __init__(self) -> None:
        self.carry = ""

    def __call__(self, text: str) -> str:
        if self.carry:
            text, self.carry = self.carry + text, ""
        if not _SURROGATE.search(text):
            return text
        if "\ud800" <= text[-1] <= "\udbff":
            text, self.carry = text[:-1], text[-1]
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _no_constant(name: str) -> None:
    return None  # NaN / Infinity from an upstream: a missing number, not invalid JSON to relay


_strict_fallback = json.JSONDecoder(parse_constant=_no_constant).decode


def _loads(data: bytes):
    """A chunk's JSON, or ``None`` if it is not JSON.

    orjson is the fast path (a third of the relay's CPU went to json.loads).
    It refuses NaN and lone surrogate escapes, which the stdlib then reads
    (NaN as null; a surrogate pair split across chunks is rejoined later).
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return _strict_fallback(data.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):  # orjson stops at 1024 levels, the stdlib at the stack's limit
        return None
