"""The original NexLM's HTTP routes on the gateway: ``POST /api/ai/chat`` (the reply as text,
or JSON) and ``GET /api/ai/chat/stream`` (raw text ``data:`` lines, then ``event: done``).
Refusals and failures before the first token are real HTTP statuses; a client that leaves
cancels the upstream request."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from conftest import extra_config
from fake_upstream import Script, chunk, error, reply
from nexlm.appkeys import CONVERSATIONS, GATEWAY
from nexlm.config import load_settings
from nexlm.providers.sse import SSEDecoder
from nexlm.server import create_app

TOKENS = '[auth]\ntokens = ["tok-A-7f3c9e"]'
ROLE = chunk("", role=True)
JSON = {"Accept": "application/json"}


async def events(resp) -> list[tuple[str, str]]:
    """The stream as (event, data) pairs, decoded by the spec-following decoder."""
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    dec = SSEDecoder()
    return [(e.event, e.data) for e in dec.feed(await resp.read())]


def settled(client) -> None:
    """Nothing left running or held: the gateway's turns and the reply slots."""
    assert client.app[GATEWAY].running == 0
    assert client.app[CONVERSATIONS].stats()["limiter_running"] == 0


async def test_post_answers_plain_text_or_json(make_client, upstream):
    client = await make_client()
    upstream.push(reply("Hello", " world"), reply("Bonjour", "!"))
    r = await client.post("/api/ai/chat", json={"message": "hi", "modelType": "fakey"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert await r.text() == "Hello world"
    r = await client.post("/api/ai/chat", json={"message": "salut"}, headers=JSON)
    assert r.status == 200
    assert await r.json() == {"reply": "Bonjour!", "model": "fake/fake-model", "finish_reason": "stop",
                              "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    bodies = [q["body"] for q in upstream.requests]
    assert [b["model"] for b in bodies] == ["fake-model", "fake-model"]
    assert bodies[0]["messages"] == [{"role": "user", "content": "hi"}]  # stateless: no earlier turns
    assert bodies[1]["messages"] == [{"role": "user", "content": "salut"}]
    assert client.app[CONVERSATIONS].stats()["sessions"] == 0  # nothing stored
    settled(client)


async def test_post_refusals_are_clear_statuses(make_client, upstream):
    client = await make_client("[limits]\nmax_message_chars = 50")
    cases = [
        (b"not json", 400, "not valid JSON"),
        (b"[1]", 400, "JSON object"),
        (b'{"message": "hi", "stream": true}', 400, "Unknown field 'stream'"),
        (b'{"modelType": "fakey"}', 400, "message is required"),
        (b'{"message": "   "}', 400, "message is empty"),
        (b'{"message": "hi", "modelType": 7}', 400, "modelType must be a string"),
        (b'{"message": "' + b"x" * 60 + b'"}', 413, "too long"),
        (b'{"message": "hi", "modelType": "nope"}', 404, "nope"),
    ]
    for body, status, words in cases:
        r = await client.post("/api/ai/chat", data=body, headers={"Content-Type": "application/json"})
        assert r.status == status, (body, r.status)
        assert words in await r.text(), body
    r = await client.post("/api/ai/chat", json={"message": "hi", "modelType": "nope"}, headers=JSON)
    assert r.status == 404 and (await r.json())["code"] == "unknown_model"
    assert upstream.requests == []
    settled(client)


async def test_post_upstream_failures(make_client, upstream):
    client = await make_client("[providers.fake]\nfirst_token_timeout = 0.3")
    upstream.push(error(500, "boom: internal details"), error(429, "slow down"),
                  Script([ROLE, chunk("half an ans"), "reset"]), Script(["hang"]))
    r = await client.post("/api/ai/chat", json={"message": "a"})
    text = await r.text()
    assert r.status == 502 and "500" in text and "internal details" not in text and "sk-test" not in text
    r = await client.post("/api/ai/chat", json={"message": "b"}, headers=JSON)
    assert r.status == 429 and (await r.json())["code"] == "rate_limited"
    r = await client.post("/api/ai/chat", json={"message": "c"})
    assert r.status == 502 and "half an ans" not in await r.text()  # a cut reply is not an answer
    r = await client.post("/api/ai/chat", json={"message": "d"}, headers=JSON)
    assert r.status == 504 and (await r.json())["code"] == "upstream_timeout"
    settled(client)


async def test_stream_data_lines_join_back_into_the_text(make_client, upstream):
    client = await make_client()
    upstream.push(reply("Hello, ", "two\nlines", "\n\n", " indented\r\nend"))
    r = await client.get("/api/ai/chat/stream", params={"prompt": "hi", "modelType": "fakey"})
    got = await events(r)
    *data, done = got
    assert all(kind == "message" for kind, _ in data)
    assert "".join(d for _, d in data) == "Hello, two\nlines\n\n indented\nend"  # a CR comes back as LF
    assert done[0] == "done" and '"finish_reason":"stop"' in done[1] and '"model":"fake/fake-model"' in done[1]
    assert upstream.requests[0]["body"]["messages"] == [{"role": "user", "content": "hi"}]
    settled(client)


async def test_stream_errors_before_and_after_the_first_token(make_client, upstream):
    client = await make_client()
    upstream.push(error(503, "down"), Script([ROLE, chunk("partial"), "reset"]))
    r = await client.get("/api/ai/chat/stream", params={"prompt": "a"})
    assert r.status == 502 and not r.headers["Content-Type"].startswith("text/event-stream")
    assert "503" in await r.text()
    r = await client.get("/api/ai/chat/stream", params={"prompt": "b"})
    got = await events(r)
    assert got[0] == ("message", "partial")
    assert got[1][0] == "error" and got[1][1]  # readable text
    assert got[2][0] == "done" and '"finish_reason":"error"' in got[2][1]
    for params, status in (({}, 400), ({"prompt": "x", "modelType": "nope"}, 404)):
        r = await client.get("/api/ai/chat/stream", params=params)
        assert r.status == status
    r = await client.head("/api/ai/chat/stream", params={"prompt": "a head request"})
    assert r.status == 405
    assert len(upstream.requests) == 2
    settled(client)


async def test_access_control_and_cross_site_gets(make_client, upstream):
    client = await make_client(TOKENS)
    bearer = {"Authorization": "Bearer tok-A-7f3c9e"}
    for method, path, kw in (("POST", "/api/ai/chat", {"json": {"message": "hi"}}),
                             ("GET", "/api/ai/chat/stream", {"params": {"prompt": "hi"}})):
        r = await client.request(method, path, **kw)
        assert r.status == 401, path
        r = await client.request(method, path, headers={"Authorization": "Bearer wrong-token"}, **kw)
        assert r.status == 401, path
        r = await client.request(method, path, headers=bearer, **kw)
        assert r.status == 200, path
        await r.read()
        # A cross-site page's <img>/<script> GET (no Origin) or POST must not spend the credits.
        r = await client.request(method, path, headers={**bearer, "Sec-Fetch-Site": "cross-site"}, **kw)
        assert r.status == 403, path
    assert len(upstream.requests) == 2
    settled(client)


async def test_client_limits_apply(make_client, upstream):
    client = await make_client("[limits]\nmessages_per_minute = 1")
    r = await client.post("/api/ai/chat", json={"message": "one"})
    assert r.status == 200
    r = await client.get("/api/ai/chat/stream", params={"prompt": "two"})
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert len(upstream.requests) == 1


async def _leave(client, method: str, path: str, kw: dict, mid: bool) -> None:
    async with client.request(method, path, **kw) as r:
        if mid:
            assert r.status == 200
            await r.content.readuntil(b"some text\n\n")  # the first token arrived
            raise asyncio.CancelledError  # then the client leaves, mid-stream
        await r.read()


async def test_a_client_that_leaves_cancels_the_upstream_request(make_client, upstream):
    client = await make_client()
    gate = asyncio.Event()  # never set: the upstream would wait forever
    for method, path, kw, first in (("POST", "/api/ai/chat", {"json": {"message": "post"}}, ["hang"]),
                                    ("GET", "/api/ai/chat/stream", {"params": {"prompt": "before"}}, ["hang"]),
                                    ("GET", "/api/ai/chat/stream", {"params": {"prompt": "mid"}},
                                     [ROLE, chunk("some text"), gate])):
        n = len(upstream.requests)
        upstream.push(Script(first))

        mid = first[0] is ROLE
        task = asyncio.create_task(_leave(client, method, path, kw, mid))
        await upstream.wait_requests(n + 1)
        if not mid:
            task.cancel()  # before any answer: while waiting for the headers
        await asyncio.gather(task, return_exceptions=True)
        await upstream.wait_closed(n + 1)
        assert upstream.cut_by_client == n + 1, path
    # (the slots come back when the cancelled handlers have unwound)
    async with asyncio.timeout(5):
        while client.app[GATEWAY].running or client.app[CONVERSATIONS].stats()["limiter_running"]:
            await asyncio.sleep(0.01)
    settled(client)


async def test_shutdown_ends_running_turns_with_a_readable_answer(make_client, upstream):
    client = await make_client()
    upstream.push(Script([ROLE, chunk("first"), "hang"]), Script(["hang"]))
    r = await client.get("/api/ai/chat/stream", params={"prompt": "streaming"})
    assert r.status == 200
    await r.content.readuntil(b"first\n\n")
    post = asyncio.create_task(client.post("/api/ai/chat", json={"message": "waiting"}))
    await upstream.wait_requests(2)
    await client.app[GATEWAY].close(0.05)
    await upstream.wait_closed(2)
    rest = SSEDecoder().feed(await r.read())
    assert [e.event for e in rest] == ["error", "done"] and "restarting" in rest[0].data
    answer = await post
    assert answer.status == 503 and "restarting" in await answer.text() and answer.headers["Retry-After"]
    r = await client.post("/api/ai/chat", json={"message": "after"})
    assert r.status == 503  # and no new turn starts
    settled(client)


async def test_leaving_is_noticed_without_handler_cancellation(upstream, tmp_path):
    """aiohttp's default (handler_cancellation off): /v1's Watch stops the turn here too."""
    path = tmp_path / "nexlm.toml"
    path.write_text(extra_config(upstream.url, ""))
    app = create_app(load_settings(str(path), env={}))
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as http:
            for n, (method, path, kw) in enumerate((("POST", "/api/ai/chat", {"json": {"message": "a"}}),
                                                    ("GET", "/api/ai/chat/stream", {"params": {"prompt": "b"}})), 1):
                upstream.push(Script(["hang"]))
                task = asyncio.create_task(http.request(method, f"http://127.0.0.1:{port}{path}", **kw))
                await upstream.wait_requests(n)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await upstream.wait_closed(n)
        async with asyncio.timeout(5):
            while app[CONVERSATIONS].stats()["limiter_running"]:
                await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()


async def test_cors_for_a_listed_origin_only(make_client, upstream):
    page = "http://127.0.0.1:5500"
    client = await make_client(f'[server]\nallowed_origins = ["{page}"]')
    r = await client.options("/api/ai/chat", headers={"Origin": page, "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "content-type"})
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == page
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Headers"] == "content-type"
    r = await client.post("/api/ai/chat", json={"message": "hi"}, headers={"Origin": page})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == page and await r.text() == "Hello world"
    r = await client.get("/api/ai/chat/stream", params={"prompt": "hi"}, headers={"Origin": page})
    assert r.headers["Access-Control-Allow-Origin"] == page
    *data, done = await events(r)
    assert "".join(d for _, d in data) == "Hello world" and done[0] == "done"
    other = "http://127.0.0.1:5501"
    r = await client.options("/api/ai/chat", headers={"Origin": other, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = await client.post("/api/ai/chat", json={"message": "hi"}, headers={"Origin": other})
    assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    assert len(upstream.requests) == 2
