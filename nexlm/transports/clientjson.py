"""The one way JSON from a client is read: WebSocket frames, POST bodies, ``params=`` in a query.

The stdlib parser, because clients do send lone surrogate escapes (``"\\ud800"``), which
orjson refuses and ``chat.clean_text`` repairs. NaN and Infinity are not JSON. Nesting is
bounded: no command needs more than a few levels (a restored turn's ``usage`` is the
deepest), and a 10,000-deep array used to end in a ``RecursionError``: HTTP 500 with a
traceback, or a WebSocket dropped without a close frame.
"""

from __future__ import annotations

import json

MAX_DEPTH = 32


class NotJSON(ValueError):
    """The text is not JSON at all (on ``/ws`` such text can be a plain chat message)."""


class RefusedJSON(ValueError):
    """JSON we do not read: nested too deeply, or a number too long to convert."""


def _no_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


_decode = json.JSONDecoder(parse_constant=_no_constant).decode


def loads(data: str | bytes):
    """``data`` as a JSON value, or ``NotJSON`` / ``RefusedJSON`` (both ``ValueError``)."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise NotJSON("not UTF-8") from None
    try:
        value = _decode(data)
    except json.JSONDecodeError:
        raise NotJSON("not valid JSON") from None
    except RecursionError:
        raise RefusedJSON(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # int() of more than sys.get_int_max_str_digits() digits
        raise RefusedJSON("a number is too long") from None
    if not _within(value, MAX_DEPTH):
        raise RefusedJSON(f"nested deeper than {MAX_DEPTH} levels")
    return value


def _within(value, limit: int) -> bool:
    """True if no array or object in ``value`` is nested more than ``limit`` deep (iteratively)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > limit:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True
