"""``[compat] seed_frames``: ``/api/ai/chat/websocket`` as the seed article's page spoke it.

Plain text frames out (each delta's raw text; an error's message), ``{"modelType",
"message", "token"}`` frames in; with access control on, the token comes in the first frame
and nothing happens for the client before it is checked (throttled like other guesses).
"""

from __future__ import annotations

import asyncio
import logging

import jwt as pyjwt
import pytest
from aiohttp import WSMsgType, WSServerHandshakeError

from fake_upstream import Script, chunk, reply
from nexlm.appkeys import CONVERSATIONS
from nexlm.security import principal_of
from test_jwt import ENV, HS, SECRET, claims

SEED = "[compat]\nseed_frames = true"
TOKENS = '[auth]\ntokens = ["tok-A-7f3c9e", "tok-B-21d8aa"]'
ROUTE = "/api/ai/chat/websocket"


async def texts_until(sock, predicate, timeout: float = 5.0) -> list[str]:
    """Text frames until ``predicate(joined text)``: the seed's page has no end-of-reply frame."""
    out: list[str] = []
    async with asyncio.timeout(timeout):
        while not predicate("".join(out)):
            msg = await sock.receive()
            assert msg.type == WSMsgType.TEXT, f"expected a text frame, got {msg.type.name} {msg.data!r}"
            out.append(msg.data)
    return out


async def closed(sock, timeout: float = 5.0):
    """The next frame must be the server's close: (code, texts sent before it)."""
    texts = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await sock.receive()
            if msg.type == WSMsgType.TEXT:
                texts.append(msg.data)
                continue
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), msg
            return sock.close_code, texts


def stats(client) -> dict:
    return client.app[CONVERSATIONS].stats()


async def idle(client, timeout: float = 5.0) -> None:
    """Until no reply runs: the seed's frames have no end-of-reply, the server's state does."""
    async with asyncio.timeout(timeout):
        while stats(client)["replies_running"]:
            await asyncio.sleep(0.01)


async def test_seed_frames_are_plain_text_and_model_type_resolves(make_client, upstream):
    client = await make_client(SEED)
    upstream.push(reply("Hello", " wor", "ld\n", "next line"), reply("again"))
    sock = await client.ws_connect(ROUTE)
    await sock.send_json({"modelType": "fakey", "message": "hi seed"})  # fakey: an alias of fake/fake-model
    frames = await texts_until(sock, lambda t: t.endswith("next line"))
    assert "".join(frames) == "Hello world\nnext line"
    assert not any(f.startswith("{") for f in frames), f"a JSON frame reached the seed's page: {frames}"
    body = upstream.requests[0]["body"]
    assert body["model"] == "fake-model" and body["messages"][-1] == {"role": "user", "content": "hi seed"}
    # The same socket is a conversation: the second message is sent with the first turn.
    await idle(client)
    await sock.send_json({"modelType": "fake/fake-model", "message": "second"})
    assert "".join(await texts_until(sock, lambda t: t == "again")) == "again"
    msgs = upstream.requests[1]["body"]["messages"]
    assert [m["content"] for m in msgs] == ["hi seed", "Hello world\nnext line", "second"]
    await sock.close()


async def test_errors_are_readable_text_frames(make_client, upstream):
    client = await make_client(SEED)
    sock = await client.ws_connect(ROUTE)
    await sock.send_json({"modelType": "nope", "message": "hi"})
    [text] = await texts_until(sock, bool)
    assert text.startswith("Error: ") and "nope" in text and "{" not in text
    await sock.send_str("[1, 2]")
    [text] = await texts_until(sock, bool)
    assert text.startswith("Error: ") and "modelType" in text
    await sock.send_json({"modelType": 7, "message": "hi"})
    [text] = await texts_until(sock, bool)
    assert text == "Error: modelType must be a string (a model id or alias)"
    # Mid-reply: the failure on a paragraph of its own, after the text that came.
    upstream.push(Script([chunk("", role=True), chunk("partial"), "reset"]))
    await sock.send_json({"modelType": "fakey", "message": "fail me"})
    frames = await texts_until(sock, lambda t: "Error: " in t)
    joined = "".join(frames)
    assert joined.startswith("partial\n\nError: ") and "sk-test" not in joined
    await sock.close()
    assert len(upstream.requests) == 1  # the refused frames reached no upstream


async def test_without_seed_frames_the_route_is_ws(make_client):
    client = await make_client()
    sock = await client.ws_connect(ROUTE)
    first = await sock.receive_json(timeout=5)
    assert first["type"] == "session"
    await sock.close()


async def test_token_in_the_first_frame(make_client, upstream):
    client = await make_client(SEED + "\n" + TOKENS)
    sock = await client.ws_connect(ROUTE)  # no credentials on the upgrade: the seed's page has none
    assert stats(client)["sessions"] == 0
    await sock.send_json({"modelType": "fakey", "message": "hi", "token": "tok-A-7f3c9e"})
    assert "".join(await texts_until(sock, lambda t: t == "Hello world")) == "Hello world"
    [view] = client.app[CONVERSATIONS].views()
    assert view.owner == principal_of("tok-A-7f3c9e")
    # Later frames carry the token too; another one is refused, not silently ignored.
    await idle(client)
    await sock.send_json({"modelType": "fakey", "message": "as B", "token": "tok-B-21d8aa"})
    [text] = await texts_until(sock, bool)
    assert text.startswith("Error: ") and "another token" in text
    assert len(upstream.requests) == 1
    await sock.close()


@pytest.mark.parametrize("first", [{"modelType": "fakey", "message": "hi"},
                                   {"modelType": "fakey", "message": "hi", "token": "tok-A-7f3c9"},
                                   {"modelType": "fakey", "message": "hi", "token": ""},
                                   "just text"])
async def test_missing_or_wrong_token_frame_is_refused_before_anything(make_client, upstream, first):
    client = await make_client(SEED + "\n" + TOKENS)
    sock = await client.ws_connect(ROUTE)
    await (sock.send_str(first) if isinstance(first, str) else sock.send_json(first))
    code, texts = await closed(sock)
    assert code == 1008 and texts == ["Error: A valid access token is required."]
    assert stats(client)["sessions"] == 0 and upstream.requests == []


async def test_wrong_token_frames_are_throttled_like_other_guesses(make_client, upstream):
    client = await make_client(SEED + "\n" + TOKENS)
    for _ in range(10):
        sock = await client.ws_connect(ROUTE)
        await sock.send_json({"modelType": "fakey", "message": "hi", "token": "guess-0000000000"})
        assert (await closed(sock))[0] == 1008
    # Throttled: even the right token is refused unchecked, on the frame and on the upgrade alike.
    sock = await client.ws_connect(ROUTE)
    await sock.send_json({"modelType": "fakey", "message": "hi", "token": "tok-A-7f3c9e"})
    code, texts = await closed(sock)
    assert code == 1013 and texts == ["Error: Too many failed sign-in attempts; try again later."]
    with pytest.raises(WSServerHandshakeError) as exc:
        await client.ws_connect(ROUTE, params={"token": "tok-A-7f3c9e"})
    assert exc.value.status == 429
    assert stats(client)["sessions"] == 0 and upstream.requests == []


async def test_no_token_frame_in_time_closes(make_client, upstream):
    client = await make_client(SEED + "\n" + TOKENS + "\n[server]\nheader_timeout_seconds = 0.3")
    sock = await client.ws_connect(ROUTE)
    code, texts = await closed(sock)
    assert code == 1008 and texts == ["Error: No token frame came in time."]
    assert stats(client)["sessions"] == 0


async def test_upgrade_credentials_still_work_and_a_wrong_one_is_401(make_client, upstream):
    client = await make_client(SEED + "\n" + TOKENS)
    sock = await client.ws_connect(ROUTE, params={"token": "tok-B-21d8aa"})
    await sock.send_json({"modelType": "fakey", "message": "hi"})  # no token in the frame: not needed
    assert "".join(await texts_until(sock, lambda t: t == "Hello world")) == "Hello world"
    [view] = client.app[CONVERSATIONS].views()
    assert view.owner == principal_of("tok-B-21d8aa")
    await sock.close()
    for kw in ({"params": {"token": "wrong-token-xx"}}, {"headers": {"Authorization": "Bearer wrong"}}):
        with pytest.raises(WSServerHandshakeError) as exc:
            await client.ws_connect(ROUTE, **kw)
        assert exc.value.status == 401


async def test_cross_origin_page_needs_allowed_origins_and_the_403_is_logged(make_client, upstream, caplog):
    page = "http://127.0.0.1:5500"
    client = await make_client(SEED)
    with caplog.at_level(logging.WARNING, logger="nexlm.security"):
        for _ in range(2):
            with pytest.raises(WSServerHandshakeError) as exc:
                await client.ws_connect(ROUTE, headers={"Origin": page})
            assert exc.value.status == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "nexlm.security"]
    assert len(lines) == 1, lines  # once per origin, not once per attempt
    assert page in lines[0] and "[server] allowed_origins" in lines[0] and ROUTE in lines[0]
    allowed = await make_client(SEED + f'\n[server]\nallowed_origins = ["{page}"]')
    sock = await allowed.ws_connect(ROUTE, headers={"Origin": page})
    await sock.send_json({"modelType": "fakey", "message": "hi"})
    assert "".join(await texts_until(sock, lambda t: t == "Hello world")) == "Hello world"
    await sock.close()


async def test_a_jwt_in_the_frame_is_verified_like_a_bearer_one(make_client, upstream):
    client = await make_client(SEED + "\n" + HS, env=ENV)
    sock = await client.ws_connect(ROUTE)
    await sock.send_json({"modelType": "fakey", "message": "hi", "token": pyjwt.encode(claims(), SECRET, "HS256")})
    assert "".join(await texts_until(sock, lambda t: t == "Hello world")) == "Hello world"
    [view] = client.app[CONVERSATIONS].views()
    assert view.owner == "u:alice"
    await sock.close()
    expired = pyjwt.encode(claims(exp=1000, iat=900), SECRET, "HS256")
    sock = await client.ws_connect(ROUTE)
    await sock.send_json({"modelType": "fakey", "message": "hi", "token": expired})
    assert await closed(sock) == (1008, ["Error: A valid access token is required."])
    assert len(upstream.requests) == 1


async def test_a_page_that_leaves_stops_its_reply_at_once(make_client, upstream):
    """The seed's page cannot resume (it never learns its session), so the resume grace that
    /ws gives a reply would only spend the upstream's tokens for nobody."""
    client = await make_client(SEED + "\n[chat]\nresume_grace_seconds = 30")
    upstream.push(Script([chunk("", role=True), chunk("some"), "hang"]))
    sock = await client.ws_connect(ROUTE)
    await sock.send_json({"modelType": "fakey", "message": "hi"})
    assert await texts_until(sock, lambda t: t == "some") == ["some"]
    await sock.close()
    await upstream.wait_closed(1)
    assert upstream.cut_by_client == 1
    await idle(client)
    assert stats(client)["sessions"] == 0 and stats(client)["limiter_running"] == 0
