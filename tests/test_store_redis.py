"""RedisStore against a real redis-server and a real three-node Redis Cluster: what is Redis's own
(the key layout, caps counted across instances, markers of use elsewhere, the schema version)."""

from __future__ import annotations

import asyncio

import pytest
from redis_servers import command

from nexlm.records import Conversation
from nexlm.store import StoreError, StoreFull
from nexlm.store_redis import ALL_KEY, SCHEMA, SCHEMA_KEY, RedisStore
from nexlm.validation import ChatError


@pytest.fixture(params=["server", "cluster"])
def redis_url(request):
    """A flushed Redis: one server, or the three-node cluster (every node flushed)."""
    target = request.getfixturevalue("redis_server" if request.param == "server" else "redis_cluster")
    for node in getattr(target, "nodes", [target]):
        assert command(node.port, "FLUSHALL").startswith("+OK")
    return target.url


@pytest.fixture
def open_store(redis_url):
    stores = []

    async def make(ttl=60.0, max_sessions=100, max_per_client=10, in_use=lambda cid: False):
        store = RedisStore(redis_url, ttl, max_sessions, max_per_client, in_use=in_use)
        await store.open()
        stores.append(store)
        return store

    yield make
    # (each test closes its stores: the fixture's loop is not the test's)


def conv(client="c1", owner=None, **kw) -> Conversation:
    return Conversation(owner, client, "fake/fake-model", **kw)


async def test_a_record_made_through_one_store_is_read_through_another(open_store):
    a, b = await open_store(), await open_store()
    try:
        c = conv(owner="alice", history=[{"role": "user", "content": "hi"}], title="hi")
        assert await a.add(c) == []
        got = await b.get(c.id)
        assert got is not None and got.history == c.history and got.owner == "alice"
        got.history.append({"role": "assistant", "content": "hello", "finish_reason": "stop"})
        got.updated = got.created + 5
        await b.put(got)
        again = await a.get(c.id)
        assert [t["content"] for t in again.history] == ["hi", "hello"]
        assert [x.id for x in await a.list_owner("alice", 10)] == [c.id]
        assert await a.delete(c.id) is True
        assert await b.get(c.id) is None and await b.list_owner("alice", 10) == []
    finally:
        await a.close()
        await b.close()


async def test_keys_are_hash_tagged_by_session(open_store, redis_url):
    store = await open_store()
    try:
        c = conv(owner="bob")
        await store.add(c)
        assert await store.client.exists(f"nexlm:{{{c.id}}}:rec") == 1
        assert await store.client.zscore("nexlm:owner:{bob}:sessions", c.id) is not None
        assert await store.client.zscore("nexlm:client:{c1}:sessions", c.id) is not None
    finally:
        await store.close()


async def test_per_client_cap_counts_across_instances_and_evicts_the_oldest_idle(open_store):
    a, b = await open_store(max_per_client=2), await open_store(max_per_client=2)
    try:
        first, second, third = conv(), conv(), conv()
        await a.add(first)
        await b.add(second)
        assert await a.add(third) == [first.id]  # counted across both: the oldest idle one made room
        assert await b.get(first.id) is None and await b.get(second.id) is not None
        assert await a.add(conv(client="other")) == []  # another client has its own count
    finally:
        await a.close()
        await b.close()


async def test_a_conversation_in_use_on_another_instance_is_never_evicted(open_store):
    used_on_a: set[str] = set()
    a = await open_store(max_per_client=1, in_use=used_on_a.__contains__)
    b = await open_store(max_per_client=1)
    try:
        first = conv()
        await a.add(first)
        used_on_a.add(first.id)
        a.touch(first.id)  # what the facade does when a reply starts or a listener attaches
        await a.close()  # (close writes the pending touch: the busy marker is there)
        a = None
        with pytest.raises(StoreFull) as info:
            await b.add(conv())
        assert info.value.code == "busy"
        assert await b.get(first.id) is not None
    finally:
        if a is not None:
            await a.close()
        await b.close()


async def test_global_cap_refuses_when_all_are_in_use_here(open_store):
    used: set[str] = set()
    store = await open_store(max_sessions=2, max_per_client=5, in_use=used.__contains__)
    try:
        one, two = conv(client="x"), conv(client="y")
        await store.add(one)
        await store.add(two)
        used.update({one.id, two.id})
        with pytest.raises(StoreFull) as info:
            await store.add(conv(client="z"))
        assert info.value.code == "overloaded"
        used.discard(one.id)
        assert await store.add(conv(client="z")) == [one.id]
        assert store.size == 2
    finally:
        await store.close()


async def test_expire_forgets_idle_records_not_those_in_use(open_store):
    used: set[str] = set()
    store = await open_store(ttl=60, in_use=used.__contains__)
    try:
        idle, busy = conv(), conv()
        await store.add(idle)
        await store.add(busy)
        used.add(busy.id)
        dropped = await store.expire(store.clock() + 61)
        assert dropped == [idle.id]
        assert await store.peek(idle.id) is None and await store.peek(busy.id) is not None
    finally:
        await store.close()


async def test_records_carry_a_redis_expiry_refreshed_by_a_touch(open_store):
    store = await open_store(ttl=100)
    try:
        c = conv()
        await store.add(c)
        key = f"nexlm:{{{c.id}}}:rec"
        assert 90_000 < await store.client.pttl(key) <= 100_000
        await store.client.pexpire(key, 5000)
        store.touch(c.id)
        await store._flusher
        assert await store.client.pttl(key) > 90_000
    finally:
        await store.close()


async def test_a_newer_schema_is_refused_and_an_unknown_id_is_just_missing(open_store, redis_url):
    store = await open_store()
    try:
        assert int(await store.client.get(SCHEMA_KEY)) == SCHEMA
        assert await store.get("no}such{id") is None and await store.get("x" * 500) is None
        await store.client.set(SCHEMA_KEY, SCHEMA + 1)
    finally:
        await store.close()
    newer = RedisStore(redis_url, 60, 10, 10, in_use=lambda cid: False)
    with pytest.raises(StoreError) as info:
        await newer.open()
    assert f"schema version is {SCHEMA + 1}" in str(info.value) and "\n" not in str(info.value)


async def test_list_owner_pages_newest_first_and_prunes_expired(open_store):
    store = await open_store()
    try:
        convs = []
        for i in range(5):
            c = conv(owner="o", created=1000.0 + i)
            await store.add(c)
            convs.append(c)
        page = await store.list_owner("o", 2)
        assert [c.id for c in page] == [convs[4].id, convs[3].id]
        page2 = await store.list_owner("o", 2, before=page[-1].created)
        assert [c.id for c in page2] == [convs[2].id, convs[1].id]
        await store.client.delete(f"nexlm:{{{convs[4].id}}}:rec")  # as if Redis expired it
        assert [c.id for c in await store.list_owner("o", 2)] == [convs[3].id, convs[2].id]
        assert await store.client.zscore("nexlm:owner:{o}:sessions", convs[4].id) is None
    finally:
        await store.close()


async def test_an_older_schema_is_migrated_at_open(redis_url, monkeypatch):
    from nexlm import store_redis

    ran = []

    async def from_zero(client):
        ran.append(int(await client.get(SCHEMA_KEY)))

    monkeypatch.setitem(store_redis.MIGRATIONS, 0, from_zero)
    first = RedisStore(redis_url, 60, 10, 10, in_use=lambda cid: False)
    await first.open()
    try:
        await first.client.set(SCHEMA_KEY, 0)  # as a NexLM with the layout before version 1 left it
    finally:
        await first.close()
    store = RedisStore(redis_url, 60, 10, 10, in_use=lambda cid: False)
    await store.open()
    try:
        assert ran == [0] and int(await store.client.get(SCHEMA_KEY)) == SCHEMA
    finally:
        await store.close()


async def test_a_burst_of_concurrent_requests_is_served_not_refused(open_store):
    """More requests in flight at once than redis-py 8's default pool (100 connections, past which
    a command fails "Too many connections"): every one is answered."""
    store = await open_store()
    try:
        c = conv()
        await store.add(c)
        got = await asyncio.gather(*(store.get(c.id) for _ in range(300)), return_exceptions=True)
        assert [x for x in got if not isinstance(x, Conversation)] == []
        await asyncio.gather(*(store.put(c) for _ in range(300)))
        assert (await store.get(c.id)).id == c.id
    finally:
        await store.close()


async def test_a_put_that_redis_refuses_in_part_fails_and_says_why(open_store, redis_url, caplog):
    """An error reply to any of a put's commands (here the global index is not a sorted set) fails
    the put with the store's refusal and one log line naming it, not a put that seems to succeed."""
    store = await open_store()
    try:
        c = conv()
        await store.add(c)
        await store.client.delete(ALL_KEY)
        await store.client.set(ALL_KEY, "not a sorted set")
        with pytest.raises(ChatError) as err:
            await store.put(c)
        assert err.value.code == "store_unavailable"
        assert "WRONGTYPE" in caplog.text
    finally:
        await store.close()
