"""The two commands on the hot path of the Redis event log, packed with as little Python per
token as possible (bench/fanout_cpu.py measured redis-py's per-command packing and reply parsing
as most of the CPU a reply followed through another instance cost).

- ``packed_append``: a writer's batch of events as one ``EVAL`` (single-node Redis) instead of
  an ``XADD`` per event: one command, packed here, and one reply to read per batch.
- ``XRead``: the reader's ``XREAD BLOCK`` over a couple of hundred streams, its stream names
  packed once and kept, sent on a connection of the client's own pool.
- ``packed_pipeline``: a few commands in one round trip the same way (a record's write, put about
  once a second per running reply).
"""

from __future__ import annotations

import functools

from redis.exceptions import ResponseError

from .redis_conn import key

MAXLEN = 20000  # events kept per reply stream (approximate trim); a reply is far shorter
INDEX_TTL_MS = 7 * 86400 * 1000
BLOCK_MS = 4000  # under redis_conn.SOCKET_TIMEOUT

# One batch of reply events: KEYS each event's reply stream, then each session's seq counter;
# ARGV maxlen, ttl (ms), the number of events, (seq, JSON) per event, then each counter's value.
# pcall: an entry already there (a position written twice) is skipped, as a pipeline's error was.
_APPEND = """
local n = tonumber(ARGV[3])
for i = 1, n do
  redis.pcall('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '0-' .. ARGV[2 + 2 * i], 'e', ARGV[3 + 2 * i])
end
for j = n + 1, #KEYS do
  redis.call('SET', KEYS[j], ARGV[3 + n + j], 'PX', ARGV[2])
end
return n
"""


def append(pipe, batch: list[tuple]) -> None:
    """Queue ``batch`` (cid, reply id, seq, JSON per event) on ``pipe`` as one XADD per event, then
    each session's seq counter: a cluster's way (a batch spans several sessions' slots)."""
    for cid, rid, seq, data in batch:
        pipe.xadd(key(cid, "reply", rid), {"e": data}, id=f"0-{seq}", maxlen=MAXLEN, approximate=True)
    for cid, seq in {cid: seq for cid, _, seq, _ in batch}.items():
        pipe.set(key(cid, "seq"), seq, px=INDEX_TTL_MS)


def packed_append(batch: list[tuple]) -> bytes:
    """The ``_APPEND`` EVAL of ``batch`` (cid, reply id, seq, JSON per event), packed for ``command``."""
    last = {cid: seq for cid, _, seq, _ in batch}
    n, nkeys = len(batch), len(batch) + len(last)
    out = [b"*%d\r\n" % (6 + nkeys + 2 * n + len(last)), _EVAL, _APPEND_BULK, _bulk(b"%d" % nkeys)]
    out += [_reply_bulk(cid, rid) for cid, rid, _, _ in batch]
    out += [_seq_bulk(cid) for cid in last]
    out += [_MAXLEN_BULK, _TTL_BULK, _bulk(b"%d" % n)]
    for _, _, seq, data in batch:
        out += (_bulk(b"%d" % seq), _bulk(data))
    out += [_bulk(b"%d" % seq) for seq in last.values()]
    return b"".join(out)


@functools.lru_cache(maxsize=1 << 12)  # a running reply's events name its stream in every batch
def _reply_bulk(cid: str, rid: str) -> bytes:
    return _bulk(key(cid, "reply", rid).encode())


@functools.lru_cache(maxsize=1 << 12)
def _seq_bulk(cid: str) -> bytes:
    return _bulk(key(cid, "seq").encode())


def split(ops: list[tuple]) -> list:
    """The writer's ops in order as what to send: each run of events (``xadd`` ops) as a packed
    EVAL, each run of other ops as a list (for a pipeline)."""
    parts: list = []
    batch: list[tuple] = []
    rest: list[tuple] = []
    for op in ops:
        if op[0] == "xadd":
            if rest:
                parts.append(rest)
                rest = []
            batch.append(op[1:])
        else:
            if batch:
                parts.append(packed_append(batch))
                batch = []
            rest.append(op)
    parts.append(rest or packed_append(batch))
    return parts


async def command(client, packed: bytes):
    """Send one packed command on a connection of ``client``'s pool; its reply (an error reply raises)."""
    return await _send(client, packed, 0)


async def packed_pipeline(client, *commands: tuple) -> list:
    """``commands`` (tuples of str, bytes, int or float arguments), packed here and sent in one
    round trip on single-node Redis; their replies, an error reply in its place as a ``ResponseError``.
    Less of redis-py's CPU than its pipeline (``RedisStore.put``, bench/put_cpu.py: ~325-355 µs each
    through a redis-py pipeline, ~175-200 µs this way)."""
    out = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for a in cmd:
            out.append(_bulk(a if isinstance(a, bytes) else (a if isinstance(a, str) else repr(a)).encode()))
    return await _send(client, b"".join(out), len(commands))


async def _send(client, packed: bytes, replies: int):
    """``packed`` on a pooled connection: one reply (``replies`` 0), or a list of ``replies``."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(packed)
        if not replies:
            return await conn.read_response()
        return [await _reply(conn) for _ in range(replies)]  # (every reply read: the connection stays in step)
    except BaseException as exc:
        if not isinstance(exc, ResponseError):
            await conn.disconnect()  # an answer may still be on its way: never reuse the connection
        raise
    finally:
        await pool.release(conn)


async def _reply(conn):
    try:
        return await conn.read_response()
    except ResponseError as exc:
        return exc


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


_EVAL = _bulk(b"EVAL")
_APPEND_BULK = _bulk(_APPEND.encode())
_MAXLEN_BULK, _TTL_BULK = _bulk(b"%d" % MAXLEN), _bulk(b"%d" % INDEX_TTL_MS)
_XREAD_HEAD = b"".join(_bulk(a) for a in (b"XREAD", b"COUNT", b"1000", b"BLOCK", b"%d" % BLOCK_MS, b"STREAMS"))


class XRead:
    """``XREAD COUNT 1000 BLOCK <BLOCK_MS> STREAMS names.. positions..`` on a connection taken
    from ``client``'s pool and kept (the reader reads a couple of hundred times a second)."""

    def __init__(self, client) -> None:
        self.r = client
        self._names: dict[str, bytes] = {}  # stream name -> its packed bulk string
        self._conn = None

    async def read(self, names: list[str], positions: list[bytes]):
        """(stream name bytes, entries) pairs; an entry is (id, [field, value, ...]). Single-node
        Redis only (one XREAD over several sessions' slots; a cluster's reader is redis_follow_cluster)."""
        packed = self._names
        if len(packed) > 4 * len(names) + 64:  # names of streams no longer read
            packed.clear()
        cmd = b"".join([b"*%d\r\n" % (6 + 2 * len(names)), _XREAD_HEAD,
                        *[packed.get(n) or packed.setdefault(n, _bulk(n.encode())) for n in names],
                        *[_bulk(p) for p in positions]])
        pool = self.r.connection_pool
        if self._conn is None:
            self._conn = await pool.get_connection()
        conn = self._conn
        try:
            await conn.send_packed_command(cmd)
            reply = await conn.read_response()
        except BaseException:
            self._conn = None
            await conn.disconnect()  # an answer may still be on its way: never reuse the connection
            await pool.release(conn)
            raise
        if not reply:
            return ()
        return reply.items() if isinstance(reply, dict) else reply  # RESP3 map, RESP2 list of pairs


def as_dict(fields) -> dict:
    """An entry's fields as a dict (raw replies give a flat [name, value, ...] list)."""
    return fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2]))
