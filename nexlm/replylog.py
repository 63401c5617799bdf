"""One structured log line per finished reply, and the JSON log format.

The line says how a reply went, never what it said: front door, session id prefix
(none for stateless doors), model, time to first token, tokens in and out, finish
reason, duration. ``[server] log_format = "text"`` writes it as ``key=value`` pairs;
``"json"`` makes every log line one JSON object (``JsonFormatter``), the reply's
fields at its top level.
"""

from __future__ import annotations

import json
import logging
import time

from .engine import Turn
from .logsafe import SHORT_ID

log = logging.getLogger("nexlm.replies")
# Characters of a session id in the line: as in every other log line (logsafe.short_id), enough
# to follow a session through the log, too few to use it (when auth is off the id is the key).
SESSION_PREFIX = SHORT_ID
FIELDS = ("door", "session", "model", "ttft_ms", "tokens_in", "tokens_out", "finish_reason", "duration_ms")


def fields(turn: Turn, session: str | None, tokens_in: int | None, tokens_out: int | None) -> dict:
    ended = turn.ended if turn.ended is not None else time.monotonic()
    return {
        "door": turn.door,
        "session": session[:SESSION_PREFIX] if session else None,
        "model": turn.model,
        "ttft_ms": None if turn.first_token is None else round((turn.first_token - turn.started) * 1000, 1),
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "finish_reason": turn.finish,
        "duration_ms": round((ended - turn.started) * 1000, 1),
    }


def key_values(values: dict) -> str:
    """``door=ws session=AbCdEfGh ...``; a missing value is ``-``. (Values never hold spaces:
    they are bounded names, ids and numbers.)"""
    return " ".join(f"{k}={'-' if v is None else v}" for k, v in values.items())


def reply(turn: Turn, session: str | None, tokens_in: int | None, tokens_out: int | None) -> None:
    if log.isEnabledFor(logging.INFO):
        values = fields(turn, session, tokens_in, tokens_out)
        log.info("reply %s", key_values(values), extra={"fields": values})


class JsonFormatter(logging.Formatter):
    """``[server] log_format = "json"``: ``{"time", "level", "logger", "message", ...}`` per record;
    a reply line's fields at the top level, its message just ``"reply"``."""

    def format(self, record: logging.LogRecord) -> str:
        values = getattr(record, "fields", None)
        obj = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": "reply" if isinstance(values, dict) else record.getMessage(),
        }
        if isinstance(values, dict):
            obj.update(values)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=True)
