"""Quotas through the front doors: /v1 (429 and 403 in OpenAI's envelope), /ws and /sse (error
events), the seed's HTTP route; refused before the upstream sees anything; counted when a reply
ends; shared by two instances on one Redis."""

from __future__ import annotations

import calendar

import pytest
from conftest import WS
from fake_upstream import Script, chunk, reply
from redis_servers import command

from nexlm.appkeys import GATEWAY
from nexlm.quotas import periods

TOKENS = {"alice": "alice-token-000000001", "bob": "bob-token-0000000002", "carol": "carol-token-000000003"}
USERS = f"""
[auth.users.alice]
token = "{TOKENS['alice']}"
groups = ["staff"]
[auth.users.bob]
token = "{TOKENS['bob']}"
[auth.users.carol]
token = "{TOKENS['carol']}"
groups = ["staff"]
"""
RULES = USERS + """
[quotas.default]
messages_per_day = 1
models = ["fake/fake-model"]
[quotas.group.staff]
messages_per_day = 2
[quotas.user.carol]
messages_per_day = 3
"""
NOW = float(calendar.timegm((2026, 12, 2, 21, 30, 0)))  # 2 h 30 min before the next UTC midnight


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def set_clock(client, t: float = NOW):
    quotas = client.app[GATEWAY].admission.quotas
    quotas.clock = lambda: t
    return quotas


async def ask(client, name: str, model: str = "fake/fake-model", **kw):
    return await client.post("/v1/chat/completions", headers=auth(name), **kw,
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def store_env(request, tmp_path):
    kind = getattr(request, "param", "memory")
    if kind == "sqlite":
        return {"NEXLM_STORE": f"sqlite:{tmp_path / 'nexlm.db'}"}
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        assert command(server.port, "FLUSHALL").startswith("+OK")
        return {"NEXLM_STORE": server.url}
    return {}


@pytest.mark.parametrize("store_env", ["memory", "sqlite", "redis"], indirect=True)
async def test_user_over_group_over_default_on_v1_and_the_refusal_never_reaches_upstream(
        make_client, upstream, store_env):
    client = await make_client(RULES, env=store_env)
    set_clock(client)
    allowed = {"bob": 1, "alice": 2, "carol": 3}  # default, group staff, user carol (also in staff)
    for name, n in allowed.items():
        for _ in range(n):
            r = await ask(client, name)
            assert r.status == 200, await r.text()
        sent = len(upstream.requests)
        r = await ask(client, name)
        assert r.status == 429
        body = await r.json()
        assert body["error"]["code"] == "quota_exceeded" and body["error"]["type"] == "rate_limit_error"
        assert f"{n} messages per day" in body["error"]["message"]
        assert "2026-12-03T00:00:00Z" in body["error"]["message"]
        assert r.headers["Retry-After"] == str(9000)  # 2 h 30 min
        assert len(upstream.requests) == sent, "a refused request must not reach the upstream"
    assert len(upstream.requests) == 6


async def test_the_day_resets_at_utc_midnight(make_client):
    client = await make_client(RULES)
    quotas = set_clock(client)
    assert (await ask(client, "bob")).status == 200
    assert (await ask(client, "bob")).status == 429
    quotas.clock = lambda: float(calendar.timegm((2026, 12, 3, 0, 0, 1)))
    assert (await ask(client, "bob")).status == 200


async def test_a_model_outside_the_list_is_forbidden_on_v1(make_client, upstream):
    client = await make_client(RULES)
    r = await ask(client, "bob", "fake/fake-reasoner")
    assert r.status == 403
    body = await r.json()
    assert body["error"]["code"] == "forbidden_model" and body["error"]["type"] == "permission_error"
    assert "fake/fake-reasoner" in body["error"]["message"]
    r = await client.post("/v1/responses", headers=auth("bob"), json={"model": "fake/fake-reasoner", "input": "hi"})
    assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden_model"
    r = await ask(client, "bob", "fakey")  # an alias is judged by the model it resolves to: fake/fake-model
    assert r.status == 200
    assert [req["body"]["model"] for req in upstream.requests] == ["fake-model"]


@pytest.mark.parametrize("store_env", ["memory", "sqlite", "redis"], indirect=True)
async def test_ws_says_forbidden_model_and_quota_exceeded_as_error_events(make_client, upstream, store_env):
    client = await make_client(RULES, env=store_env)
    set_clock(client)
    ws = WS(await client.ws_connect("/ws", headers=auth("bob")))
    await ws.recv()  # the session frame
    await ws.send({"type": "chat", "message": "hi", "model": "fake/fake-reasoner"})
    err = (await ws.until("error"))[-1]
    assert err["code"] == "forbidden_model"
    await ws.send({"type": "chat", "message": "hi"})
    await ws.until("done")
    await ws.send({"type": "chat", "message": "again"})
    err = (await ws.until("error"))[-1]
    assert err["code"] == "quota_exceeded" and "2026-12-03T00:00:00Z" in err["message"]
    await ws.close()
    assert len(upstream.requests) == 1


async def test_sse_and_the_seed_route_refuse_with_429_and_retry_after(make_client, upstream):
    client = await make_client(RULES)
    set_clock(client)
    r = await client.post("/sse", headers=auth("bob"), json={"message": "hi"})
    assert r.status == 200
    await r.read()
    r = await client.post("/sse", headers=auth("bob"), json={"message": "again"})
    assert r.status == 429 and r.headers["Retry-After"] == "9000"
    assert (await r.json())["code"] == "quota_exceeded"
    r = await client.post("/api/ai/chat", headers={**auth("bob"), "Accept": "application/json"},
                          json={"message": "hi"})
    assert r.status == 429 and r.headers["Retry-After"] == "9000"
    assert (await r.json())["code"] == "quota_exceeded"
    assert len(upstream.requests) == 1


async def test_a_running_reply_finishes_and_is_counted_when_it_ends(make_client, upstream):
    client = await make_client(USERS + "[quotas.default]\ntokens_per_day = 5\n")
    quotas = set_clock(client)
    upstream.push(reply("a", "b", "c", "d", "e"))  # usage: 5 prompt + 5 completion, past the cap of 5
    r = await ask(client, "bob")
    assert r.status == 200
    assert (await r.json())["choices"][0]["message"]["content"] == "abcde"  # not cut at the cap
    spent = await quotas.counters.read("bob", periods(NOW))
    assert (spent.tokens_day, spent.messages_day) == (10, 1)
    assert (await ask(client, "bob")).status == 429


async def test_without_usage_the_tokens_are_estimated_from_the_text(make_client, upstream):
    client = await make_client(USERS + "[quotas.default]\ntokens_per_day = 1000\n")
    quotas = set_clock(client)
    upstream.push(Script([chunk("", role=True), chunk("Hello world!"), chunk(finish="stop"), b"data: [DONE]\n\n"]))
    assert (await ask(client, "bob")).status == 200
    spent = await quotas.counters.read("bob", periods(NOW))
    assert spent.tokens_day == 4  # "hi" + "Hello world!": 14 characters, about 4 tokens


async def test_anonymous_tokens_have_quotas_by_their_names_and_auth_off_has_none(make_client, upstream):
    client = await make_client('[auth]\ntokens = ["anon-token-one-0001", "anon-token-two-0002"]\n'
                               "[quotas.user.token-1]\nmessages_per_day = 1\n")
    body = {"model": "fake/fake-model", "messages": [{"role": "user", "content": "hi"}]}
    one, two = {"Authorization": "Bearer anon-token-one-0001"}, {"Authorization": "Bearer anon-token-two-0002"}
    assert (await client.post("/v1/chat/completions", headers=one, json=body)).status == 200
    assert (await client.post("/v1/chat/completions", headers=one, json=body)).status == 429
    assert (await client.post("/v1/chat/completions", headers=two, json=body)).status == 200
    assert (await client.post("/v1/chat/completions", headers=two, json=body)).status == 200

    open_server = await make_client("[quotas.default]\nmessages_per_day = 1\n")  # no credentials configured
    for _ in range(2):
        assert (await open_server.post("/v1/chat/completions", json=body)).status == 200


async def test_two_instances_on_one_redis_share_the_counts(make_client, upstream, redis_server):
    assert command(redis_server.port, "FLUSHALL").startswith("+OK")
    env = {"NEXLM_STORE": redis_server.url}
    a, b = await make_client(RULES, env=env), await make_client(RULES, env=env)
    qa, qb = set_clock(a), set_clock(b)
    assert (await ask(a, "alice")).status == 200  # staff: 2 a day
    await qa.settle()  # a's count is in Redis (written off the reply's path)
    assert (await ask(b, "alice")).status == 200
    await qb.settle()
    sent = len(upstream.requests)
    for instance in (a, b):
        r = await ask(instance, "alice")
        assert r.status == 429 and "2 messages per day" in (await r.json())["error"]["message"]
    assert len(upstream.requests) == sent == 2
    spent = await qa.counters.read("alice", periods(NOW))
    assert (spent.messages_day, spent.tokens_day) == (2, 14)  # the fake's usage: 5 + 2, twice
