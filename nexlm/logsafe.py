"""Making text from outside (a request's path, an upstream's error body) safe to log.

One log record must stay one line that says only what we wrote: control characters
(a ``%0a`` in a path would start a forged line, ESC sequences would drive the terminal
reading the log), Unicode line separators, bidi overrides and lone surrogates are
escaped. A session id is the only secret a session has when auth is off: logs carry
its first characters only.
"""

from __future__ import annotations

import logging
import re

from aiohttp.http_exceptions import HttpProcessingError

SHORT_ID = 6
MAX_PATH = 200

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_SESSION_IN_PATH = re.compile(r"(/api/sessions/)([^/]+)")


def _escape(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text: str, limit: int | None = None) -> str:
    """``text`` on one line, control characters escaped, cut to ``limit`` characters (then ``…``)."""
    text = _UNSAFE.sub(_escape, str(text))
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return text


def short_id(sid: str) -> str:
    """A session id as logged: its first characters, enough to follow one session through a log."""
    return sid if len(sid) <= SHORT_ID else sid[:SHORT_ID] + "…"


def loggable_path(path: str) -> str:
    """A request path as logged: session ids shortened, escaped, cut. (Never the query string.)"""
    path = _SESSION_IN_PATH.sub(lambda m: m.group(1) + short_id(m.group(2)), path)
    return printable(path, MAX_PATH)


class OneLine(logging.Filter):
    """For a log handler: every record's message on one line, whoever logged it (aiohttp too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = printable(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


class BadRequestSummary(logging.Filter):
    """For ``aiohttp.server``: a request the HTTP parser refused is one line without its text.

    aiohttp logs such a request ("Error handling request from ...") with a traceback whose
    message quotes the request line, query and all (e.g. ``LineTooLong``: its first 100 bytes).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "Refused a malformed request from %s: %s (HTTP %s)"
            record.args = (printable(remote, 64), type(exc).__name__, exc.code)
            record.exc_info = record.exc_text = None
            record.stack_info = None
        return True
