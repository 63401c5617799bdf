"""The per-client limits counted in Redis, so every instance sharing a store shares them too.

Same rules as ``limits.Limiter`` (it documents them), kept where every instance sees them:

- messages and new sessions per minute: the same token bucket, in a Lua script on one hash per
  client and kind (``nexlm:client:{<client>}:rate:<kind>``), timed by the Redis server's clock,
  so the instances' clocks do not matter;
- running replies, per client (``nexlm:client:{<client>}:replies``) and in total
  (``nexlm:all:{replies}``): sorted sets of reply tokens scored by a lease deadline. This
  process renews the leases of the replies it runs every ``lease / 3`` seconds; an instance that
  dies stops renewing, and its slots are free again ``lease`` seconds later.

Each script touches one key, so the layout works on Redis Cluster. A Redis that cannot be
reached refuses new replies (503) rather than letting them past uncounted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets

from .config import LimitsConfig
from .limits import LimitError
from .redis_conn import RedisConn, connect, tagged

log = logging.getLogger(__name__)

TOTAL_KEY = "nexlm:all:{replies}"
LEASE_SECONDS = 30.0
UNREACHABLE = "The conversation store cannot be reached right now; try again shortly."

# KEYS[1]: the bucket; ARGV[1]: tokens per minute. Nil when a token was taken, else the wait (s).
_BUCKET = """
local rate = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'last')
local tokens = tonumber(b[1]) or rate
local last = tonumber(b[2]) or now
tokens = math.min(rate, tokens + math.max(0, now - last) * rate / 60)
local wait = false
if tokens < 1 then
  wait = tostring((1 - tokens) * 60 / rate)
else
  tokens = tokens - 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'last', tostring(now))
redis.call('EXPIRE', KEYS[1], 61)
return wait
"""

# KEYS[1]: a sorted set of reply tokens by lease deadline (ms); ARGV: cap, token, lease (ms).
_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
"""

# KEYS[1]: as above; ARGV[1]: lease (ms), ARGV[2..]: tokens still running (only those still there).
_RENEW = """
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[1]))
return 1
"""


class RedisLimiter:
    def __init__(self, config: LimitsConfig, url: str, lease: float = LEASE_SECONDS) -> None:
        self.config = config
        self.url = url
        self.lease = lease
        self.conn: RedisConn | None = None
        self._prefix = secrets.token_hex(6)  # this process's reply tokens: <prefix>:<n>
        self._n = itertools.count(1)
        self._held: dict[str, list[str]] = {}  # client -> tokens of the replies running here
        self.running_total = 0
        self._releases: set[asyncio.Task] = set()
        self._renewer: asyncio.Task | None = None

    async def open(self) -> None:
        self.conn = await connect(self.url)
        client = self.conn.client
        self._bucket = client.register_script(_BUCKET)
        self._slot = client.register_script(_SLOT)
        self._renew = client.register_script(_RENEW)
        self._renewer = asyncio.create_task(self._renew_loop(), name="reply leases")

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close()

    def running_clients(self) -> int:
        return len(self._held)

    # ------------------------------------------------------------ rates

    async def admit(self, client: str) -> None:
        await self._take("messages", self.config.messages_per_minute, client, "messages")
        await self._acquire(client)

    async def admit_session(self, client: str) -> None:
        await self._take("sessions", self.config.sessions_per_minute, client, "new conversations")

    async def _take(self, kind: str, rate: int, client: str, what: str) -> None:
        if rate <= 0:
            return
        wait = await self._call(self._bucket, tagged("client", client, "rate", kind), rate)
        if wait is not None:
            wait = float(wait)
            raise LimitError("rate_limited", f"Too many {what}: the limit is {rate} per minute. "
                             f"Try again in {wait:.0f} s.", wait)

    async def _call(self, script, key: str, *args):
        if self.conn is None:
            raise LimitError("store_unavailable", UNREACHABLE)
        try:
            return await script(keys=[key], args=list(args))
        except Exception as exc:
            log.error("limits: %s", self.conn.error(exc, "counting"))
            raise LimitError("store_unavailable", UNREACHABLE) from None

    # ------------------------------------------------------------ running replies

    async def _acquire(self, client: str) -> None:
        token = f"{self._prefix}:{next(self._n)}"
        lease_ms = int(self.lease * 1000)
        per_client, total = self.config.max_replies_per_client, self.config.max_replies_total
        client_key = tagged("client", client, "replies")
        if per_client > 0 and not await self._call(self._slot, client_key, per_client, token, lease_ms):
            raise LimitError("busy", f"You already have {per_client} replies running; wait for one to finish or stop it.")
        if total > 0 and not await self._call(self._slot, TOTAL_KEY, total, token, lease_ms):
            self._forget(client, token)
            raise LimitError("overloaded", "The server is answering too many requests right now. Try again shortly.")
        self._held.setdefault(client, []).append(token)
        self.running_total += 1

    def release_reply(self, client: str) -> None:
        tokens = self._held.get(client)
        if not tokens:
            return
        token = tokens.pop()
        if not tokens:
            del self._held[client]
        self.running_total = max(0, self.running_total - 1)
        self._forget(client, token)

    def _forget(self, client: str, token: str) -> None:
        """Give a slot back in the background (the caller is a reply ending: it must not wait)."""
        if self.conn is None:
            return
        task = asyncio.create_task(self._zrem(client, token), name="release reply slot")
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _zrem(self, client: str, token: str) -> None:
        try:
            pipe = self.conn.client.pipeline(transaction=False)
            pipe.zrem(tagged("client", client, "replies"), token)
            pipe.zrem(TOTAL_KEY, token)
            await pipe.execute()
        except Exception as exc:  # its lease runs out instead
            log.warning("limits: a reply slot was not given back: %s", exc)

    async def _renew_loop(self) -> None:
        lease_ms = int(self.lease * 1000)
        while True:
            await asyncio.sleep(self.lease / 3)
            held = {c: list(t) for c, t in self._held.items()}
            try:
                for client, tokens in held.items():
                    await self._renew(keys=[tagged("client", client, "replies")], args=[lease_ms, *tokens])
                everything = [t for tokens in held.values() for t in tokens]
                if everything:
                    await self._renew(keys=[TOTAL_KEY], args=[lease_ms, *everything])
            except Exception as exc:  # the next round tries again, well within the lease
                log.warning("limits: reply leases not renewed: %s", exc)
