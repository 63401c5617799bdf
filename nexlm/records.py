"""The durable part of a conversation: a small record that any store can keep.

Who owns it, the model and parameters chosen for it, its history with each
turn's status, and the last reply-event number handed out (so resume positions
keep rising). Nothing live: no task, no connection, no timer. The in-memory
store keeps records serialized (``dumps``), which is also what SQLite or Redis
would hold: ten thousand idle conversations are ten thousand byte strings the
garbage collector never has to walk.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import orjson


def new_id() -> str:
    return secrets.token_urlsafe(18)


@dataclass(slots=True)
class Conversation:
    owner: str | None  # the auth principal that made it; None when auth is off
    client: str  # who is counted for per-client limits
    model: str
    params: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    id: str = field(default_factory=new_id)
    seq: int = 0  # last reply-event seq handed out
    created: float = field(default_factory=time.time)
    updated: float = 0.0
    title: str = ""

    def dumps(self) -> bytes:
        try:
            return orjson.dumps(_fields(self))
        except TypeError:  # a lone surrogate slipped through: stdlib JSON escapes it
            import json

            return json.dumps(_fields(self)).encode()

    def refresh(self, newer: "Conversation") -> None:
        """Take ``newer``'s state in place (another instance changed the stored record), so code
        holding this object or its history list sees it too."""
        self.history[:] = newer.history
        for name in ("owner", "client", "model", "params", "seq", "created", "updated", "title"):
            setattr(self, name, getattr(newer, name))

    @classmethod
    def loads(cls, data: bytes) -> "Conversation":
        try:
            return cls(**orjson.loads(data))
        except orjson.JSONDecodeError:  # written by the stdlib fallback above
            import json

            return cls(**json.loads(data))


def _fields(c: Conversation) -> dict:
    return {"owner": c.owner, "client": c.client, "model": c.model, "params": c.params, "history": c.history,
            "id": c.id, "seq": c.seq, "created": c.created, "updated": c.updated, "title": c.title}
