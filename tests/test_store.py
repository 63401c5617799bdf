"""One suite for every store (``Store`` in nexlm/store.py): the same behaviour from memory, SQLite
and Redis (one real redis-server, and a real three-node Redis Cluster).

The ``store_factory`` fixture is parametrized by kind; another store joins by adding a param
(and, for a server, starting it in the fixture): ``make(ttl=..., max_sessions=..., max_per_client=...)``
returns an opened store whose ``in_use`` is the set ``busy`` the test fills.
"""

from __future__ import annotations

import asyncio

import pytest
from redis_servers import command

from nexlm.records import Conversation
from nexlm.store import MemoryStore, StoreFull
from nexlm.store_redis import RedisStore
from nexlm.store_sqlite import SQLiteStore

KINDS = ["memory", "sqlite", "redis", "redis-cluster"]


class Factory:
    def __init__(self, kind: str, tmp_path, redis=None) -> None:
        self.kind = kind
        self.redis = redis  # tests/redis_servers.py: a RedisServer or a RedisCluster, flushed here
        for node in getattr(redis, "nodes", [redis] if redis is not None else []):
            assert command(node.port, "FLUSHALL").startswith("+OK")
        self.tmp_path = tmp_path
        self.busy: set[str] = set()
        self.opened: list = []

    async def __call__(self, ttl: float = 3600.0, max_sessions: int = 100, max_per_client: int = 50):
        in_use = self.busy.__contains__
        if self.kind == "memory":
            store = MemoryStore(ttl, max_sessions, max_per_client, in_use=in_use)
        elif self.kind == "sqlite":
            store = SQLiteStore(str(self.tmp_path / "store.db"), ttl, max_sessions, max_per_client, in_use=in_use)
        elif self.kind.startswith("redis"):
            store = RedisStore(self.redis.url, ttl, max_sessions, max_per_client, in_use=in_use)
        else:  # pragma: no cover
            raise AssertionError(self.kind)
        await store.open()
        self.opened.append(store)
        return store

    async def close(self) -> None:
        for store in self.opened:
            await store.close()


@pytest.fixture(params=KINDS)
async def store_factory(request, tmp_path):
    redis = None
    if request.param.startswith("redis"):  # a real redis-server (or three-node cluster) per test session
        redis = request.getfixturevalue("redis_cluster" if request.param == "redis-cluster" else "redis_server")
    factory = Factory(request.param, tmp_path, redis)
    yield factory
    await factory.close()


def conv(owner="u:a", client="c1", **kw) -> Conversation:
    return Conversation(owner, client, "fake/fake-model", **kw)


HISTORY = [
    {"role": "user", "content": "first ✓ \U0001F600"},
    {"role": "assistant", "content": "answer", "finish_reason": "stop", "model": "fake/fake-model",
     "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
    {"role": "user", "content": "second"},
    {"role": "assistant", "content": "so far", "finish_reason": "streaming", "model": "fake/fake-model"},
]


async def test_a_record_comes_back_as_it_was_stored(store_factory):
    store = await store_factory()
    c = conv(params={"temperature": 0.5, "system": "be brief"}, history=[dict(t) for t in HISTORY], seq=17,
             title="first", updated=1234.5)
    assert await store.add(c) == []
    assert store.size == 1
    for got in (await store.get(c.id), await store.peek(c.id)):
        assert got is not None and got is not c
        assert (got.owner, got.client, got.model, got.params, got.history, got.seq, got.title, got.updated,
                got.created) == (c.owner, c.client, c.model, c.params, HISTORY, 17, "first", 1234.5, c.created)
    assert await store.ids() == [c.id]
    assert await store.get("no such id") is None and await store.peek("no such id") is None
    assert await store.get(None) is None


async def test_put_replaces_and_never_resurrects(store_factory):
    store = await store_factory()
    c = conv()
    await store.add(c)
    c.history = [{"role": "user", "content": "q"},
                 {"role": "assistant", "content": "a", "finish_reason": "interrupted", "model": c.model}]
    c.model, c.title, c.seq = "fake/fake-reasoner", "q", 4
    await store.put(c)
    got = await store.get(c.id)
    assert (got.history, got.model, got.title, got.seq) == (c.history, "fake/fake-reasoner", "q", 4)
    assert await store.delete(c.id) is True
    assert await store.delete(c.id) is False
    await store.put(c)  # a write that raced the delete
    assert await store.get(c.id) is None and store.size == 0 and await store.ids() == []


async def test_per_client_cap_evicts_the_least_recently_active_idle_one(store_factory):
    store = await store_factory(max_per_client=2)
    a, b = conv(), conv()
    await store.add(a)
    await store.add(b)
    store.touch(a.id)  # a is now more recent than b
    other = conv(client="c2")
    assert await store.add(other) == []  # another client's cap is its own
    c = conv()
    assert await store.add(c) == [b.id]
    assert sorted(await store.ids()) == sorted([a.id, c.id, other.id]) and store.size == 3
    store_factory.busy.update({a.id, c.id})
    with pytest.raises(StoreFull) as exc:
        await store.add(conv())
    assert exc.value.code == "busy"
    assert store.size == 3


async def test_global_cap_evicts_idle_ones_only(store_factory):
    store = await store_factory(max_sessions=3)
    convs = [conv(client=f"c{i}") for i in range(3)]
    for c in convs:
        await store.add(c)
    store_factory.busy.add(convs[0].id)  # the oldest is in use: the next oldest goes
    assert await store.add(conv(client="new")) == [convs[1].id]
    store_factory.busy.update(await store.ids())
    with pytest.raises(StoreFull) as exc:
        await store.add(conv(client="newer"))
    assert exc.value.code == "overloaded"
    assert store.size == 3


async def test_expire_forgets_idle_records_past_the_ttl(store_factory):
    store = await store_factory(ttl=100)
    t0 = store.clock()
    idle, busy = conv(), conv()
    await store.add(idle)
    await store.add(busy)
    store_factory.busy.add(busy.id)
    assert await store.expire(t0 + 50) == []
    assert await store.expire(t0 + 101) == [idle.id]
    assert await store.ids() == [busy.id] and store.size == 1
    store_factory.busy.clear()
    store.touch(busy.id)
    assert await store.expire(store.clock() + 50) == []  # touched: its ttl starts again
    assert await store.expire(store.clock() + 101) == [busy.id]


async def test_list_owner_newest_first_with_a_cursor(store_factory):
    store = await store_factory()
    mine = []
    for i, updated in enumerate([10.0, 30.0, 20.0, 40.0]):
        c = conv(updated=updated, title=f"t{i}")
        await store.add(c)
        mine.append(c)
    await store.add(conv(owner="u:b", updated=50.0))
    await store.add(conv(owner=None, updated=60.0))
    listed = await store.list_owner("u:a", 10)
    assert [c.updated for c in listed] == [40.0, 30.0, 20.0, 10.0]
    assert all(c.owner == "u:a" for c in listed)
    page1 = await store.list_owner("u:a", 2)
    page2 = await store.list_owner("u:a", 2, before=page1[-1].updated)
    assert [c.title for c in page1 + page2] == ["t3", "t1", "t2", "t0"]
    assert await store.list_owner("u:a", 2, before=10.0) == []
    mine[0].updated = 99.0
    await store.put(mine[0])  # a new turn moves it to the top
    assert (await store.list_owner("u:a", 1))[0].id == mine[0].id
    assert await store.list_owner("u:nobody", 10) == []


async def test_adds_at_the_same_time_still_keep_the_cap(store_factory):
    store = await store_factory(max_sessions=3)
    convs = [conv(client=f"c{i}") for i in range(6)]
    evicted = await asyncio.gather(*(store.add(c) for c in convs))
    assert store.size == 3 and len(await store.ids()) == 3
    assert sum(len(e) for e in evicted) == 3
    assert sorted(await store.ids()) == sorted(c.id for c in convs[3:])  # the oldest made room
