"""/ws: every frame type, stop, busy, settings, multi-turn context, bad frames, disconnects."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType

from fake_upstream import DONE, Script, chunk, error, from_fixture, reply, usage_chunk


async def session_and_chat(connect, message="hi", **extra):
    ws = await connect()
    first = await ws.recv()
    assert first["type"] == "session"
    await ws.send({"type": "chat", "message": message, **extra})
    return ws, first


async def test_first_frame_is_session(connect):
    ws = await connect()
    f = await ws.recv()
    assert f["type"] == "session"
    assert len(f["session"]) >= 20
    assert f["model"] == "fake/fake-model"
    assert f["params"] == {} and f["history"] == []


async def test_reply_streams_in_order_with_rising_seq(connect, upstream):
    gate = asyncio.Event()
    upstream.push(Script([chunk("", role=True), chunk("Hel"), gate, chunk("lo"), chunk(finish="stop"),
                          usage_chunk(completion=2), DONE]))
    ws, _ = await session_and_chat(connect)
    start = await ws.recv()
    assert start["type"] == "start" and start["model"] == "fake/fake-model"
    first = await ws.recv()
    # The first piece arrives while the upstream is still holding the rest: real streaming.
    assert first == {"type": "delta", "reply": start["reply"], "content": "Hel", "seq": start["seq"] + 1}
    gate.set()
    rest = await ws.until("done")
    assert [f["type"] for f in rest] == ["delta", "done"]
    assert rest[0]["content"] == "lo"
    done = rest[-1]
    assert done["finish_reason"] == "stop" and done["reply"] == start["reply"]
    assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    seqs = [start["seq"], first["seq"]] + [f["seq"] for f in rest]
    assert seqs == list(range(seqs[0], seqs[0] + 4))


async def test_reasoning_events(connect, upstream):
    upstream.push(from_fixture("deepseek-reasoner-stream.txt"))
    ws, _ = await session_and_chat(connect)
    frames = await ws.until("done")
    reasoning = "".join(f["content"] for f in frames if f["type"] == "reasoning")
    text = "".join(f["content"] for f in frames if f["type"] == "delta")
    assert reasoning == "用户问的是 2+2。"
    assert text == "2+2 = 4。"
    assert frames[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 12}
    kinds = [f["type"] for f in frames if f["type"] in ("reasoning", "delta")]
    assert kinds.index("delta") > max(i for i, k in enumerate(kinds) if k == "reasoning")


async def test_seed_frame_and_plain_text_are_chats(connect, upstream):
    ws = await connect()
    await ws.recv()
    await ws.send({"modelType": "fakey", "message": "from the seed"})
    frames = await ws.until("done")
    assert frames[0]["type"] == "start" and frames[0]["model"] == "fake/fake-model"
    await ws.send("just typed text")
    await ws.until("done")
    bodies = [r["body"] for r in upstream.requests]
    assert bodies[0]["messages"][-1] == {"role": "user", "content": "from the seed"}
    assert bodies[1]["messages"][-1] == {"role": "user", "content": "just typed text"}


async def test_seed_route_works(client):
    ws = await client.ws_connect("/api/ai/chat/websocket")
    msg = await ws.receive_json(timeout=5)
    assert msg["type"] == "session"
    await ws.close()


async def test_multi_turn_context_and_system_prompt(connect, upstream):
    upstream.push(reply("First answer"), reply("Second answer"))
    ws = await connect()
    await ws.recv()
    await ws.send({"type": "set", "params": {"system": "Be brief."}})
    assert (await ws.recv())["params"] == {"system": "Be brief."}
    await ws.send({"type": "chat", "message": "one"})
    await ws.until("done")
    await ws.send({"type": "chat", "message": "two"})
    await ws.until("done")
    assert upstream.requests[1]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "two"},
    ]


async def test_max_history_turns_limits_context(make_client, upstream):
    client = await make_client("[chat]\nmax_history_turns = 1")
    ws = await client.ws_connect("/ws")
    await ws.receive_json()
    for i in range(3):
        upstream.push(reply(f"a{i}"))
        await ws.send_json({"type": "chat", "message": f"q{i}"})
        while (await ws.receive_json(timeout=5))["type"] != "done":
            pass
    assert upstream.requests[2]["body"]["messages"] == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
    ]
    await ws.close()


async def test_stop_closes_upstream_and_keeps_partial_text(connect, upstream, client):
    upstream.push(Script([chunk("", role=True), chunk("partial "), chunk("text"), "hang"]))
    ws, first = await session_and_chat(connect)
    frames = []
    while "".join(f.get("content", "") for f in frames if f["type"] == "delta") != "partial text":
        frames.append(await ws.recv())
    await ws.send({"type": "stop"})
    done = (await ws.until("done"))[-1]
    assert done["finish_reason"] == "stopped"
    await upstream.wait_closed(1, timeout=1)
    assert upstream.cut_by_client == 1
    # The socket stays open and the history has exactly what was streamed.
    await ws.send({"type": "ping"})
    assert (await ws.recv()) == {"type": "pong"}
    r = await client.get(f"/api/sessions/{first['session']}")
    hist = (await r.json())["history"]
    assert hist[-1]["content"] == "partial text" and hist[-1]["finish_reason"] == "stopped"


async def test_stop_before_first_token(connect, upstream):
    upstream.push(Script(["hang"]))
    ws, _ = await session_and_chat(connect)
    await ws.recv()  # start
    await upstream.wait_requests(1)
    await ws.send({"type": "stop"})
    done = (await ws.until("done"))[-1]
    assert done["finish_reason"] == "stopped"
    await upstream.wait_closed(1, timeout=1)


async def test_double_stop_and_stop_when_idle_are_harmless(connect, upstream):
    upstream.push(Script([chunk("", role=True), chunk("x"), "hang"]))
    ws, _ = await session_and_chat(connect)
    await ws.until("delta")
    await ws.send({"type": "stop"})
    await ws.send({"type": "stop"})
    frames = await ws.until("done")
    await ws.send({"type": "ping"})
    assert (await ws.recv())["type"] == "pong"  # no second done, no error in between
    assert [f["type"] for f in frames].count("done") == 1


async def test_chat_while_streaming_is_busy(connect, upstream):
    gate = asyncio.Event()
    upstream.push(Script([chunk("", role=True), chunk("a"), gate, chunk(finish="stop"), DONE]))
    ws, _ = await session_and_chat(connect)
    await ws.until("delta")
    await ws.send({"type": "chat", "message": "again"})
    err = await ws.recv()
    assert err["type"] == "error" and err["code"] == "busy"
    gate.set()
    done = (await ws.until("done"))[-1]
    assert done["finish_reason"] == "stop"
    assert len(upstream.requests) == 1


async def test_set_model_and_params_reach_upstream(connect, upstream):
    ws = await connect()
    await ws.recv()
    await ws.send({"type": "set", "model": "fake/fake-reasoner",
                   "params": {"temperature": 0.2, "top_p": 0.5, "max_tokens": 64}})
    s = await ws.recv()
    assert s["type"] == "session" and s["model"] == "fake/fake-reasoner"
    assert s["params"] == {"temperature": 0.2, "top_p": 0.5, "max_tokens": 64}
    await ws.send({"type": "chat", "message": "x"})
    await ws.until("done")
    body = upstream.requests[0]["body"]
    assert body["model"] == "fake-reasoner"
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.2, 0.5, 64)
    # model and params given with a chat become the session's choice too
    await ws.send({"type": "chat", "message": "y", "model": "fake/fake-model", "params": {"temperature": None}})
    await ws.until("done")
    body = upstream.requests[1]["body"]
    assert body["model"] == "fake-model" and "temperature" not in body and body["top_p"] == 0.5


async def test_reset_empties_history(connect, upstream):
    ws, _ = await session_and_chat(connect)
    await ws.until("done")
    await ws.send({"type": "reset"})
    s = await ws.recv()
    assert s["type"] == "session" and s["history"] == []
    await ws.send({"type": "chat", "message": "fresh"})
    await ws.until("done")
    assert upstream.requests[1]["body"]["messages"] == [{"role": "user", "content": "fresh"}]


async def test_regenerate_replaces_last_reply(connect, upstream, client):
    upstream.push(reply("one"), reply("two"))
    ws, first = await session_and_chat(connect, "q")
    await ws.until("done")
    await ws.send({"type": "regenerate"})
    frames = await ws.until("done")
    assert "".join(f["content"] for f in frames if f["type"] == "delta") == "two"
    assert upstream.requests[1]["body"]["messages"] == [{"role": "user", "content": "q"}]
    hist = (await (await client.get(f"/api/sessions/{first['session']}")).json())["history"]
    assert [(h["role"], h["content"]) for h in hist] == [("user", "q"), ("assistant", "two")]


async def test_edit_replaces_message_and_what_follows(connect, upstream, client):
    upstream.push(reply("a1"), reply("a2"), reply("a1-edited"))
    ws, first = await session_and_chat(connect, "q1")
    await ws.until("done")
    await ws.send({"type": "chat", "message": "q2"})
    await ws.until("done")
    await ws.send({"type": "edit", "index": 0, "message": "q1 edited"})
    await ws.until("done")
    assert upstream.requests[2]["body"]["messages"] == [{"role": "user", "content": "q1 edited"}]
    hist = (await (await client.get(f"/api/sessions/{first['session']}")).json())["history"]
    assert [h["content"] for h in hist] == ["q1 edited", "a1-edited"]
    await ws.send({"type": "edit", "index": 1, "message": "not a user turn"})
    assert (await ws.recv())["code"] == "bad_request"


async def test_restore_seeds_context(connect, upstream):
    ws = await connect()
    await ws.recv()
    await ws.send({"type": "restore", "history": [
        {"role": "user", "content": "earlier"}, {"role": "assistant", "content": "yes", "finish_reason": "stop"}]})
    s = await ws.recv()
    assert s["type"] == "session" and len(s["history"]) == 2
    await ws.send({"type": "chat", "message": "now"})
    await ws.until("done")
    assert [m["content"] for m in upstream.requests[0]["body"]["messages"]] == ["earlier", "yes", "now"]
    await ws.send({"type": "restore", "history": []})
    assert (await ws.recv())["code"] == "bad_request"  # only on an empty session


async def test_bad_frames_get_bad_request_and_socket_survives(connect, upstream):
    ws = await connect()
    await ws.recv()
    for frame in ('{"type": "chat", ', '{"type": "launch"}', '{"no": "type"}', '{"type":"chat","message":""}',
                  '{"type":"chat","message":42}', '{"type":"set","params":{"temperature":"hot"}}',
                  '{"type":"set","params":{"base_url":"http://evil"}}', '{"type":"set","params":[1]}'):
        await ws.send(frame)
        err = await ws.recv()
        assert err["type"] == "error" and err["code"] == "bad_request", frame
        assert err["message"]
    await ws.send({"type": "chat", "message": "still alive"})
    assert (await ws.until("done"))[-1]["finish_reason"] == "stop"
    assert len(upstream.requests) == 1


async def test_unknown_model_and_unavailable_provider(connect, upstream):
    ws = await connect()
    await ws.recv()
    await ws.send({"type": "set", "model": "nope/nothing"})
    err = await ws.recv()
    assert err["code"] == "unknown_model" and "nope/nothing" in err["message"]
    await ws.send({"type": "chat", "message": "hi", "model": "deepseek"})
    err = await ws.recv()
    assert err["code"] == "provider_unavailable" and "DEEPSEEK_API_KEY" in err["message"]
    assert upstream.requests == []


async def test_upstream_error_becomes_error_then_done(connect, upstream, client):
    upstream.push(error(402, "Insufficient Balance"))
    ws, first = await session_and_chat(connect)
    frames = await ws.until("done")
    assert [f["type"] for f in frames] == ["start", "error", "done"]
    err = frames[1]
    assert err["code"] == "upstream_error"
    assert err["message"] == "fake answered 402: payment required (check the account's balance)"
    assert err["reply"] == frames[0]["reply"]
    assert "sk-test-secret-key-123" not in str(frames)
    assert frames[-1]["finish_reason"] == "error"


async def test_rate_limited_upstream(connect, upstream):
    upstream.push(from_fixture("error-429.txt"))
    ws, _ = await session_and_chat(connect)
    frames = await ws.until("done")
    assert frames[1]["code"] == "rate_limited"


async def test_failed_turn_is_left_out_of_context(connect, upstream):
    upstream.push(error(500, "boom"), reply("ok"))
    ws, _ = await session_and_chat(connect, "lost question")
    await ws.until("done")
    await ws.send({"type": "chat", "message": "next"})
    await ws.until("done")
    assert upstream.requests[1]["body"]["messages"] == [{"role": "user", "content": "next"}]


async def test_error_after_text_keeps_text(connect, upstream, client):
    upstream.push(from_fixture("in-stream-error.txt"))
    ws, first = await session_and_chat(connect)
    frames = await ws.until("done")
    assert [f["type"] for f in frames] == ["start", "delta", "error", "done"]
    hist = (await (await client.get(f"/api/sessions/{first['session']}")).json())["history"]
    assert hist[-1] == {"role": "assistant", "content": "Partial ", "finish_reason": "error", "model": "fake/fake-model"}


async def test_disconnect_cancels_upstream_without_grace(connect, upstream, client):
    upstream.push(Script([chunk("", role=True), chunk("so far"), "hang"]))
    ws, first = await session_and_chat(connect)
    await ws.until("delta")
    await ws.close()
    await upstream.wait_closed(1, timeout=1)
    r = await client.get(f"/api/sessions/{first['session']}")
    hist = (await r.json())["history"]
    assert hist[-1]["content"] == "so far" and hist[-1]["finish_reason"] == "interrupted"


async def test_reattach_gets_history(connect, upstream):
    ws, first = await session_and_chat(connect, "remember me")
    await ws.until("done")
    await ws.close()
    ws2 = await connect(f"/ws?session={first['session']}")
    s = await ws2.recv()
    assert s["session"] == first["session"]
    assert [h["content"] for h in s["history"]] == ["remember me", "Hello world"]
    ws3 = await connect("/ws?session=not-a-real-session")
    assert (await ws3.recv())["session"] != "not-a-real-session"


async def test_binary_frame_closes_1003(client):
    ws = await client.ws_connect("/ws")
    await ws.receive_json()
    await ws.send_bytes(b"\x00\x01")
    msg = await ws.receive(timeout=5)
    assert msg.type == WSMsgType.CLOSE and msg.data == 1003


async def test_oversized_frame_closes_1009(client):
    ws = await client.ws_connect("/ws")
    await ws.receive_json()
    await ws.send_str("x" * 1100000)
    msg = await ws.receive(timeout=5)
    assert msg.type == WSMsgType.CLOSE and msg.data == 1009


async def test_a_client_that_closes_mid_reply_is_let_go_of(make_client, upstream):
    """aiohttp cancels the handler once the client's connection is gone, which used to land in
    the middle of the handler's cleanup: its transport stayed in STREAMS (one per such close)."""
    from nexlm.appkeys import CONVERSATIONS, STREAMS

    client = await make_client("[chat]\nresume_grace_seconds = 30")
    upstream.push(Script([chunk("", role=True), chunk("some"), "hang"]))
    ws = await client.ws_connect("/ws")
    await ws.receive_json(timeout=5)
    await ws.send_json({"type": "chat", "message": "hi"})
    while (await ws.receive_json(timeout=5))["type"] != "delta":
        pass
    await ws.close()
    async with asyncio.timeout(5):
        while client.app[STREAMS] or client.app[CONVERSATIONS].stats()["listeners"]:
            await asyncio.sleep(0.01)
    chat = client.app[CONVERSATIONS]
    assert chat.stats()["replies_running"] == 1  # (its resume grace runs on)
    [view] = chat.views()
    assert await chat.stop(await chat.find(view.id, None))
