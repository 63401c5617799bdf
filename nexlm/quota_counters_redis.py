"""The quota counters in Redis (``quota_counters`` documents the layout), shared by every instance."""

from __future__ import annotations

from .quota_counters import Periods, Spent
from .redis_conn import connect, guarded, tagged

# KEYS[1]: the day's hash, KEYS[2]: the month's; ARGV: tokens, messages, day expiry, month expiry (epoch s).
_ADD = """
for i = 1, 2 do
  redis.call('HINCRBY', KEYS[i], 't', ARGV[1])
  redis.call('HINCRBY', KEYS[i], 'm', ARGV[2])
  redis.call('EXPIREAT', KEYS[i], ARGV[2 + i])
end
return 1
"""
# The same keys: {day tokens, day messages, month tokens, month messages}, missing ones 0.
_READ = """
local d = redis.call('HMGET', KEYS[1], 't', 'm')
local m = redis.call('HMGET', KEYS[2], 't', 'm')
return {tonumber(d[1]) or 0, tonumber(d[2]) or 0, tonumber(m[1]) or 0, tonumber(m[2]) or 0}
"""
# Past its period a row is never read again; it is kept a day longer for clocks that disagree.
GRACE_SECONDS = 86400


class RedisCounters:
    """(One script per call: both keys share the owner's hash tag, so it also runs on a Cluster.)"""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = None

    async def open(self) -> None:
        self.conn = await connect(self.url)
        self._add = self.conn.client.register_script(_ADD)
        self._read = self.conn.client.register_script(_READ)

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close()

    @staticmethod
    def keys(owner: str, periods: Periods) -> list[str]:
        return [tagged("quota", owner, "d", periods.day), tagged("quota", owner, "m", periods.month)]

    @guarded  # Redis gone under a request: 503 store_unavailable, as the limits say it
    async def read(self, owner: str, periods: Periods) -> Spent:
        return Spent(*(int(v) for v in await self._read(keys=self.keys(owner, periods))))

    async def add(self, owner: str, periods: Periods, tokens: int, messages: int) -> None:
        await self._add(keys=self.keys(owner, periods), args=[
            tokens, messages, int(periods.day_ends) + GRACE_SECONDS, int(periods.month_ends) + GRACE_SECONDS])
