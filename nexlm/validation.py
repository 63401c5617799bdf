"""What a client may send, checked once: messages, parameters, a restored history.

Pure functions of the limits: every front door (/ws, /sse, the HTTP API, later
/v1) refuses the same things with the same ``ChatError`` codes and messages.
"""

from __future__ import annotations

import math
import re
import unicodedata

from .config import LimitsConfig

PARAM_KEYS = ("temperature", "top_p", "max_tokens", "system", "cache")
FINISH_REASONS = ("stop", "length", "stopped", "error", "interrupted")
_SURROGATES = re.compile("[\ud800-\udfff]")


class ChatError(Exception):
    """A refused request: ``code`` is the protocol's error code, ``message`` is for people."""

    def __init__(self, code: str, message: str, status: int = 400, retry_after: float | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after  # seconds; a Retry-After header on HTTP
        self.param = param  # the request field at fault ("messages[2].role"), for OpenAI's error envelope


def clean_text(value: str) -> str:
    """Text safe to store and send upstream: no NULs, no lone surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    if _SURROGATES.search(value):
        value = _SURROGATES.sub("\ufffd", value)
    return value


def check_message(limits: LimitsConfig, message) -> str:
    if not isinstance(message, str):
        raise ChatError("bad_request", "message must be a string")
    message = clean_text(message)
    if not message.strip():
        raise ChatError("bad_request", "message is empty")
    limit = limits.max_message_chars
    if len(message) > limit:
        raise ChatError("bad_request", f"message is too long ({len(message)} characters, the limit is {limit})", 413)
    return message


MAX_TITLE_CHARS = 200


def check_title(title) -> str:
    """A conversation's name (``PATCH /api/sessions/{id}``): a string, trimmed, at most 200
    characters, no control characters (a title is one line in a list); "" clears the name."""
    if not isinstance(title, str):
        raise ChatError("bad_request", "title must be a string")
    title = clean_text(title).strip()
    if len(title) > MAX_TITLE_CHARS:
        raise ChatError("bad_request", f"title is too long ({len(title)} characters, the limit is {MAX_TITLE_CHARS})")
    if any(unicodedata.category(ch) == "Cc" for ch in title):
        raise ChatError("bad_request", "title must not contain control characters (line breaks, tabs, ...)")
    return title


def check_params(limits: LimitsConfig, params) -> dict:
    """Validate client parameters; ``None`` for a key resets it to the default."""
    if not isinstance(params, dict):
        raise ChatError("bad_request", "params must be an object")
    out = {}
    for key, value in params.items():
        if key not in PARAM_KEYS:
            raise ChatError("bad_request", f"unknown parameter {str(key)[:40]!r} (allowed: {', '.join(PARAM_KEYS)})")
        if value is None:
            out[key] = None
            continue
        if key == "system":
            if not isinstance(value, str):
                raise ChatError("bad_request", "system must be a string")
            value = clean_text(value)
            if len(value) > limits.max_message_chars:
                raise ChatError("bad_request", "system prompt is too long")
        elif key == "cache":
            if not isinstance(value, bool):
                raise ChatError("bad_request", "cache must be true or false")
        elif key == "max_tokens":
            cap = limits.max_tokens_cap
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
                raise ChatError("bad_request", f"max_tokens must be an integer from 1 to {cap}")
        else:
            hi = 2.0 if key == "temperature" else 1.0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= hi:
                raise ChatError("bad_request", f"{key} must be a number from 0 to {hi:g}")
            value = float(value)
        out[key] = value
    return out


def check_history(limits: LimitsConfig, history) -> list[dict]:
    """A client's copy of a conversation (``restore``): alternating user/assistant turns."""
    if not isinstance(history, list):
        raise ChatError("bad_request", "history must be a list")
    out: list[dict] = []
    for i, turn in enumerate(history):
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant") \
                or not isinstance(turn.get("content"), str):
            raise ChatError("bad_request", f"history[{i}] must be {{\"role\": \"user\"|\"assistant\", \"content\": string}}")
        content = clean_text(turn["content"])
        if len(content) > limits.max_message_chars * 4:
            raise ChatError("bad_request", f"history[{i}] is too long", 413)
        want = "user" if not out or out[-1]["role"] == "assistant" else "assistant"
        if turn["role"] != want:
            raise ChatError("bad_request", f"history[{i}]: roles must alternate, starting with user")
        entry = {"role": turn["role"], "content": content}
        if turn["role"] == "assistant":
            fr = turn.get("finish_reason")
            entry["finish_reason"] = fr if fr in FINISH_REASONS else "stop"
            if isinstance(turn.get("model"), str):
                entry["model"] = clean_text(turn["model"][:200])
        out.append(entry)
    if out and out[-1]["role"] == "user":
        out.pop()  # a question without its answer cannot be continued: the client resends it
    cap = limits.max_history_messages
    if len(out) > cap:
        drop = len(out) - cap
        del out[:drop + drop % 2]  # whole turns: the history still starts with a question
    return out
