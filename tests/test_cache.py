"""The response cache ([cache]): a hit replays the miss exactly with no upstream call, on /v1, the
seed routes and /ws, per owner, only for deterministic requests and complete replies, with
Cache-Control and params bypasses; the backends' TTL and eviction (memory, SQLite, Redis)."""

from __future__ import annotations

import asyncio

import pytest
from fake_upstream import Script, chunk, error, from_fixture, reply

from nexlm.appkeys import GATEWAY
from nexlm.cache import ResponseCache, cache_key, cacheable
from nexlm.cache_backends import MemoryCache, RedisCache, SQLiteCache
from nexlm.config import CacheConfig
from nexlm.providers.base import ChatRequest, Params
from nexlm.store_sqlite import SQLiteStore

A, B = "cache-tok-A-5e1f0c", "cache-tok-B-9a7d33"
AUTH_A, AUTH_B = {"Authorization": f"Bearer {A}"}, {"Authorization": f"Bearer {B}"}
HI = [{"role": "user", "content": "Hi"}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_toml(request, tmp_path):
    if request.param == "sqlite":
        return f'[store]\nkind = "sqlite"\npath = "{tmp_path / "c.db"}"\n'
    if request.param == "redis":
        from redis_servers import command

        server = request.getfixturevalue("redis_server")
        assert command(server.port, "FLUSHALL").startswith("+OK")
        return f'[store]\nkind = "redis"\nurl = "{server.url}"\n'
    return ""


@pytest.fixture
def app_with_cache(make_client, store_toml):
    async def make(extra: str = ""):
        return await make_client(store_toml + "[cache]\nenabled = true\n" + extra)
    return make


async def v1(client, body: dict, headers: dict | None = None):
    """POST /v1/chat/completions (not streamed), then wait for the cache's write: (status, header, json)."""
    r = await client.post("/v1/chat/completions", json={"model": "fakey", "messages": HI, **body},
                          headers=headers or {})
    data = await r.json()
    await client.app[GATEWAY].cache.flush()
    return r.status, r.headers.get("x-nexlm-cache"), data


async def test_a_hit_replays_text_and_reasoning_without_the_upstream(app_with_cache, upstream):
    client = await app_with_cache()
    upstream.push(from_fixture("deepseek-reasoner-stream.txt"))
    s1, h1, miss = await v1(client, {"temperature": 0})
    s2, h2, hit = await v1(client, {"temperature": 0})
    assert (s1, h1, s2, h2) == (200, "miss", 200, "hit")
    assert len(upstream.requests) == 1
    m1, m2 = miss["choices"][0]["message"], hit["choices"][0]["message"]
    assert m1["content"] == "2+2 = 4。" and m2["content"] == m1["content"]
    assert m2["reasoning_content"] == m1["reasoning_content"] == "用户问的是 2+2。"
    assert hit["usage"] == miss["usage"] and hit["choices"][0]["finish_reason"] == "stop"
    metrics = await (await client.get("/metrics")).text()
    assert "nexlm_cache_hits_total 1.0" in metrics and "nexlm_cache_misses_total 1.0" in metrics
    completion = miss["usage"]["completion_tokens"]  # counted once: the hit cost the upstream nothing
    assert f'nexlm_output_tokens_total{{model="fake/fake-model"}} {float(completion)}' in metrics
    stored = [line for line in metrics.splitlines() if line.startswith("nexlm_cache_stored_bytes_total")]
    assert stored and float(stored[0].split()[1]) > 0


async def test_a_streamed_hit_of_tool_calls_equals_the_miss(app_with_cache, upstream):
    client = await app_with_cache()
    upstream.push(from_fixture("openai-tool-calls-stream.txt"))
    bodies = []
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json={"model": "fakey", "messages": HI, "seed": 7,
                                                            "tools": WEATHER, "stream": True})
        assert r.status == 200
        bodies.append((r.headers["x-nexlm-cache"], calls_of(await r.text())))
        await client.app[GATEWAY].cache.flush()
    assert [b[0] for b in bodies] == ["miss", "hit"]
    assert bodies[0][1] == bodies[1][1] == {0: ["call_Wq1A9", "get_weather", '{"location": "Paris"}'],
                                            1: ["call_Zk7B2", "get_time", '{"tz": "Europe/Paris"}']}
    assert len(upstream.requests) == 1


def calls_of(sse: str) -> dict:
    import json

    calls: dict[int, list] = {}
    for line in sse.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                for tc in choice["delta"].get("tool_calls") or []:
                    call = calls.setdefault(tc["index"], [None, None, ""])
                    if tc.get("id"):
                        call[0], call[1] = tc["id"], tc["function"]["name"]
                    call[2] += tc["function"].get("arguments") or ""
    return calls


async def test_the_responses_api_hits_too(app_with_cache, upstream):
    client = await app_with_cache()
    upstream.push(from_fixture("deepseek-reasoner-stream.txt"))
    seen = []
    for _ in range(2):
        r = await client.post("/v1/responses", json={"model": "fakey", "input": "Hi", "temperature": 0})
        assert r.status == 200
        data = await r.json()
        texts = [(item["type"], part["text"]) for item in data["output"]
                 for part in item.get("content") or item.get("summary") or []]
        seen.append((r.headers["x-nexlm-cache"], texts))
        await client.app[GATEWAY].cache.flush()
    assert [s[0] for s in seen] == ["miss", "hit"]
    assert seen[0][1] == seen[1][1] and ("message", "2+2 = 4。") in seen[1][1]
    assert len(upstream.requests) == 1


async def test_entries_are_per_owner(app_with_cache, upstream):
    client = await app_with_cache(f'[auth]\ntokens = ["{A}", "{B}"]')
    upstream.push(reply("for A"), reply("for B"))
    assert (await v1(client, {"temperature": 0}, AUTH_A))[1] == "miss"
    _, h, data = await v1(client, {"temperature": 0}, AUTH_B)
    assert h == "miss" and data["choices"][0]["message"]["content"] == "for B"
    _, h, data = await v1(client, {"temperature": 0}, AUTH_A)
    assert h == "hit" and data["choices"][0]["message"]["content"] == "for A"
    assert len(upstream.requests) == 2


async def test_shared_entries_answer_every_owner(app_with_cache, upstream):
    client = await app_with_cache(f'shared = true\n[auth]\ntokens = ["{A}", "{B}"]')
    upstream.push(reply("for all"))
    await v1(client, {"temperature": 0}, AUTH_A)
    _, h, data = await v1(client, {"temperature": 0}, AUTH_B)
    assert h == "hit" and data["choices"][0]["message"]["content"] == "for all"


async def test_a_random_temperature_is_not_cached_unless_seeded(app_with_cache, upstream):
    client = await app_with_cache()
    for _ in range(2):
        assert (await v1(client, {"temperature": 0.7}))[1] == "bypass"
    assert len(upstream.requests) == 2
    assert (await v1(client, {"temperature": 0.7, "seed": 1}))[1] == "miss"
    assert (await v1(client, {"temperature": 0.7, "seed": 1}))[1] == "hit"
    assert len(upstream.requests) == 3


async def test_any_temperature_caches_every_request(app_with_cache, upstream):
    client = await app_with_cache("any_temperature = true")
    await v1(client, {"temperature": 0.7})
    assert (await v1(client, {"temperature": 0.7}))[1] == "hit"
    assert (await v1(client, {}))[1] == "miss"  # no temperature at all: another entry, cached too


async def test_a_changed_parameter_or_message_is_another_entry(app_with_cache, upstream):
    client = await app_with_cache()
    await v1(client, {"temperature": 0})
    assert (await v1(client, {"temperature": 0, "max_tokens": 9}))[1] == "miss"
    assert (await v1(client, {"temperature": 0, "messages": [{"role": "user", "content": "Hi!"}]}))[1] == "miss"
    assert (await v1(client, {"temperature": 0, "model": "fake/fake-reasoner"}))[1] == "miss"
    assert len(upstream.requests) == 4


@pytest.mark.parametrize("script", [
    error(500, "upstream broke"),
    reply("cut", finish="length"),
    Script([chunk("", role=True), chunk("half"), "reset"]),
], ids=["error", "length", "reset"])
async def test_incomplete_replies_are_not_stored(app_with_cache, upstream, script):
    client = await app_with_cache()
    upstream.push(script)
    await v1(client, {"temperature": 0})
    _, h, data = await v1(client, {"temperature": 0})
    assert h == "miss" and data["choices"][0]["message"]["content"] == "Hello world"
    assert len(upstream.requests) == 2


async def test_cache_control_no_cache_and_no_store(app_with_cache, upstream):
    client = await app_with_cache()
    await v1(client, {"temperature": 0}, {"Cache-Control": "no-store"})
    assert (await v1(client, {"temperature": 0}))[1] == "miss"  # the no-store reply was not kept
    assert len(upstream.requests) == 2
    assert (await v1(client, {"temperature": 0}, {"Cache-Control": "no-cache"}))[1] == "bypass"
    assert len(upstream.requests) == 3  # not read...
    assert (await v1(client, {"temperature": 0}))[1] == "hit"


async def test_the_seed_http_route_uses_the_cache(make_client, upstream):
    client = await make_client('[cache]\nenabled = true\nany_temperature = true')
    texts = []
    for cc in ("", "", "no-cache"):
        r = await client.post("/api/ai/chat", json={"message": "hi"}, headers={"Cache-Control": cc} if cc else {})
        texts.append((r.headers.get("x-nexlm-cache"), await r.text()))
        await client.app[GATEWAY].cache.flush()
    assert [t[0] for t in texts] == ["miss", "hit", "bypass"] and texts[0][1] == texts[1][1]
    assert len(upstream.requests) == 2


async def test_off_by_default_no_header(make_client, upstream):
    client = await make_client()
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json={"model": "fakey", "messages": HI, "temperature": 0})
        assert r.status == 200 and "x-nexlm-cache" not in r.headers
    assert len(upstream.requests) == 2


# --------------------------------------------------------------------------- /ws

async def chat_ws(client, params: dict, message: str = "hi") -> list[dict]:
    ws = await client.ws_connect("/ws")
    try:
        assert (await ws.receive_json(timeout=5))["type"] == "session"
        await ws.send_json({"type": "chat", "message": message, "params": params})
        frames = []
        while not frames or frames[-1]["type"] != "done":
            frames.append(await ws.receive_json(timeout=5))
        await client.app[GATEWAY].cache.flush()
        return frames
    finally:
        await ws.close()


async def test_ws_done_says_cached_and_the_text_is_the_same(app_with_cache, upstream):
    client = await app_with_cache()
    upstream.push(from_fixture("deepseek-reasoner-stream.txt"))
    miss = await chat_ws(client, {"temperature": 0})
    hit = await chat_ws(client, {"temperature": 0})
    assert "cached" not in miss[-1] and hit[-1]["cached"] is True
    for kind in ("delta", "reasoning"):
        assert "".join(f["content"] for f in hit if f["type"] == kind) == \
               "".join(f["content"] for f in miss if f["type"] == kind) != ""
    assert hit[-1]["usage"] == miss[-1]["usage"] and hit[-1]["finish_reason"] == "stop"
    assert len(upstream.requests) == 1
    # The same question through /v1 (same upstream messages): the entry answers it too.
    assert (await v1(client, {"temperature": 0, "messages": [{"role": "user", "content": "hi"}]}))[1] == "hit"


async def test_ws_params_cache_false_bypasses(app_with_cache, upstream):
    client = await app_with_cache()
    await chat_ws(client, {"temperature": 0})
    frames = await chat_ws(client, {"temperature": 0, "cache": False})
    assert "cached" not in frames[-1] and len(upstream.requests) == 2
    ws = await client.ws_connect("/ws")
    await ws.receive_json(timeout=5)
    await ws.send_json({"type": "chat", "message": "hi", "params": {"cache": "no"}})
    assert (await ws.receive_json(timeout=5))["message"] == "cache must be true or false"
    await ws.close()


async def test_sse_done_says_cached_and_params_cache_false_bypasses(app_with_cache, upstream):
    import json

    async def ask(params):
        r = await client.post("/sse", json={"message": "hi", "params": params})
        events = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: ")]
        done = [e for e in events if e["type"] == "done"]
        await client.app[GATEWAY].cache.flush()
        return done[-1]

    client = await app_with_cache()
    assert "cached" not in await ask({"temperature": 0})
    assert (await ask({"temperature": 0}))["cached"] is True
    assert "cached" not in await ask({"temperature": 0, "cache": False})
    assert len(upstream.requests) == 2


async def test_a_stopped_ws_reply_is_not_stored(app_with_cache, upstream):
    client = await app_with_cache()
    upstream.push(Script([chunk("", role=True), chunk("partial"), "hang"]))
    ws = await client.ws_connect("/ws")
    await ws.receive_json(timeout=5)
    await ws.send_json({"type": "chat", "message": "hi", "params": {"temperature": 0}})
    while (await ws.receive_json(timeout=5))["type"] != "delta":
        pass
    await ws.send_json({"type": "stop"})
    while (f := await ws.receive_json(timeout=5))["type"] != "done":
        pass
    assert f["finish_reason"] == "stopped"
    await ws.close()
    await client.app[GATEWAY].cache.flush()
    frames = await chat_ws(client, {"temperature": 0})
    assert "cached" not in frames[-1] and len(upstream.requests) == 2


# --------------------------------------------------------------------------- policy and backends

def test_the_key_covers_what_shapes_the_answer():
    req = ChatRequest("m", HI, Params(0), {"tools": WEATHER})
    base = cache_key("p/m", req, "alice", False)
    assert base == cache_key("p/m", ChatRequest("m", [dict(HI[0])], Params(0.0), {"tools": WEATHER}), "alice", False)
    assert base != cache_key("p/m", req, "bob", False)
    assert cache_key("p/m", req, "alice", True) == cache_key("p/m", req, "bob", True)
    assert base != cache_key("p/m2", req, "alice", False)
    assert base != cache_key("p/m", ChatRequest("m", HI, Params(0), {}), "alice", False)
    assert base != cache_key("p/m", ChatRequest("m", HI, Params(0, top_p=0.5), {"tools": WEATHER}), "alice", False)
    assert cacheable(req, False) and cacheable(ChatRequest("m", HI, Params(0.7), {"seed": 0}), False)
    assert not cacheable(ChatRequest("m", HI, Params(0.7), {}), False)
    assert not cacheable(ChatRequest("m", HI, Params(), {}), False)  # the upstream's default is not 0
    assert cacheable(ChatRequest("m", HI, Params(0.7), {}), True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request, tmp_path):
    clock = Clock()
    if request.param == "memory":
        yield MemoryCache(10, 3, clock), clock
        return
    store = SQLiteStore(str(tmp_path / "b.db"), 60, 100, 100, in_use=lambda cid: False)
    await store.open()
    cache = SQLiteCache(store, 10, 3, clock)
    await cache.open()
    yield cache, clock
    await store.close()


async def test_ttl_expiry(backend):
    cache, clock = backend
    await cache.put("o", "k", b"v")
    clock.now += 9.9
    assert await cache.get("o", "k") == b"v"
    clock.now += 0.2
    assert await cache.get("o", "k") is None


async def test_least_recently_used_evicted_past_max_entries(backend):
    cache, clock = backend
    for i in range(3):
        clock.now += 1
        await cache.put("o", f"k{i}", b"%d" % i)
    clock.now += 1
    assert await cache.get("o", "k0") == b"0"  # used: k1 is now the least recent
    clock.now += 1
    await cache.put("o", "k3", b"3")
    got = [await cache.get("o", f"k{i}") for i in range(4)]
    assert got == [b"0", None, b"2", b"3"]


async def test_redis_entries_expire_and_are_hash_tagged_per_owner(redis_server):
    from redis_servers import command

    from nexlm.redis_conn import connect

    assert command(redis_server.port, "FLUSHALL").startswith("+OK")

    class Store:  # what RedisCache needs of the store: its client
        pass

    store = Store()
    conn = await connect(redis_server.url)
    store.client = conn.client
    try:
        cache = RedisCache(store, 30)
        await cache.put("alice", "abc", b"v")
        assert await cache.get("alice", "abc") == b"v"
        assert await cache.get("bob", "abc") is None
        assert 0 < await conn.client.ttl("nexlm:cache:{alice}:abc") <= 30
        await conn.client.pexpire("nexlm:cache:{alice}:abc", 1)
        while await conn.client.exists("nexlm:cache:{alice}:abc"):
            await asyncio.sleep(0.01)
        assert await cache.get("alice", "abc") is None
    finally:
        await conn.close()


async def test_a_failing_backend_is_a_miss_not_a_failed_reply():
    class Broken:
        async def get(self, owner, key):
            raise OSError("disk gone")

        async def put(self, owner, key, value):
            raise OSError("disk gone")

    cache = ResponseCache(CacheConfig(enabled=True), Broken())
    slot = cache.slot("o", "p/m", ChatRequest("m", HI, Params(0), {}))
    assert await slot.load() is None and slot.status == "miss"
    slot.done({}, "stop", True)
    await cache.flush()  # the write failed quietly


# --------------------------------------------------------------------------- config

def test_cache_config_defaults_and_checks(tmp_path):
    from nexlm.config import ConfigError, load_settings

    path = tmp_path / "c.toml"
    assert load_settings(None, env={}).cache == CacheConfig(False, 86400.0, 10000, False, False)
    path.write_text("[cache]\nenabled = true\nttl_seconds = 60\nmax_entries = 5\nshared = true\n")
    c = load_settings(str(path), env={}).cache
    assert (c.enabled, c.ttl_seconds, c.max_entries, c.shared, c.any_temperature) == (True, 60.0, 5, True, False)
    for body, why in (("ttl_seconds = 0", "[cache] ttl_seconds: must be > 0"),
                      ("max_entries = 0", "[cache] max_entries: must be >= 1"),
                      ("enabled = 1", "[cache].enabled: expected true or false"),
                      ("size = 3", "[cache]")):
        path.write_text(f"[cache]\n{body}\n")
        with pytest.raises(ConfigError) as err:
            load_settings(str(path), env={})
        assert why in str(err.value)


async def test_no_cache_and_no_store_together_leave_the_cache_alone(make_client, upstream):
    client = await make_client("[cache]\nenabled = true")
    both = {"Cache-Control": "no-cache, no-store"}
    assert (await v1(client, {"temperature": 0}, both))[1] == "bypass"
    assert (await v1(client, {"temperature": 0}))[1] == "miss"
    assert len(upstream.requests) == 2
