"""Several NexLM processes sharing one redis-server behave as one server, live (issue 13).

Real ``python app.py`` processes (tests/cluster.py) against the fake upstream in this process,
whose gates (``asyncio.Event`` steps) pace each reply, so nothing here waits on a clock: a reply
running on instance A is followed by a client of instance B (whose view has its question),
stopped, reset or deleted through B, resumed on B
after a dropped connection, refused as ``busy`` through B, and ended ``interrupted`` by B when A
is killed; each on one redis-server and on a three-node Redis Cluster. The same through a real
nginx (round robin) at the end.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from cluster import Instances, Nginx, Sock, is_delta
from fake_upstream import DONE, Script, chunk, usage_chunk
from redis_servers import command

pytestmark = pytest.mark.slow

ROLE = chunk("", role=True)


def gated(*pieces: str) -> tuple[Script, list[asyncio.Event]]:
    """A reply whose every piece after the first waits for its gate."""
    gates = [asyncio.Event() for _ in pieces[1:]]
    steps: list = [ROLE, chunk(pieces[0])]
    for gate, piece in zip(gates, pieces[1:]):
        steps += [gate, chunk(piece)]
    return Script(steps + [chunk(finish="stop"), usage_chunk(), DONE]), gates


def numbered(frames: list[dict], rid: str) -> list[dict]:
    return [f for f in frames if f.get("reply") == rid and "seq" in f]


def in_order(events: list[dict]) -> bool:
    seqs = [e["seq"] for e in events]
    return seqs == sorted(set(seqs))


async def history(cs, base: str, sid: str) -> list[dict]:
    async with cs.get(f"{base}/api/sessions/{sid}") as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["history"]


async def started(a: Sock, message: str = "question") -> tuple[str, str]:
    """Chat on ``a``: (session id, reply id) once its first delta arrived."""
    sid = a.frames[0]["session"]
    await a.send({"type": "chat", "message": message})
    start = await a.until(lambda f: f["type"] == "start")
    await a.until(lambda f: f["type"] == "delta")
    return sid, start["reply"]


@pytest.fixture(params=["redis_server", "redis_cluster"])
async def two(request, tmp_path, upstream):
    """Two instances on one redis-server, then on a three-node Redis Cluster (whose reader follows
    other instances' replies by announcements and per-session reads, not one XREAD)."""
    redis = request.getfixturevalue(request.param)
    for node in getattr(redis, "nodes", [redis]):  # (the per-client limits are counted in Redis: start afresh)
        assert command(node.port, "FLUSHALL").startswith("+OK")
    async with Instances(tmp_path, upstream.url, redis.url, n=2) as inst:
        yield inst


@pytest.mark.parametrize("door", ["ws", "http"])
async def test_followed_on_b_stopped_through_b_busy_through_b(two, upstream, door):
    script, gates = gated("one ", "two ", "three")
    upstream.push(script)
    async with aiohttp.ClientSession() as cs:
        a = await Sock.open(cs, f"{two.url(0)}/ws")
        await a.next()
        sid, rid = await started(a)
        b = await Sock.open(cs, f"{two.url(1)}/ws?session={sid}")
        frame = await b.next()
        assert frame["type"] == "session" and frame["running"]["reply"] == rid, frame
        await b.until(is_delta("one "))  # the reply so far, from its start
        gates[0].set()
        await a.until(is_delta("two "))
        await b.until(is_delta("two "))
        await b.send({"type": "chat", "message": "meanwhile"})
        busy = await b.until(lambda f: f["type"] == "error")
        assert busy["code"] == "busy", busy
        async with cs.post(f"{two.url(1)}/sse", json={"session": sid, "message": "meanwhile"}) as resp:
            assert resp.status == 409 and (await resp.json())["code"] == "busy"
        if door == "ws":
            await b.send({"type": "stop"})
        else:
            async with cs.post(f"{two.url(1)}/api/sessions/{sid}/stop") as resp:
                assert resp.status == 200 and (await resp.json()) == {"stopped": True}
        done_b = await b.until(lambda f: f["type"] == "done")
        done_a = await a.until(lambda f: f["type"] == "done")
        await upstream.wait_closed(1)  # A's upstream request was closed, not left to finish
        assert upstream.cut_by_client == 1
        assert done_a["finish_reason"] == done_b["finish_reason"] == "stopped"
        assert done_a["seq"] == done_b["seq"]
        assert a.text(rid) == b.text(rid) == "one two "
        ev_a, ev_b = numbered(a.frames, rid), numbered(b.frames, rid)
        assert in_order(ev_a) and in_order(ev_b), (ev_a, ev_b)
        assert [e["type"] for e in ev_b][0] == "start"
        for base in (two.url(0), two.url(1)):
            await settled(lambda base=base: _last_turn_is(cs, base, sid, "one two ", "stopped"),
                          f"the stored turn through {base}")
        # The lease was let go with the reply: the next turn works through B.
        upstream.push(Script([ROLE, chunk("again"), chunk(finish="stop"), usage_chunk(), DONE]))
        await b.send({"type": "chat", "message": "next"})
        done = await b.until(lambda f: f["type"] == "done")
        assert done["finish_reason"] == "stop" and done["seq"] > done_b["seq"]
        await a.until(lambda f: f["type"] == "done" and f["reply"] == done["reply"])  # A follows B's reply
        assert a.text(done["reply"]) == "again"
        # A, listening all along, holds the whole conversation: B's question and answer included.
        await settled(lambda: _last_turn_is(cs, two.url(0), sid, "again", "stop"), "A's copy after B's reply")
        h = await history(cs, two.url(0), sid)
        assert [(t["role"], t["content"]) for t in h] == [
            ("user", "question"), ("assistant", "one two "), ("user", "next"), ("assistant", "again")], h


async def settled(check, what: str, timeout: float = 10.0) -> None:
    """Poll an async ``check`` (a record written by another process) until it holds."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def _last_turn_is(cs, base, sid, text, finish) -> bool:
    h = await history(cs, base, sid)
    return bool(h) and h[-1].get("content") == text and h[-1].get("finish_reason") == finish


def turns(h: list[dict]) -> list[tuple[str, str]]:
    return [(t["role"], t["content"]) for t in h]


async def session_of(cs, base: str, sid: str) -> dict:
    async with cs.get(f"{base}/api/sessions/{sid}") as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_the_question_of_a_reply_running_on_a_is_in_bs_view(two, upstream):
    """B held the conversation (a listener) before A's turn began: during A's reply, B's session frame
    and GET show the question with the reply running, and after its done the turn once."""
    script, gates = gated("one ", "two ", "three")
    upstream.push(script)
    async with aiohttp.ClientSession() as cs:
        a = await Sock.open(cs, f"{two.url(0)}/ws")
        sid = (await a.next())["session"]
        b0 = await Sock.open(cs, f"{two.url(1)}/ws?session={sid}")
        assert (await b0.next())["history"] == []
        sid, rid = await started(a)
        await b0.until(is_delta("one "))  # B heard of the reply (its index) and follows it
        b1 = await Sock.open(cs, f"{two.url(1)}/ws?session={sid}")
        frame = await b1.next()
        assert frame["type"] == "session" and turns(frame["history"]) == [("user", "question")], frame
        assert frame["running"]["reply"] == rid, frame
        await b1.until(is_delta("one "))  # the running reply replayed after the frame
        got = await session_of(cs, two.url(1), sid)
        assert turns(got["history"]) == [("user", "question")] and got["running"]["reply"] == rid, got
        for gate in gates:
            gate.set()
        for s in (a, b0, b1):
            done = await s.until(lambda f: f["type"] == "done")
            assert done["reply"] == rid and s.text(rid) == "one two three"
        whole = [("user", "question"), ("assistant", "one two three")]
        await settled(lambda: _last_turn_is(cs, two.url(1), sid, "one two three", "stop"), "B's copy after done")
        got = await session_of(cs, two.url(1), sid)
        assert turns(got["history"]) == whole and "running" not in got, got
        b2 = await Sock.open(cs, f"{two.url(1)}/ws?session={sid}")
        assert turns((await b2.next())["history"]) == whole


async def followed(cs, two) -> tuple[Sock, Sock, str, str]:
    """A reply running on A (its first delta "one " streamed) and followed from B:
    (A's socket, B's socket, session id, reply id)."""
    a = await Sock.open(cs, f"{two.url(0)}/ws")
    await a.next()
    sid, rid = await started(a)
    b = await Sock.open(cs, f"{two.url(1)}/ws?session={sid}")
    await b.next()
    await b.until(is_delta("one "))
    return a, b, sid, rid


async def stopped_on_a(a: Sock, rid: str, upstream) -> None:
    """A's reply ended ``stopped`` with the text streamed, its upstream request closed by A."""
    done = await a.until(lambda f: f["type"] == "done")
    assert done["reply"] == rid and done["finish_reason"] == "stopped" and a.text(rid) == "one "
    await upstream.wait_closed(1)
    assert upstream.cut_by_client == 1


async def test_reset_through_b_stops_the_reply_on_a_first(two, upstream):
    script, gates = gated("one ", "two ")
    upstream.push(script)
    async with aiohttp.ClientSession() as cs:
        a, b, sid, rid = await followed(cs, two)
        await b.send({"type": "reset"})
        frame = await b.until(lambda f: f["type"] == "session")
        assert frame["history"] == [] and "running" not in frame, frame
        await stopped_on_a(a, rid, upstream)
        gates[0].set()  # (its upstream is gone: nothing more comes)
        await a.ws.close()
        await b.ws.close()
        # The stopped reply wrote nothing after its done: the reset record is what both serve.
        for base in (two.url(0), two.url(1)):
            await settled(lambda base=base: _history_is(cs, base, sid, []), f"the reset record through {base}")
        upstream.push(Script([ROLE, chunk("fresh answer"), chunk(finish="stop"), usage_chunk(), DONE]))
        c = await Sock.open(cs, f"{two.url(0)}/ws?session={sid}")
        assert (await c.next())["history"] == []
        await c.send({"type": "chat", "message": "fresh"})
        assert (await c.until(lambda f: f["type"] == "done"))["finish_reason"] == "stop"
        sent = upstream.requests[-1]["body"]["messages"]
        assert [m["content"] for m in sent if m["role"] == "user"] == ["fresh"], sent


async def test_delete_through_b_stops_the_reply_on_a_and_it_stays_deleted(two, upstream):
    script, gates = gated("one ", "two ")
    upstream.push(script)
    async with aiohttp.ClientSession() as cs:
        a = await Sock.open(cs, f"{two.url(0)}/ws")
        await a.next()
        sid, rid = await started(a)
        async with cs.delete(f"{two.url(1)}/api/sessions/{sid}") as resp:
            assert resp.status == 200 and (await resp.json()) == {"deleted": sid}
        await stopped_on_a(a, rid, upstream)
        gates[0].set()  # where the reply would have gone on and ended
        await a.ws.close()
        for base in (two.url(0), two.url(1)):
            await settled(lambda base=base: _status_is(cs, base, sid, 404), f"the session gone through {base}")
        c = await Sock.open(cs, f"{two.url(0)}/ws?session={sid}")  # a new session, not the deleted one
        assert (await c.next())["session"] != sid


def answer(text: str) -> Script:
    return Script([ROLE, chunk(text), chunk(finish="stop"), usage_chunk(), DONE])


async def test_a_page_open_on_a_is_shown_bs_set_and_reset_and_its_next_turn_uses_them(two, upstream):
    """Nothing running: B's ``set`` and ``reset`` come to A's open page as the ``session`` frame a
    local one sends, and A's next turn has B's params and none of the reset turns."""
    async with aiohttp.ClientSession() as cs:
        a = await Sock.open(cs, f"{two.url(0)}/ws")
        sid = (await a.next())["session"]
        upstream.push(answer("old answer"))
        await a.send({"type": "chat", "message": "old question"})
        await a.until(lambda f: f["type"] == "done")
        b = await Sock.open(cs, f"{two.url(1)}/ws?session={sid}")
        assert turns((await b.next())["history"]) == [("user", "old question"), ("assistant", "old answer")]
        await b.send({"type": "set", "params": {"temperature": 0.2}})
        await b.until(lambda f: f["type"] == "session")
        frame = await a.until(lambda f: f["type"] == "session")
        assert frame["params"].get("temperature") == 0.2 and len(frame["history"]) == 2, frame
        await b.send({"type": "reset"})
        await b.until(lambda f: f["type"] == "session")
        frame = await a.until(lambda f: f["type"] == "session")
        assert frame["history"] == [] and frame["params"].get("temperature") == 0.2, frame
        upstream.push(answer("fresh answer"))
        await a.send({"type": "chat", "message": "fresh"})
        assert (await a.until(lambda f: f["type"] == "done"))["finish_reason"] == "stop"
        body = upstream.requests[-1]["body"]
        assert [(m["role"], m["content"]) for m in body["messages"] if m["role"] != "system"] == [("user", "fresh")]
        assert body.get("temperature") == 0.2
        await b.until(lambda f: f["type"] == "done")  # B follows A's turn; its copy is the new one
        await settled(lambda: _history_is(cs, two.url(1), sid, [("user", "fresh"), ("assistant", "fresh answer")]),
                      "B's copy after A's turn")


async def _history_is(cs, base, sid, want) -> bool:
    return turns(await history(cs, base, sid)) == want


async def _status_is(cs, base, sid, status) -> bool:
    async with cs.get(f"{base}/api/sessions/{sid}") as resp:
        return resp.status == status


async def test_dropped_on_a_resumes_on_b_with_after_and_last_event_id(two, upstream):
    script, gates = gated("one ", "two ", "three ", "four")
    upstream.push(script)
    async with aiohttp.ClientSession() as cs:
        a = await Sock.open(cs, f"{two.url(0)}/ws")
        await a.next()
        sid, rid = await started(a)
        seen = numbered(a.frames, rid)
        after = seen[-1]["seq"]
        await a.ws.close()  # the connection to A drops; the reply runs on (resume grace)
        gates[0].set()
        # WebSocket: /ws?session=ID&after=SEQ on B.
        b = await Sock.open(cs, f"{two.url(1)}/ws?session={sid}&after={after}")
        await b.until(is_delta("two "))
        # SSE: EventSource's reconnect (Last-Event-ID) on B, from the same point.
        async with cs.get(f"{two.url(1)}/sse", params={"session": sid}, headers={"Last-Event-ID": str(after)}) as resp:
            assert resp.status == 200
            gates[1].set()
            await b.until(is_delta("three "))
            gates[2].set()
            sse = [json.loads(line[6:]) async for line in _sse_data(resp)]
        done = await b.until(lambda f: f["type"] == "done")
        assert done["finish_reason"] == "stop"
        missed_ws = numbered(b.frames, rid)
        missed_sse = [e for e in sse if e.get("reply") == rid]
        for got in (missed_ws, missed_sse):
            assert in_order(got) and got[0]["seq"] > after, got
            assert "".join(e["content"] for e in seen + got if e["type"] == "delta") == "one two three four"
            assert got[-1]["type"] == "done"


async def _sse_data(resp):
    """The ``data:`` lines of an SSE response, until its ``done``."""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            yield line
            if json.loads(line[6:])["type"] == "done":
                return


async def test_instance_killed_mid_reply_is_interrupted_by_another(two, upstream):
    script, gates = gated("one ", "never")
    upstream.push(script)
    async with aiohttp.ClientSession() as cs:
        a, b, sid, rid = await followed(cs, two)
        two.kill(0)  # kill -9: no done, no lease release, its lease just stops being renewed
        # Lease (10 s) plus the reaper's round: the guard only fails a test that never ends.
        done = await b.until(lambda f: f["type"] == "done", timeout=40)
        assert done["reply"] == rid and done["finish_reason"] == "interrupted"
        assert b.text(rid) == "one "
        await settled(lambda: _last_turn_is(cs, two.url(1), sid, "one ", "interrupted"), "the stored turn")
        upstream.push(Script([ROLE, chunk("after"), chunk(finish="stop"), usage_chunk(), DONE]))
        await b.send({"type": "chat", "message": "next"})
        done = await b.until(lambda f: f["type"] == "done")
        assert done["finish_reason"] == "stop" and b.text(done["reply"]) == "after"
        h = await history(cs, two.url(1), sid)
        assert [t["role"] for t in h] == ["user", "assistant", "user", "assistant"], h


async def test_through_nginx_round_robin(tmp_path, upstream, redis_server):
    async with Instances(tmp_path, upstream.url, redis_server.url, n=3) as inst:
        nginx = Nginx(tmp_path / "nginx", inst.ports)
        try:
            await _through_nginx(inst, nginx, upstream)
        finally:
            nginx.stop()


async def _through_nginx(inst, nginx, upstream):
    script, gates = gated("one ", "two ", "three")
    upstream.push(script)
    async with aiohttp.ClientSession() as cs:
        a = await Sock.open(cs, f"{nginx.url}/ws")
        await a.next()
        sid, rid = await started(a)
        b = await Sock.open(cs, f"{nginx.url}/ws?session={sid}")  # round robin: the next instance
        assert (await b.next())["running"]["reply"] == rid
        await b.until(is_delta("one "))
        counts = [await _websockets(cs, inst.url(i)) for i in range(inst.n)]
        assert sorted(counts) == [0, 1, 1], counts  # two instances, one socket each
        gates[0].set()
        await b.until(is_delta("two "))
        async with cs.post(f"{nginx.url}/api/sessions/{sid}/stop") as resp:  # a third instance
            assert (await resp.json()) == {"stopped": True}
        for s in (a, b):
            done = await s.until(lambda f: f["type"] == "done")
            assert done["finish_reason"] == "stopped" and s.text(rid) == "one two "
        await upstream.wait_closed(1)
        # SSE through nginx (proxy_buffering off): a new turn, streamed as it comes.
        script, gates = gated("x ", "y")
        upstream.push(script)
        async with cs.post(f"{nginx.url}/sse", json={"session": sid, "message": "sse"}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            first = [json.loads((await _next_data(resp))[6:]) for _ in range(3)]  # session, start, delta
            assert [f["type"] for f in first] == ["session", "start", "delta"], first
            gates[0].set()
            rest = [json.loads(line[6:]) async for line in _sse_data(resp)]
        assert "".join(f["content"] for f in first + rest if f["type"] == "delta") == "x y"


async def _next_data(resp) -> str:
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended")


async def _websockets(cs, base: str) -> int:
    async with cs.get(f"{base}/api/metrics") as resp:
        return (await resp.json())["websockets"]
