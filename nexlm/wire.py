"""NexLM's own wire form of a reply's events: the JSON objects docs/protocol.md lists.

/ws sends each as one text frame, /sse as ``event:``/``data:``/``id:`` lines
(``events.encode`` and ``events.sse_frame``). Other front doors encode the same
turn events (``engine``) in their own formats.
"""

from __future__ import annotations

from .events import error_event


def start(reply: str, model: str) -> dict:
    return {"type": "start", "reply": reply, "model": model}


def delta(reply: str, text: str) -> dict:
    return {"type": "delta", "reply": reply, "content": text}


def reasoning(reply: str, text: str) -> dict:
    return {"type": "reasoning", "reply": reply, "content": text}


def status(reply: str, state: str, position: int) -> dict:
    return {"type": "status", "reply": reply, "state": state, "position": position}


def done(reply: str, finish: str, usage: dict | None, model: str, timing: dict, fallback: dict | None,
         cached: bool = False) -> dict:
    ev = {"type": "done", "reply": reply, "finish_reason": finish, "usage": usage, "model": model, "timing": timing}
    if fallback:
        ev["fallback"] = fallback
    if cached:
        ev["cached"] = True  # replayed from the response cache: no upstream call
    return ev


def error(code: str, message: str, reply: str | None = None) -> dict:
    return error_event(code, message, reply)


def session(conv, running=None) -> dict:
    """The ``session`` frame: everything a client needs to draw the conversation."""
    frame = {
        "type": "session",
        "session": conv.id,
        "model": conv.model,
        "params": dict(conv.params),
        # A stored turn still ``streaming`` is the running reply: its events show it, not the history.
        "history": [t for t in conv.history if t.get("finish_reason") != "streaming"],
        "seq": conv.seq,
    }
    if running is not None:
        frame["running"] = {"reply": running.id, "model": running.model}
    return frame
