"""Quotas: what an identity may spend per UTC day and month, and which models it may use.

Resolution is per key: each of ``tokens_per_day``, ``tokens_per_month``, ``messages_per_day``,
``messages_per_month`` and ``models`` comes from the most specific rule that sets it: the user's
(``[quotas.user.NAME]``), else the groups' (``[quotas.group.NAME]``: of several groups that set it,
the most generous: 0 (unlimited) over any number, else the largest; for ``models`` the union, an
empty list (all) over any list), else ``[quotas.default]``, else unlimited. So a group that only
raises ``tokens_per_month`` keeps the default's daily cap and model list.

``check`` runs at admission, before anything is sent upstream: over a cap is ``quota_exceeded``
(429, ``Retry-After`` the seconds until the period resets, the reset time in the message), a model
outside the list ``forbidden_model`` (403). ``record`` runs when a turn ends (finished, failed or
stopped): its tokens (the provider's usage, else about 4 characters a token; none for a reply from
the response cache) and one message. A
reply already running is never cut: requests admitted at once may together go past a cap by what
they spend (at most ``[limits] max_replies_per_client`` of them). Without an identity (auth off)
nothing applies.
"""

from __future__ import annotations

import asyncio
import calendar
import fnmatch
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from .config import QuotaRule, QuotasConfig, Settings
from .config_quotas import LIMIT_KEYS
from .quota_counters import Counters, MemoryCounters, Periods, Spent, make_counters
from .validation import ChatError

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # the estimate when a provider reports no usage


@dataclass(frozen=True, slots=True)
class Effective:
    """The limits that apply to one identity; 0: unlimited, ``models`` empty: all."""
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    messages_per_day: int = 0
    messages_per_month: int = 0
    models: tuple[str, ...] = ()

    @property
    def unlimited(self) -> bool:
        return not (self.tokens_per_day or self.tokens_per_month or self.messages_per_day
                    or self.messages_per_month)

    def allows(self, model_id: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model_id, g) for g in self.models)


def _generous(values: list) -> int:
    return 0 if 0 in values else max(values)


def effective(config: QuotasConfig, name: str, groups: tuple[str, ...] | list[str] = ()) -> Effective:
    """The rule for ``name`` in ``groups`` (see the module's docstring for the order)."""
    user = config.users.get(name)
    mine = [config.groups[g] for g in dict.fromkeys(groups) if g in config.groups]
    default = config.default or QuotaRule()
    out = {}
    for key in (*LIMIT_KEYS, "models"):
        value = getattr(user, key) if user is not None else None
        if value is None:
            set_by_groups = [getattr(r, key) for r in mine if getattr(r, key) is not None]
            if set_by_groups:
                if key == "models":
                    value = () if () in set_by_groups else tuple(dict.fromkeys(g for v in set_by_groups for g in v))
                else:
                    value = _generous(set_by_groups)
        if value is None:
            value = getattr(default, key)
        if value is not None:
            out[key] = value
    return Effective(**out)


def periods(now: float) -> Periods:
    """The UTC day and month at ``now`` (epoch seconds), and when each ends."""
    t = datetime.fromtimestamp(now, timezone.utc)
    day_start = calendar.timegm((t.year, t.month, t.day, 0, 0, 0))
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return Periods(f"{t:%Y-%m-%d}", f"{t:%Y-%m}", day_start + 86400.0,
                   float(calendar.timegm((year, month, 1, 0, 0, 0))))


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def turn_tokens(turn) -> int:
    """Input + output tokens of an ended turn: the provider's usage, else an estimate (~4 chars a token)
    of what was sent and what came back."""
    usage = turn.usage or {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return max(0, prompt) + max(0, completion)
    sent = sum(len(c) if isinstance(c, str) else len(str(c)) if c else 0
               for c in (m.get("content") for m in turn.request.messages))
    return -(-(sent + turn.chars_out) // CHARS_PER_TOKEN)


class Quotas:
    """The quota rules with their counters (``make_counters``: by ``[store] kind``). ``clock``:
    epoch seconds, injectable for tests of the resets."""

    def __init__(self, config: QuotasConfig, counters: Counters | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.counters = counters if counters is not None else MemoryCounters()
        self.clock = clock
        self._writes: dict[str, set[asyncio.Task]] = {}  # owner -> its adds not yet done

    @classmethod
    def from_settings(cls, settings: Settings) -> Quotas:
        return cls(settings.quotas, make_counters(settings) if settings.quotas.enabled else MemoryCounters())

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    async def open(self) -> None:
        if self.enabled:
            await self.counters.open()

    async def close(self) -> None:
        await self.settle()
        if self.enabled:
            await self.counters.close()

    def rule(self, name: str, groups=()) -> Effective:
        return effective(self.config, name, groups)

    async def check(self, name: str | None, groups, model_id: str) -> None:
        """Refuse (``ChatError``) a new reply with ``model_id`` for ``name``; no identity: allowed."""
        if name is None or not self.enabled:
            return
        rule = self.rule(name, groups)
        if not rule.allows(model_id):
            raise ChatError("forbidden_model", f"You may not use {model_id}; your quota allows "
                            f"{', '.join(rule.models)}.", 403)
        if rule.unlimited:
            return
        await self.settle(name)  # this process's counts of the owner's ended turns are in
        now = self.clock()
        p = periods(now)
        spent = await self.counters.read(name, p)
        over = _over(rule, spent, p)
        if over:
            what, limit, resets = max(over, key=lambda o: o[2])  # all must clear: the latest reset
            raise ChatError("quota_exceeded", f"Quota exceeded: {limit} {what}. It resets at {iso(resets)} "
                            f"(in {_span(resets - now)}).", 429, max(1.0, resets - now))

    def record(self, name: str | None, tokens: int, messages: int = 1) -> None:
        """Count a turn that ended (from the turn observer: never waits)."""
        if name is None or not self.enabled or (tokens <= 0 and messages <= 0):
            return
        p = periods(self.clock())
        if isinstance(self.counters, MemoryCounters):
            self.counters.add_now(name, p, tokens, messages)
            return
        task = asyncio.get_running_loop().create_task(self._add(name, p, tokens, messages))
        self._writes.setdefault(name, set()).add(task)
        task.add_done_callback(lambda t: self._done(name, t))

    def turn_done(self, turn, session: str | None = None) -> None:
        """The turn observer (``Turn(on_done=...)``): count an ended turn against ``turn.who``, its
        tokens and the message, unless it failed before saying anything."""
        name = turn.who.name if turn.who is not None else None
        if name is None or not self.enabled:
            return
        failed_silent = turn.finish == "error" and turn.first_token is None
        spent = 0 if turn.cached or (failed_silent and not turn.usage) else turn_tokens(turn)  # a cache hit: no upstream
        self.record(name, spent, 0 if failed_silent else 1)

    async def _add(self, name: str, p: Periods, tokens: int, messages: int) -> None:
        try:
            await self.counters.add(name, p, tokens, messages)
        except Exception as exc:  # the reply is over; losing one count beats failing anything
            log.error("quotas: could not count %d tokens for an owner: %s", tokens, exc)

    def _done(self, name: str, task: asyncio.Task) -> None:
        pending = self._writes.get(name)
        if pending is not None:
            pending.discard(task)
            if not pending:
                del self._writes[name]

    async def settle(self, name: str | None = None) -> None:
        """Wait for the counts being written (``name``'s, or everyone's)."""
        tasks = set(self._writes.get(name, ())) if name is not None else {t for s in self._writes.values() for t in s}
        if tasks:
            await asyncio.wait(tasks)


def _over(rule: Effective, spent: Spent, p: Periods) -> list[tuple[str, int, float]]:
    checks = [("tokens per day", rule.tokens_per_day, spent.tokens_day, p.day_ends),
              ("messages per day", rule.messages_per_day, spent.messages_day, p.day_ends),
              ("tokens per month", rule.tokens_per_month, spent.tokens_month, p.month_ends),
              ("messages per month", rule.messages_per_month, spent.messages_month, p.month_ends)]
    return [(what, limit, resets) for what, limit, used, resets in checks if limit and used >= limit]


def _span(seconds: float) -> str:
    seconds = max(1, round(seconds))
    if seconds < 3600:
        return f"{-(-seconds // 60)} min"
    hours = seconds / 3600
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} days"
