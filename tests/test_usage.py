"""Usage accounting (issue 14): every reply on every front door is recorded under its owner's name,
with the tokens the upstream reported (or estimates, marked), in the configured store; ``GET
/api/usage`` shows a user their own and an admin everyone's.

The fake upstream's ``reply(*pieces, usage=True)`` reports 5 prompt tokens and one completion token
per piece: the expected totals below are sums of exactly that.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3

import pytest
from fake_upstream import reply
from invariants import make_harness  # noqa: F401  (fixtures)
from test_metrics import by_labels, scrape

from nexlm.store import StoreError
from nexlm.transports.usage import period
from nexlm.usage import MemoryUsage, UsageEntry
from nexlm.usage_sqlite import SQLiteUsage

MODEL = "fake/fake-model"
USERS = ('[auth]\ntokens = ["anon-token-one-0001"]\n'
         '[auth.users.alice]\ntoken = "alice-token-000000001"\ngroups = ["staff", "admins"]\n'
         '[auth.users.bob]\ntoken = "bob-token-0000000002"\ngroups = ["staff"]\n')
ALICE = {"Authorization": "Bearer alice-token-000000001"}
BOB = {"Authorization": "Bearer bob-token-0000000002"}
ANON = {"Authorization": "Bearer anon-token-one-0001"}
TODAY = dt.datetime.now(dt.timezone.utc).date().isoformat()


def store_toml(kind: str, tmp_path, request) -> str:
    if kind == "sqlite":
        return f'\n[store]\nkind = "sqlite"\npath = "{tmp_path / "nexlm.db"}"\n'
    if kind == "redis":
        from redis_servers import command

        server = request.getfixturevalue("redis_server")
        assert command(server.port, "FLUSHALL").startswith("+OK")
        return f'\n[store]\nkind = "redis"\nurl = "{server.url}"\n'
    return ""


async def usage(h, headers, **params) -> dict:
    r = await h.client.get("/api/usage", params=params, headers=headers)
    assert r.status == 200, await r.text()
    return await r.json()


def counts(row: dict) -> tuple:
    return row["replies"], row["input_tokens"], row["output_tokens"]


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_usage_totals_are_what_the_upstream_reported_on_every_door(make_harness, upstream, tmp_path,
                                                                         request, kind):
    h = await make_harness(USERS + store_toml(kind, tmp_path, request))
    upstream.push(reply("a", "b"), reply("x"), reply("p", "q", "r"), reply("s"))
    alice = await h.ws(headers=ALICE)  # /ws: 5 in, 2 out
    await alice.chat("one")
    await alice.until("done")
    s = await h.sse("GET", params={"message": "two"}, headers=BOB)  # /sse: 5 in, 1 out
    assert s.status == 200
    await s.rest()
    r = await h.client.post("/v1/chat/completions", headers=ANON,  # /v1, not streamed: 5 in, 3 out
                            json={"model": MODEL, "messages": [{"role": "user", "content": "three"}]})
    assert r.status == 200
    r = await h.client.post("/api/ai/chat", json={"message": "four"}, headers=ALICE)  # the seed's route: 5 in, 1 out
    assert r.status == 200
    await r.read()
    await h.settle()

    everyone = await usage(h, ALICE, group_by="user")
    assert everyone["everyone"] is True and everyone["user"] == "alice"
    assert everyone["totals"] == {"replies": 4, "input_tokens": 20, "output_tokens": 7, "cached_replies": 0,
                                  "estimated_replies": 0}
    assert {row["user"]: counts(row) for row in everyone["rows"]} == {
        "alice": (2, 10, 3), "bob": (1, 5, 1), "token-1": (1, 5, 3)}
    by_model = await usage(h, ALICE, group_by="model")
    assert [(row["model"], *counts(row)) for row in by_model["rows"]] == [(MODEL, 4, 20, 7)]
    by_day = await usage(h, ALICE)  # group_by=day, this month
    assert [(row["day"], *counts(row)) for row in by_day["rows"]] == [(TODAY, 4, 20, 7)]

    bob = await usage(h, BOB, group_by="user")  # not an admin: only his own row
    assert bob["everyone"] is False
    assert [(row["user"], *counts(row)) for row in bob["rows"]] == [("bob", 1, 5, 1)]
    assert counts({**bob["totals"]}) == (1, 5, 1)
    anon = await usage(h, ANON, group_by="model")
    assert counts(anon["totals"]) == (1, 5, 3)

    # /metrics counts the same tokens, whichever door they came through.
    m = await scrape(h.client, headers=ALICE)
    assert by_labels(m, "nexlm_input_tokens", "nexlm_input_tokens_total", "model") == {(MODEL,): 20}
    assert by_labels(m, "nexlm_output_tokens", "nexlm_output_tokens_total", "model") == {(MODEL,): 7}

    if kind == "redis":  # aggregates per owner and day, expiring after the retention
        from redis_servers import command

        port = request.getfixturevalue("redis_server").port
        ttl = int(command(port, "TTL", f"nexlm:usage:{{alice}}:{TODAY}").strip(":\r\n"))
        assert 399 * 86400 < ttl <= 402 * 86400
    if kind == "sqlite":  # one row per reply, with what the summary does not show
        db = sqlite3.connect(tmp_path / "nexlm.db")
        rows = db.execute("SELECT owner, model, provider, finish_reason, cached, estimated, client FROM usage "
                          "ORDER BY time").fetchall()
        db.close()
        assert [r[:6] for r in rows] == [("alice", MODEL, "fake", "stop", 0, 0), ("bob", MODEL, "fake", "stop", 0, 0),
                                         ("token-1", MODEL, "fake", "stop", 0, 0),
                                         ("alice", MODEL, "fake", "stop", 0, 0)]
        assert all(r[6] for r in rows)
    await h.check()


async def test_without_usage_from_the_upstream_tokens_are_estimated_and_marked(make_harness, upstream):
    h = await make_harness(USERS)
    upstream.push(reply("Hello", " world", usage=False))  # 11 characters: 3 tokens at 4 a token
    peer = await h.ws(headers=BOB)
    await peer.chat("a question of some forty characters, yes")
    await peer.until("done")
    await h.settle()
    body = await usage(h, BOB, group_by="model")
    assert body["totals"]["estimated_replies"] == 1
    assert body["totals"]["output_tokens"] == 3
    assert body["totals"]["input_tokens"] >= 10  # the question's 40 characters, and whatever context goes with it
    await h.check()


async def test_who_may_see_usage(make_harness, upstream):
    h = await make_harness()  # no access control at all: one user, who sees everything
    upstream.push(reply("a"))
    peer = await h.ws()
    await peer.chat("hi")
    await peer.until("done")
    await h.settle()
    body = await usage(h, None, group_by="user")
    assert body["everyone"] is True and body["user"] is None
    assert [(row["user"], *counts(row)) for row in body["rows"]] == [(None, 1, 5, 1)]
    for bad in ({"group_by": "owner"}, {"from": "yesterday"}, {"from": "2026-02-01", "to": "2026-01-01"},
                {"from": "2020-01-01", "to": "2026-01-01"}):
        r = await h.client.get("/api/usage", params=bad)
        assert r.status == 400 and (await r.json())["code"] == "bad_request", bad
    await h.check()

    users = await make_harness(USERS)
    assert (await users.client.get("/api/usage")).status == 401  # no token
    header = await make_harness('[auth]\ntrusted_user_header = "X-Forwarded-User"\n[server]\ntrusted_proxies = ["127.0.0.1"]')
    r = await header.client.get("/api/usage")  # auth is on (the header), but this request names nobody
    assert r.status == 403 and (await r.json())["code"] == "forbidden"
    r = await header.client.get("/api/usage", headers={"X-Forwarded-User": "carol"})
    assert r.status == 200 and (await r.json())["user"] == "carol"
    await header.check()  # (its baseline holds the other apps' tasks: one check covers the last app)


def test_period_defaults_to_this_month_in_utc():
    today = dt.date(2026, 12, 2)
    assert period({}, today) == (dt.date(2026, 12, 1), today, "day")
    assert period({"from": "2026-11-30T23:30:00-02:00", "to": "2026-12-01", "group_by": "model"}, today) == (
        dt.date(2026, 12, 1), dt.date(2026, 12, 1), "model")


async def test_memory_usage_is_bounded_by_keeping_the_newest_days():
    log = MemoryUsage(max_keys=3)
    now = dt.datetime.now(dt.timezone.utc).timestamp()
    for days_ago in range(5):
        await log.record(entry(now - days_ago * 86400))
    assert len(log.days) == 3
    wide = dt.date.today() - dt.timedelta(days=10), dt.date.today() + dt.timedelta(days=1)
    body = await log.query("alice", *wide, "day")
    assert [row["day"] for row in body["rows"]] == sorted(dt.datetime.fromtimestamp(now - d * 86400, dt.timezone.utc)
                                                          .date().isoformat() for d in range(3))


def entry(ts: float, owner="alice") -> UsageEntry:
    return UsageEntry(owner, "127.0.0.1", MODEL, "fake", 5, 2, "stop", False, False, ts)


async def test_sqlite_usage_survives_a_restart_and_refuses_a_newer_schema(tmp_path):
    path = str(tmp_path / "u.db")
    log = SQLiteUsage(path)
    await log.open()
    await log.record_many([entry(dt.datetime.now(dt.timezone.utc).timestamp()), entry(0, owner=None)])
    await log.close()
    again = SQLiteUsage(path)
    await again.open()
    today = dt.datetime.now(dt.timezone.utc).date()
    assert counts((await again.query("alice", today, today, "day"))["totals"]) == (1, 5, 2)
    await again.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 1  # the 1970 row was older than 400 days
    db.execute("UPDATE usage_schema SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="usage schema 99"):
        await SQLiteUsage(path).open()


async def test_redis_usage_adds_up_across_instances(redis_server):
    from redis_servers import command

    from nexlm.usage_redis import RedisUsage

    assert command(redis_server.port, "FLUSHALL").startswith("+OK")
    one, two = RedisUsage(redis_server.url), RedisUsage(redis_server.url)
    await one.open()
    await two.open()
    try:
        now = dt.datetime.now(dt.timezone.utc).timestamp()
        await asyncio.gather(one.record_many([entry(now)] * 3), two.record_many([entry(now), entry(now, owner="b c")]))
        today = dt.datetime.now(dt.timezone.utc).date()
        body = await two.query(None, today, today, "user")
        assert [(row["user"], *counts(row)) for row in body["rows"]] == [("alice", 4, 20, 8), ("b c", 1, 5, 2)]
        assert counts((await one.query("alice", today, today, "model"))["totals"]) == (4, 20, 8)
    finally:
        await one.close()
        await two.close()
