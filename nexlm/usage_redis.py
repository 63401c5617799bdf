"""Usage in Redis: one aggregate hash per owner and UTC day, ``nexlm:usage:{OWNER}:DAY``
(hash-tagged by owner: a cluster keeps an owner's days on one node), fields ``MODEL\\tCOUNTER``
incremented with HINCRBY, so several instances add up without a read. Each hash expires
``RETENTION_DAYS`` after its day. The set ``nexlm:usage-owners:{all}:MONTH`` lists who used
anything that month, for the admins' view of everyone. Writes are pipelined per batch.
"""

from __future__ import annotations

import datetime as dt

from .redis_conn import PREFIX, RedisConn, connect, reason, tagged
from .store import StoreError
from .usage import FIELDS, RETENTION_DAYS, UsageEntry, counts_of, summarize

MAX_DAYS = 1000  # a query spans at most this many days (the API refuses longer ranges before this)


def day_key(owner: str, day: str) -> str:
    return tagged("usage", owner or "-", day)


def owners_key(month: str) -> str:
    return f"{PREFIX}:usage-owners:{{all}}:{month}"


class RedisUsage:
    kind = "redis"

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: RedisConn | None = None

    async def open(self) -> None:
        try:
            self.conn = await connect(self.url)
        except StoreError as exc:
            raise StoreError(f"usage: {exc}") from None

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close()

    async def record(self, entry: UsageEntry) -> None:
        await self.record_many([entry])

    async def record_many(self, entries: list[UsageEntry]) -> None:
        if self.conn is None:
            raise StoreError("usage: redis is closed")
        sums: dict[tuple[str, str], dict[str, int]] = {}
        for e in entries:
            fields = sums.setdefault((e.owner or "", e.day), {})
            for name, n in zip(FIELDS, counts_of(e)):
                if n:
                    fields[f"{e.model}\t{name}"] = fields.get(f"{e.model}\t{name}", 0) + n
        try:
            pipe = self.conn.client.pipeline(transaction=False)
            for (owner, day), fields in sums.items():
                key = day_key(owner, day)
                for field, n in fields.items():
                    pipe.hincrby(key, field, n)
                expire = dt.datetime.fromisoformat(day).replace(tzinfo=dt.timezone.utc) + dt.timedelta(
                    days=RETENTION_DAYS + 1)
                pipe.expireat(key, int(expire.timestamp()))
                pipe.hset(key, "owner", owner)  # the name as given (the key's tag may be a hash of it)
                pipe.sadd(owners_key(day[:7]), owner)
                pipe.expireat(owners_key(day[:7]), int(expire.timestamp()) + 31 * 86400)
            await pipe.execute()
        except Exception as exc:
            raise StoreError(f"usage: redis write failed: {reason(exc)}") from None

    async def query(self, owner, frm, to, group_by) -> dict:
        if self.conn is None:
            raise StoreError("usage: redis is closed")
        days = [(frm + dt.timedelta(days=i)).isoformat() for i in range(min(MAX_DAYS, (to - frm).days + 1))]
        client = self.conn.client
        try:
            if owner is None:
                months = sorted({d[:7] for d in days})
                pipe = client.pipeline(transaction=False)
                for m in months:
                    pipe.smembers(owners_key(m))
                owners = sorted({o.decode() for members in await pipe.execute() for o in members})
            else:
                owners = [owner]
            pipe = client.pipeline(transaction=False)
            wanted = [(o, d) for o in owners for d in days]
            for o, d in wanted:
                pipe.hgetall(day_key(o, d))
            hashes = await pipe.execute() if wanted else []
        except Exception as exc:
            raise StoreError(f"usage: redis read failed: {reason(exc)}") from None
        aggregates = []
        for (o, d), h in zip(wanted, hashes):
            models: dict[str, list[int]] = {}
            for field, value in h.items():
                model, _, name = field.decode().rpartition("\t")
                if name in FIELDS:
                    models.setdefault(model, [0] * len(FIELDS))[FIELDS.index(name)] = int(value)
            aggregates += [(d, o, m, c) for m, c in models.items()]
        return summarize(aggregates, group_by)
