"""RedisLimiter against a real redis-server: two limiters stand for two NexLM instances."""

from __future__ import annotations

import asyncio

import pytest
from redis_servers import command, free_port

from nexlm.config import LimitsConfig
from nexlm.limits import LimitError
from nexlm.limits_redis import RedisLimiter


@pytest.fixture(params=["server", "cluster"])
def limiters(request):
    """``await limiters(lease=..., **[limits])``: opened RedisLimiters on one flushed Redis (a server or
    the three-node cluster: every script touches one key)."""
    target = request.getfixturevalue("redis_server" if request.param == "server" else "redis_cluster")
    for node in getattr(target, "nodes", [target]):
        assert command(node.port, "FLUSHALL").startswith("+OK")
    opened: list[RedisLimiter] = []

    async def make(lease: float = 30.0, **limits) -> RedisLimiter:
        limiter = RedisLimiter(LimitsConfig(**limits), target.url, lease=lease)
        await limiter.open()
        opened.append(limiter)
        return limiter

    make.opened = opened
    return make


async def close_all(limiters) -> None:
    for limiter in limiters.opened:
        await limiter.close()


async def test_new_sessions_per_minute_are_counted_across_instances(limiters):
    a, b = await limiters(sessions_per_minute=3), await limiters(sessions_per_minute=3)
    try:
        await a.admit_session("c")
        await b.admit_session("c")
        await a.admit_session("c")
        with pytest.raises(LimitError) as info:
            await b.admit_session("c")
        assert info.value.code == "rate_limited" and 0 < info.value.retry_after <= 20
        await b.admit_session("someone else")  # a bucket per client
    finally:
        await close_all(limiters)


async def test_total_replies_are_counted_across_instances_and_given_back(limiters):
    a, b = await limiters(max_replies_total=2), await limiters(max_replies_total=2)
    try:
        await a.admit("c1")
        await b.admit("c2")
        with pytest.raises(LimitError) as info:
            await a.admit("c3")
        assert info.value.code == "overloaded"
        assert (a.running_total, b.running_total, a.running_clients()) == (1, 1, 1)
        b.release_reply("c2")
        await asyncio.gather(*b._releases)  # the slot goes back in the background
        await a.admit("c3")
    finally:
        await close_all(limiters)


async def test_a_dead_instance_frees_its_slots_when_its_lease_runs_out(limiters):
    a = await limiters(lease=1.0, max_replies_per_client=1)
    b = await limiters(lease=1.0, max_replies_per_client=1)
    try:
        await a.admit("c")
        a._renewer.cancel()  # A "dies": it renews nothing and never gives the slot back
        with pytest.raises(LimitError):
            await b.admit("c")
        async with asyncio.timeout(10):
            while True:
                try:
                    await b.admit("c")
                    break
                except LimitError as exc:
                    assert exc.code == "busy"
                    await asyncio.sleep(0.1)
    finally:
        await close_all(limiters)


async def test_a_running_reply_keeps_its_slot_past_the_lease(limiters):
    a = await limiters(lease=0.6, max_replies_per_client=1)
    b = await limiters(lease=0.6, max_replies_per_client=1)
    try:
        await a.admit("c")
        key = "nexlm:client:{c}:replies"
        first = (await a.conn.client.zrange(key, 0, -1, withscores=True))[0][1]
        async with asyncio.timeout(10):  # wait for a renewal to move the deadline on
            while (await a.conn.client.zrange(key, 0, -1, withscores=True))[0][1] == first:
                await asyncio.sleep(0.05)
        with pytest.raises(LimitError):
            await b.admit("c")
    finally:
        await close_all(limiters)


async def test_an_unreachable_redis_refuses_rather_than_lets_through(limiters):
    a = await limiters()
    try:
        await a.conn.close()
        a.conn.client = type(a.conn.client).from_url(f"redis://127.0.0.1:{free_port()}/0")
        a._bucket = a.conn.client.register_script("return 1")
        with pytest.raises(LimitError) as info:
            await a.admit("c")
        assert info.value.code == "store_unavailable"
    finally:
        await close_all(limiters)
