"""Two NexLM app instances in one test process sharing one real redis-server: one server to the user."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from conftest import WS
from fake_upstream import DONE, Script, chunk
from invariants import spawn_app
from redis_servers import command, free_port

from nexlm.appkeys import CONVERSATIONS
from nexlm.redis_events import running_key
from nexlm.store_redis import SCHEMA, SCHEMA_KEY


@pytest.fixture
def redis_url(redis_server):
    assert command(redis_server.port, "FLUSHALL").startswith("+OK")
    return redis_server.url


@pytest.fixture
def two(make_client, redis_url, request):
    """``await two(extra_toml)`` -> two test clients of two apps with the same ``[store] url``
    (the three-node cluster's when the test is marked ``on_cluster``)."""
    url = redis_url
    if request.node.get_closest_marker("on_cluster"):
        cluster = request.getfixturevalue("redis_cluster")
        for node in cluster.nodes:
            assert command(node.port, "FLUSHALL").startswith("+OK")
        url = cluster.url

    async def make(extra: str = ""):
        env = {"NEXLM_STORE": url}
        return await make_client(extra, env=env), await make_client(extra, env=env)

    return make


async def ws(client, path="/ws") -> WS:
    return WS(await client.ws_connect(path))


@pytest.mark.parametrize("where", ["server", pytest.param("cluster", marks=pytest.mark.on_cluster)])
async def test_a_session_made_on_one_instance_is_used_on_the_other(two, upstream, where):
    a, b = await two()
    wa = await ws(a)
    sid = (await wa.recv())["session"]
    await wa.send({"type": "set", "params": {"temperature": 0.3}})
    await wa.until("session")
    await wa.send({"type": "chat", "message": "first question"})
    await wa.until("done")
    await wa.close()

    r = await b.get(f"/api/sessions/{sid}")
    assert r.status == 200
    data = await r.json()
    assert data["session"] == sid and data["params"].get("temperature") == 0.3
    assert [(h["role"], h["content"]) for h in data["history"]] == [("user", "first question"),
                                                                   ("assistant", "Hello world")]

    wb = await ws(b, f"/ws?session={sid}")
    frame = await wb.recv()
    assert frame["type"] == "session" and frame["session"] == sid and len(frame["history"]) == 2
    await wb.send({"type": "chat", "message": "second question"})
    await wb.until("done")
    await wb.close()
    sent = upstream.requests[-1]["body"]
    assert [m["content"] for m in sent["messages"] if m["role"] != "system"] == [
        "first question", "Hello world", "second question"]
    assert sent.get("temperature") == 0.3

    data = await (await a.get(f"/api/sessions/{sid}")).json()
    assert [h["content"] for h in data["history"]] == ["first question", "Hello world", "second question",
                                                       "Hello world"]


async def test_a_delete_through_one_instance_is_seen_by_the_other(two):
    a, b = await two()
    wa = await ws(a)
    sid = (await wa.recv())["session"]
    await wa.close()
    assert (await b.get(f"/api/sessions/{sid}")).status == 200
    assert (await b.delete(f"/api/sessions/{sid}")).status == 200
    assert (await a.get(f"/api/sessions/{sid}")).status == 404


@pytest.mark.parametrize("where", ["server", pytest.param("cluster", marks=pytest.mark.on_cluster)])
async def test_message_rate_is_counted_across_instances(two, where):
    a, b = await two("[limits]\nmessages_per_minute = 2")
    wa, wb = await ws(a), await ws(b)
    await wa.recv()
    await wb.recv()
    for _ in range(2):
        await wa.send({"type": "chat", "message": "q"})
        await wa.until("done")
    await wb.send({"type": "chat", "message": "one too many"})
    err = await wb.recv()
    assert err["type"] == "error" and err["code"] == "rate_limited", err
    await wa.close()
    await wb.close()


async def test_running_replies_are_counted_across_instances(two, upstream):
    a, b = await two("[limits]\nmax_replies_per_client = 1")
    gate = asyncio.Event()
    upstream.push(Script([chunk("", role=True), chunk("a"), gate, chunk(finish="stop"), DONE]))
    wa, wb = await ws(a), await ws(b)
    await wa.recv()
    await wb.recv()
    await wa.send({"type": "chat", "message": "long one"})
    assert (await wa.recv())["type"] == "start"
    await wb.send({"type": "chat", "message": "meanwhile"})
    err = await wb.recv()
    assert err["type"] == "error" and err["code"] == "busy", err
    gate.set()
    await wa.until("done")
    # Given back when A's reply ended (released in the background: poll B for the slot).
    async with asyncio.timeout(5):
        while True:
            await wb.send({"type": "chat", "message": "now"})
            frame = await wb.recv()
            if frame["type"] == "start":
                break
            assert frame["code"] == "busy", frame
            await asyncio.sleep(0.05)
    await wb.until("done")
    await wa.close()
    await wb.close()


async def start_failure(tmp_path, url: str) -> list[str]:
    """``python app.py`` with ``[store] url``: it must exit 2 at start; its stderr lines."""
    cfg = tmp_path / "nexlm.toml"
    cfg.write_text(f'[store]\nkind = "redis"\nurl = "{url}"\n')
    proc = await spawn_app(cfg, free_port())
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode == 2, (out, err)
    assert b"NexLM is running" not in out
    return err.decode().strip().splitlines()


async def test_a_wrong_password_stops_the_server_at_start_with_one_line(tmp_path, redis_url, redis_server):
    assert command(redis_server.port, "ACL", "SETUSER", "app-test", "on", ">the-right-one", "~*", "+@all") \
        .startswith("+OK")
    url = redis_url.replace("redis://", "redis://app-test:not-the-password@")
    lines = await start_failure(tmp_path, url)
    assert lines == [f"nexlm: cannot open the redis store redis://127.0.0.1:{redis_server.port}/0: cannot connect: "
                     "authentication refused (invalid username-password pair or user is disabled.)"], lines


async def test_nothing_listening_stops_the_server_at_start_with_one_line(tmp_path):
    port = free_port()
    lines = await start_failure(tmp_path, f"redis://127.0.0.1:{port}/0")
    assert len(lines) == 1 and lines[0].startswith(
        f"nexlm: cannot open the redis store redis://127.0.0.1:{port}/0: cannot connect: "), lines


async def test_a_newer_schema_stops_the_server_at_start_with_one_line(tmp_path, redis_url, redis_server):
    assert command(redis_server.port, "SET", SCHEMA_KEY, str(SCHEMA + 1)).startswith("+OK")
    lines = await start_failure(tmp_path, redis_url)
    assert lines == [f"nexlm: cannot open the redis store redis://127.0.0.1:{redis_server.port}/0: its schema "
                     f"version is {SCHEMA + 1}, newer than this NexLM's ({SCHEMA}); upgrade NexLM or point "
                     "[store] url at another database"], lines


async def test_a_conversation_someone_follows_on_one_instance_is_not_evicted_by_the_other(two, redis_server):
    a, b = await two("[limits]\nmax_sessions_per_client = 1")
    wa = await ws(a)
    sid = (await wa.recv())["session"]  # followed on A: in use there
    async with asyncio.timeout(5):  # A marks it busy with its next touch, in the background
        while command(redis_server.port, "EXISTS", f"nexlm:{{{sid}}}:busy") != ":1\r\n":
            await asyncio.sleep(0.02)
    r = await b.post("/api/sessions", json={})
    assert r.status == 503, await r.text()
    assert (await r.json())["code"] == "busy", await r.text()
    assert (await b.get(f"/api/sessions/{sid}")).status == 200
    await wa.close()
    async with asyncio.timeout(5):  # nobody follows it now: once its marker is gone, it may make room
        while command(redis_server.port, "EXISTS", f"nexlm:{{{sid}}}:busy") == ":1\r\n":
            command(redis_server.port, "DEL", f"nexlm:{{{sid}}}:busy")  # (as if its 3 x refresh ran out)
            await asyncio.sleep(0.02)
    r = await b.post("/api/sessions", json={})
    assert r.status in (200, 201), await r.text()
    assert (await b.get(f"/api/sessions/{sid}")).status == 404


async def test_redis_going_away_is_a_503_not_a_crash_and_housekeeping_goes_on(make_client, tmp_path):
    from redis_servers import RedisServer

    from nexlm.appkeys import CONVERSATIONS

    server = RedisServer(tmp_path / "redis-gone")
    try:
        app = await make_client(env={"NEXLM_STORE": server.url})
        wa = await ws(app)
        sid = (await wa.recv())["session"]
        await wa.close()
        assert (await app.get(f"/api/sessions/{sid}")).status == 200
    finally:
        server.stop()
    r = await app.get(f"/api/sessions/{sid}")
    assert r.status == 503, await r.text()
    body = await r.json()
    assert body["code"] == "store_unavailable" and "\n" not in body["message"]
    assert (await app.post("/api/sessions", json={})).status == 503
    try:  # a WebSocket is refused (at the handshake or with an error frame), never left hanging
        w = await ws(app, f"/ws?session={sid}")
        frame = await w.recv()
        assert frame["type"] == "error" and frame["code"] == "store_unavailable", frame
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 503
    await app.server.app[CONVERSATIONS].housekeeping_once()  # logs, raises nothing


async def test_done_waits_for_redis_and_a_chat_right_after_it_is_not_busy(make_client, redis_url, upstream):
    """A reply's done reaches this instance's clients only once the writer has sent it to Redis,
    with the lease's release after it: a client that acts on done (here, or through another
    instance) finds the reply ended, never busy (bench STORES saw busy in 26 of ~250 operations
    when done went out first). The writer is held here until the done is waiting for it."""
    from nexlm.appkeys import CONVERSATIONS

    app = await make_client(env={"NEXLM_STORE": redis_url})
    conversations = app.app[CONVERSATIONS]
    events = conversations.shared.events
    flush = events.flush
    gate = asyncio.Event()

    async def held_flush():
        if asyncio.current_task().get_name() == "redis writer":
            await gate.wait()
        await flush()

    events.flush = held_flush
    w = await ws(app)
    sid = (await w.recv())["session"]
    for i in range(3):
        gate.clear()
        await w.send({"type": "chat", "message": f"question {i}"})
        async with asyncio.timeout(5):
            while not events._later:  # the reply ended here; its done waits for the writer
                await asyncio.sleep(0.01)
        [(cid, listeners, done)] = events._later
        assert cid == sid and done["type"] == "done" and len(listeners) == 1
        assert await conversations.shared.r.exists(running_key(sid))  # not released: the writer is held
        gate.set()
        ev = await w.recv()
        while ev["type"] not in ("done", "error"):
            ev = await w.recv()
        assert ev["type"] == "done" and ev["seq"] == done["seq"], ev
        assert not await conversations.shared.r.exists(running_key(sid))  # released before done came
    await w.close()


# ------------------------------------------------------------ changes made through the other instance

TOKEN = '[auth]\ntokens = ["tok-xchange-4e1a"]'
AUTH = {"Authorization": "Bearer tok-xchange-4e1a"}


async def asked(wa: WS, message: str) -> None:
    await wa.send({"type": "chat", "message": message})
    frames = await wa.until("done")
    assert frames[-1]["finish_reason"] == "stop", frames


def sent_turns(upstream) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in upstream.requests[-1]["body"]["messages"] if m["role"] != "system"]


async def test_a_page_open_on_a_is_shown_bs_set_and_reset_and_chats_from_them(two, upstream):
    """B's ``set`` and ``reset`` reach the page open on A as the ``session`` frame a local one sends,
    and the next turn through A has B's params and none of the turns B reset."""
    a, b = await two()
    wa = await ws(a)
    sid = (await wa.recv())["session"]
    await asked(wa, "old question")
    wb = await ws(b, f"/ws?session={sid}")
    assert len((await wb.recv())["history"]) == 2
    await wb.send({"type": "set", "params": {"temperature": 0.3}})
    await wb.until("session")
    frame = (await wa.until("session"))[-1]  # on A's socket
    assert frame["session"] == sid and frame["params"].get("temperature") == 0.3, frame
    assert len(frame["history"]) == 2
    await wb.send({"type": "reset"})
    await wb.until("session")
    frame = (await wa.until("session"))[-1]
    assert frame["history"] == [] and frame["params"].get("temperature") == 0.3, frame
    await asked(wa, "new question")
    assert sent_turns(upstream) == [("user", "new question")]
    assert upstream.requests[-1]["body"].get("temperature") == 0.3
    # B, following A's new turn, holds it too; nothing of the reset turns came back.
    assert [h["content"] for h in (await (await b.get(f"/api/sessions/{sid}")).json())["history"]] == [
        "new question", "Hello world"]
    await wa.close()
    await wb.close()


async def test_a_turn_through_a_reads_the_record_even_if_the_change_notice_is_lost(two, upstream):
    """A copy held by a page on A can be stale (a notice lost): a turn through A starts from the
    stored record, with B's reset and B's params."""
    a, b = await two()
    mute = a.app[CONVERSATIONS].shared.events
    mute.on_remote_change = lambda cid, what: None  # A hears of no change
    wa = await ws(a)
    sid = (await wa.recv())["session"]
    await asked(wa, "old question")
    wb = await ws(b, f"/ws?session={sid}")
    await wb.recv()
    await wb.send({"type": "set", "params": {"temperature": 0.7}})
    await wb.until("session")
    await wb.send({"type": "reset"})
    await wb.until("session")
    await b.app[CONVERSATIONS].persister.flush()  # B's record is in Redis
    await asked(wa, "new question")
    assert sent_turns(upstream) == [("user", "new question")]
    assert upstream.requests[-1]["body"].get("temperature") == 0.7
    await wa.close()
    await wb.close()


async def test_a_rename_through_b_shows_in_as_list_while_a_page_is_open_on_a(two):
    a, b = await two(TOKEN)
    wa = WS(await a.ws_connect("/ws", headers=AUTH))  # (the same owner through both instances)
    sid = (await wa.recv())["session"]
    await asked(wa, "what the title was")
    r = await b.patch(f"/api/sessions/{sid}", json={"title": "named through B"}, headers=AUTH)
    assert r.status == 200 and (await r.json())["title"] == "named through B", await r.text()

    async def title_on_a() -> str:
        r = await a.get("/api/sessions", headers=AUTH)
        assert r.status == 200, await r.text()
        return next(e["title"] for e in (await r.json())["sessions"] if e["session"] == sid)

    async with asyncio.timeout(5):  # B writes the record, then A hears of it: in the background
        while await title_on_a() != "named through B":
            await asyncio.sleep(0.02)
    await wa.close()


async def test_a_delete_through_b_closes_the_page_open_on_a(two):
    a, b = await two()
    wa = await ws(a)
    sid = (await wa.recv())["session"]
    await asked(wa, "soon gone")
    assert (await b.delete(f"/api/sessions/{sid}")).status == 200
    async with asyncio.timeout(5):
        msg = await wa.ws.receive()  # what a delete through A gives it: the socket closed, no error
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING), msg
    assert (await a.get(f"/api/sessions/{sid}")).status == 404


async def test_an_edit_through_b_is_shown_on_a_with_the_history_cut(two, upstream):
    a, b = await two()
    wa = await ws(a)
    sid = (await wa.recv())["session"]
    await asked(wa, "first")
    await asked(wa, "second")
    wb = await ws(b, f"/ws?session={sid}")
    await wb.recv()
    await wb.send({"type": "edit", "index": 0, "message": "first, edited"})
    await wb.until("done")
    frames = await wa.until("session")  # A follows B's reply and is shown the cut history
    assert [h["content"] for h in frames[-1]["history"]][:1] == ["first, edited"], frames
    assert "second" not in [h["content"] for h in frames[-1]["history"]], frames
    assert sent_turns(upstream) == [("user", "first, edited")]
    await wa.close()
    await wb.close()
