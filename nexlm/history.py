"""An owner's list of conversations (``GET /api/sessions``): the title rule, one entry, one page.

The list is read from the store (``list_owner``, newest ``updated`` first) with this
process's live records laid over it: a live record is newer than its stored copy
(it is written back at quiet moments, not per change), and only this process knows
whether a reply is running in it. The page is cut with a cursor, ``before`` = the
``updated`` of the last entry shown, so entries that change meanwhile move to the
top instead of shifting the pages below.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Iterable

from .records import Conversation
from .runner import Live
from .store import Store, listed_at
from .validation import check_title

TITLE_FROM_MESSAGE_CHARS = 80
DEFAULT_PAGE = 50
MAX_PAGE = 200

ListOwner = Callable[[str, int, float | None], Awaitable[list[Conversation]]]


def title_of(conv: Conversation) -> str:
    """The name given to it (``PATCH``), else its first user message (whitespace folded) cut to 80
    characters, else "". The one place the rule lives: the list and the page both use it."""
    if conv.title:
        return conv.title
    for turn in conv.history:
        if turn.get("role") == "user" and isinstance(turn.get("content"), str):
            return " ".join(turn["content"].split())[:TITLE_FROM_MESSAGE_CHARS]
    return ""


def entry(conv: Conversation, running: bool) -> dict:
    return {"session": conv.id, "title": title_of(conv), "model": conv.model, "created": conv.created,
            "updated": conv.updated or conv.created, "messages": len(conv.history), "running": running}


_key = listed_at


class History:
    """The facade's door to the list (``Conversations.history``): it reads the store and this
    process's live conversations and changes a title through the facade's commit."""

    def __init__(self, store: Store, live: dict[str, Live], commit: Callable[[Live], None]) -> None:
        self._store, self._live, self._commit = store, live, commit

    async def list_for(self, owner: str, limit: int = DEFAULT_PAGE,
                       before: float | None = None) -> tuple[list[dict], float | None]:
        """``owner``'s entries newest first, and the ``before`` of the next page (None: the last)."""
        mine = [live.conv for live in self._live.values() if live.conv.owner == owner]
        convs, cursor = await page(self._store.list_owner, mine, owner, limit, before)
        return [entry(c, self._running(c.id)) for c in convs], cursor

    def _running(self, cid: str) -> bool:
        live = self._live.get(cid)  # this process's knowledge (another instance's replies: not yet)
        return live is not None and live.reply is not None

    async def rename(self, live: Live, title) -> dict:
        """Name a conversation ("" gives it back its first message's title); its updated entry.
        Committed like a setting: a durable store writes it soon, the memory store when idle
        (the list reads live records first, so it shows at once either way)."""
        live.conv.title = check_title(title)
        self._commit(live)
        return entry(live.conv, live.reply is not None)


async def page(list_owner: ListOwner, live: Iterable[Conversation], owner: str, limit: int,
               before: float | None) -> tuple[list[Conversation], float | None]:
    """(up to ``limit`` conversations newest first, the cursor for the next page or None).
    Empty ones are not listed: every page load opens one, and there is nothing in it to find.

    ``live`` are this owner's records in use here: they replace their stored copies, which may
    be older (and so sorted lower). Store pages are read until everything at or above the last
    stored record read is known, so a stale copy can neither hide nor repeat an entry."""
    fresh = {c.id: c for c in live}
    found = {cid: c for cid, c in fresh.items() if c.history and (before is None or _key(c) < before)}
    cursor, bound = before, None
    while True:
        rows = await list_owner(owner, limit + 1, cursor)
        found.update((c.id, c) for c in rows if c.id not in fresh and c.history)
        if len(rows) <= limit:  # the store has nothing older: every entry is known
            bound = None
            break
        bound = _key(rows[-1])  # stored copies are never newer than the live record
        if sum(_key(c) >= bound for c in found.values()) > limit or bound == cursor:
            break
        cursor = bound
    ranked = sorted((c for c in found.values() if bound is None or _key(c) >= bound), key=_key, reverse=True)
    shown = ranked[:limit]
    more = len(ranked) > limit or (bound is not None and bool(shown))
    return shown, (_key(shown[-1]) if more and shown else None)
