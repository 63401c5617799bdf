"""/sse: the same events as /ws as an event stream; stop over HTTP; Last-Event-ID never regenerates."""

from __future__ import annotations

import asyncio
import json

from fake_upstream import DONE, Script, chunk, error, reply
from nexlm.appkeys import CONVERSATIONS


def parse_stream(text: str) -> list[tuple[str, dict, str | None]]:
    """(event, data, id) per event, strictly: every event has event: and data: lines."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        fields = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            fields[name] = value
        out.append((fields["event"], json.loads(fields["data"]), fields.get("id")))
    return out


async def read_events(resp) -> list[tuple[str, dict, str | None]]:
    async with asyncio.timeout(5):
        return parse_stream(await resp.text())


async def test_get_streams_session_then_reply(client, upstream):
    resp = await client.get("/sse", params={"message": "hi"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no"
    events = await read_events(resp)
    kinds = [e[0] for e in events]
    assert kinds[0] == "session" and kinds[-1] == "done"
    assert kinds == ["session", "start", "delta", "done"]
    for name, data, _ in events:
        assert data["type"] == name
    start, delta, done = events[1][1], events[2][1], events[3][1]
    assert delta["content"] == "Hello world" and done["finish_reason"] == "stop"
    assert [e[2] for e in events[1:]] == [str(start["seq"]), str(delta["seq"]), str(done["seq"])]
    assert events[0][2] == str(start["seq"] - 1)  # what the client has so far
    assert upstream.requests[0]["body"]["messages"] == [{"role": "user", "content": "hi"}]


async def test_post_with_model_params_and_session(client, upstream):
    upstream.push(reply("one"), reply("two"))
    resp = await client.post("/sse", json={"message": "a", "model": "fake/fake-reasoner",
                                           "params": {"temperature": 0.7, "max_tokens": 10}})
    events = await read_events(resp)
    sid = events[0][1]["session"]
    resp = await client.post("/sse", json={"message": "b", "session": sid})
    events = await read_events(resp)
    assert events[0][1]["session"] == sid
    body = upstream.requests[1]["body"]
    assert body["model"] == "fake-reasoner" and body["temperature"] == 0.7 and body["max_tokens"] == 10
    assert [m["content"] for m in body["messages"]] == ["a", "one", "b"]


async def test_post_takes_parameters_at_the_top_level_like_get(client, upstream):
    """The documented shape of POST is GET's fields as JSON: top-level parameters count."""
    resp = await client.post("/sse", json={"message": "Say hi", "max_tokens": 5, "temperature": 0.3,
                                           "top_p": 0.5, "system": "Be brief."})
    assert resp.status == 200
    await read_events(resp)
    body = upstream.requests[0]["body"]
    assert body["max_tokens"] == 5 and body["temperature"] == 0.3 and body["top_p"] == 0.5
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_post_validates_top_level_parameters_like_get(client, upstream):
    for body, needle in [
        ({"message": "x", "temperature": 5}, "temperature"),
        ({"message": "x", "max_tokens": "many"}, "max_tokens"),
        ({"message": "x", "temprature": 0.5}, "'temprature'"),
        ({"message": "x", "max_tokens": 5, "params": {"max_tokens": 6}}, "max_tokens"),
        ({"message": "x", "temperature": 0.5, "params": "hot"}, "params"),
    ]:
        resp = await client.post("/sse", json=body)
        err = await resp.json()
        assert resp.status == 400 and err["code"] == "bad_request" and needle in err["message"], (body, err)
    get = await client.get("/sse", params={"message": "x", "temperature": "5"})
    assert get.status == 400 and (await get.json())["code"] == "bad_request"
    assert upstream.requests == []  # nothing refused reached the upstream


async def test_get_params_in_query(client, upstream):
    resp = await client.get("/sse", params={"message": "x", "temperature": "0.3", "max_tokens": "5"})
    await read_events(resp)
    body = upstream.requests[0]["body"]
    assert body["temperature"] == 0.3 and body["max_tokens"] == 5


async def test_refusals_are_http_statuses(client, upstream):
    r = await client.get("/sse")
    assert r.status == 400 and (await r.json())["code"] == "bad_request"
    r = await client.post("/sse", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["code"] == "bad_request"
    r = await client.post("/sse", json=["a list"])
    assert r.status == 400
    r = await client.get("/sse", params={"message": "x", "model": "nope"})
    assert r.status == 404 and (await r.json())["code"] == "unknown_model"
    r = await client.get("/sse", params={"message": "x", "model": "deepseek"})
    assert r.status == 503 and (await r.json())["code"] == "provider_unavailable"
    r = await client.get("/sse", params={"message": "x", "temperature": "NaN"})
    assert r.status == 400
    r = await client.post("/sse", data="x" * 1100000, headers={"Content-Type": "application/json"})
    assert r.status == 413
    assert upstream.requests == []


async def test_upstream_error_is_an_event(client, upstream):
    upstream.push(error(503, "overloaded"))
    resp = await client.get("/sse", params={"message": "hi"})
    assert resp.status == 200
    events = await read_events(resp)
    assert [e[0] for e in events] == ["session", "start", "error", "done"]
    assert events[2][1]["code"] == "upstream_error"
    assert events[2][1]["message"] == "fake answered 503: service unavailable"
    assert events[3][1]["finish_reason"] == "error"


async def test_stop_over_http(client, upstream):
    upstream.push(Script([chunk("", role=True), chunk("part"), "hang"]))
    resp = await client.get("/sse", params={"message": "hi"})
    assert resp.status == 200
    # Read the session event to learn the id, then stop while the upstream hangs.
    line = b""
    async with asyncio.timeout(5):
        while b'"type":"delta"' not in line:
            line += await resp.content.readany()
    sid = json.loads(line.split(b"data: ", 1)[1].split(b"\n", 1)[0])["session"]
    r = await client.post(f"/api/sessions/{sid}/stop")
    assert (await r.json()) == {"stopped": True}
    async with asyncio.timeout(5):
        rest = (line + await resp.content.read()).decode()
    events = parse_stream(rest)
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "stopped"
    await upstream.wait_closed(1, timeout=1)
    r = await client.post(f"/api/sessions/{sid}/stop")
    assert (await r.json()) == {"stopped": False}


async def test_closing_stream_cancels_upstream(client, upstream):
    upstream.push(Script([chunk("", role=True), chunk("part"), "hang"]))
    resp = await client.get("/sse", params={"message": "hi"})
    async with asyncio.timeout(5):
        data = b""
        while b'"type":"delta"' not in data:
            data += await resp.content.readany()
    resp.close()
    await upstream.wait_closed(1, timeout=2)
    assert upstream.cut_by_client == 1


async def test_last_event_id_never_starts_a_generation(client, upstream):
    resp = await client.get("/sse", params={"message": "hi"})
    events = await read_events(resp)
    sid, last = events[0][1]["session"], events[-1][2]
    # EventSource reconnects after the stream ends, with the same URL and Last-Event-ID.
    r = await client.get("/sse", params={"message": "hi", "session": sid}, headers={"Last-Event-ID": last})
    assert r.status == 204
    r = await client.get("/sse", params={"message": "hi"}, headers={"Last-Event-ID": last})
    assert r.status == 204
    r = await client.get("/sse", params={"message": "hi"}, headers={"Last-Event-ID": "junk"})
    assert r.status == 400
    assert len(upstream.requests) == 1
    # Resuming from the middle replays exactly what came after.
    start_seq = int(events[1][2])
    r = await client.get("/sse", params={"session": sid}, headers={"Last-Event-ID": str(start_seq)})
    replay = await read_events(r)
    assert [e[0] for e in replay] == ["session", "delta", "done"]
    assert [e[2] for e in replay[1:]] == [events[2][2], events[3][2]]
    assert len(upstream.requests) == 1


async def test_sse_and_ws_share_a_session(client, upstream):
    upstream.push(reply("from sse"), reply("from ws"))
    events = await read_events(await client.get("/sse", params={"message": "one"}))
    sid = events[0][1]["session"]
    ws = await client.ws_connect(f"/ws?session={sid}")
    first = await ws.receive_json(timeout=5)
    assert [h["content"] for h in first["history"]] == ["one", "from sse"]
    await ws.send_json({"type": "chat", "message": "two"})
    while (await ws.receive_json(timeout=5))["type"] != "done":
        pass
    assert [m["content"] for m in upstream.requests[1]["body"]["messages"]] == ["one", "from sse", "two"]
    await ws.close()


async def test_busy_on_sse(client, upstream):
    gate = asyncio.Event()
    upstream.push(Script([chunk("", role=True), chunk("a"), gate, chunk(finish="stop"), DONE]))
    resp = await client.get("/sse", params={"message": "hi"})
    data = b""
    async with asyncio.timeout(5):
        while b'"type":"delta"' not in data:
            data += await resp.content.readany()
    sid = json.loads(data.split(b"data: ", 1)[1].split(b"\n", 1)[0])["session"]
    r = await client.get("/sse", params={"message": "again", "session": sid})
    assert r.status == 409 and (await r.json())["code"] == "busy"
    gate.set()
    async with asyncio.timeout(5):
        rest = (data + await resp.content.read()).decode()
    assert parse_stream(rest)[-1][1]["finish_reason"] == "stop"


async def test_regenerate_and_edit_over_sse(client, upstream):
    upstream.push(reply("a1"), reply("a2"), reply("b1"))
    events = await read_events(await client.post("/sse", json={"message": "q1"}))
    sid = events[0][1]["session"]
    events = await read_events(await client.post("/sse", json={"type": "regenerate", "session": sid}))
    assert [e[0] for e in events] == ["session", "start", "delta", "done"] and events[2][1]["content"] == "a2"
    events = await read_events(await client.post("/sse", json={"type": "edit", "session": sid, "index": 0,
                                                                "message": "q1 again"}))
    assert events[2][1]["content"] == "b1"
    hist = (await (await client.get(f"/api/sessions/{sid}")).json())["history"]
    assert [h["content"] for h in hist] == ["q1 again", "b1"]
    assert upstream.requests[2]["body"]["messages"] == [{"role": "user", "content": "q1 again"}]
    r = await client.post("/sse", json={"type": "regenerate", "session": "missing"})
    assert r.status == 404
    r = await client.post("/sse", json={"type": "launch", "session": sid})
    assert r.status == 400


async def test_create_seeded_session_over_http(client, upstream):
    r = await client.post("/api/sessions", json={
        "model": "fake/fake-reasoner", "params": {"temperature": 0.1},
        "history": [{"role": "user", "content": "old q"}, {"role": "assistant", "content": "old a"}]})
    assert r.status == 201
    created = await r.json()
    assert created["model"] == "fake/fake-reasoner" and len(created["history"]) == 2
    await read_events(await client.post("/sse", json={"message": "new q", "session": created["session"]}))
    body = upstream.requests[0]["body"]
    assert body["model"] == "fake-reasoner" and body["temperature"] == 0.1
    assert [m["content"] for m in body["messages"]] == ["old q", "old a", "new q"]
    r = await client.post("/api/sessions", json={"history": [{"role": "assistant", "content": "x"}]})
    assert r.status == 400 and (await r.json())["code"] == "bad_request"


async def test_a_refused_first_chat_leaves_no_session_behind(client, upstream):
    chat = client.app[CONVERSATIONS]
    for params in ({"message": "x", "model": "nope"}, {"message": "x", "temperature": "9"}, {"message": " "}):
        r = await client.get("/sse", params=params)
        assert r.status in (400, 404)
    assert chat.stats()["sessions"] == 0
