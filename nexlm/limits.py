"""Per-client message rate and concurrent-reply limits.

A token bucket per client (refilled continuously, so a burst after a quiet
minute is allowed but a sustained flood is not) and counters of running
replies per client and in total. Buckets of clients that have gone quiet are
dropped, so the table stays as small as the set of active clients.

The facade uses only ``admit``, ``admit_session``, ``release_reply``, ``running_total``,
``running_clients``, ``open`` and ``close`` (the ``Limits`` protocol), so a store shared by
several instances can count across them instead (``limits_redis.RedisLimiter``, chosen by
``make_limiter`` when ``[store] kind = "redis"``).
"""

from __future__ import annotations

import time
from typing import Protocol

from .config import LimitsConfig, Settings


class LimitError(Exception):
    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, for a Retry-After header


class Limits(Protocol):
    running_total: int  # replies running in this process

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def admit(self, client: str) -> None:
        """Count a message and reserve a running-reply slot (``LimitError`` when over);
        ``release_reply`` must follow, once."""
    async def admit_session(self, client: str) -> None:
        """Count one new session against ``sessions_per_minute``."""
    def release_reply(self, client: str) -> None: ...
    def running_clients(self) -> int: ...


def make_limiter(settings: Settings) -> Limits:
    """This process's counts, or with a Redis store the counts every instance shares."""
    if settings.store.kind == "redis":
        from .limits_redis import RedisLimiter

        return RedisLimiter(settings.limits, settings.store.url)
    return Limiter(settings.limits)


class Limiter:
    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill)
        self._session_buckets: dict[str, tuple[float, float]] = {}  # the same, for new sessions
        self._running: dict[str, int] = {}
        self.running_total = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def admit(self, client: str) -> None:
        self.take_message(client)
        self.acquire_reply(client)

    async def admit_session(self, client: str) -> None:
        self.take_session(client)

    def take_message(self, client: str, now: float | None = None) -> None:
        """Count one message against the client's rate; raise ``rate_limited`` when over."""
        self._take(self._buckets, self.config.messages_per_minute, client, now, "messages")

    def take_session(self, client: str, now: float | None = None) -> None:
        """Count one new session against the client's ``sessions_per_minute``."""
        self._take(self._session_buckets, self.config.sessions_per_minute, client, now, "new conversations")

    @staticmethod
    def _take(buckets: dict, rate: int, client: str, now: float | None, what: str) -> None:
        wait = _take(buckets, rate, client, now)
        if wait is not None:
            raise LimitError("rate_limited", f"Too many {what}: the limit is {rate} per minute. "
                             f"Try again in {wait:.0f} s.", wait)

    def acquire_reply(self, client: str) -> None:
        """Reserve a running-reply slot; ``release_reply`` must follow, once."""
        per_client = self.config.max_replies_per_client
        if self._running.get(client, 0) >= per_client > 0:
            raise LimitError("busy", f"You already have {per_client} replies running; wait for one to finish or stop it.")
        total = self.config.max_replies_total
        if self.running_total >= total > 0:
            raise LimitError("overloaded", "The server is answering too many requests right now. Try again shortly.")
        self._running[client] = self._running.get(client, 0) + 1
        self.running_total += 1

    def running_clients(self) -> int:
        """Clients with a reply running (a public view for the invariants)."""
        return len(self._running)

    def release_reply(self, client: str) -> None:
        n = self._running.get(client, 0) - 1
        if n > 0:
            self._running[client] = n
        else:
            self._running.pop(client, None)
        self.running_total = max(0, self.running_total - 1)


def _take(buckets: dict[str, tuple[float, float]], rate: int, client: str, now: float | None) -> float | None:
    """Take one token from ``client``'s bucket (``rate`` per minute, bursts up to ``rate``):
    ``None`` if there was one, else the seconds until there is."""
    if rate <= 0:
        return None
    now = time.monotonic() if now is None else now
    tokens, last = buckets.get(client, (float(rate), now))
    tokens = min(float(rate), tokens + (now - last) * rate / 60.0)
    if tokens < 1.0:
        buckets[client] = (tokens, now)
        return (1.0 - tokens) * 60.0 / rate
    buckets[client] = (tokens - 1.0, now)
    if len(buckets) > 10000:
        _prune(buckets, rate, now)
    return None


def _prune(buckets: dict[str, tuple[float, float]], rate: int, now: float) -> None:
    """Forget clients whose bucket has refilled: they are as good as new."""
    full = [c for c, (t, last) in buckets.items() if t + (now - last) * rate / 60.0 >= rate]
    for c in full:
        del buckets[c]
