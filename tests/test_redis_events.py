"""RedisEventLog on a real redis-server: the reply's path never waits for Redis, and what it
emits reaches the reply's own stream in order, one command for the events emitted together. On a
three-node Redis Cluster: another instance's reader gets it all in order, once each."""

from __future__ import annotations

import asyncio

import pytest

from nexlm import redis_follow_cluster, redis_writer, wire
from nexlm.events import Outbox
from nexlm.records import Conversation
from nexlm.redis_conn import connect
from nexlm.redis_events import RedisEventLog, index_key, reply_key, running_key, seq_key
from nexlm.redis_follow_cluster import ClusterEventLog


async def test_emit_buffers_and_one_command_sends_the_events_in_order(redis_server, monkeypatch):
    conn = await connect(redis_server.url)
    try:
        log = RedisEventLog(conn.client, "test-instance", keep=5.0)
        pipelines, commands = [], []
        real = conn.client.pipeline

        def counted(*args, **kwargs):
            pipelines.append(1)
            return real(*args, **kwargs)

        conn.client.pipeline = counted
        real_command = redis_writer.command

        async def counted_command(client, packed):
            commands.append(packed[:40])
            return await real_command(client, packed)

        monkeypatch.setattr(redis_writer, "command", counted_command)
        conv = Conversation(None, "client", "fake-model")
        listener = Outbox()
        log.subscribe(conv.id, listener)
        log.begin(conv.id, "r1")
        log.emit(conv, "r1", wire.start("r1", "fake-model"))
        for i in range(100):
            log.emit(conv, "r1", wire.delta("r1", f"t{i} "))
        log.emit(conv, "r1", wire.done("r1", "stop", None, "fake-model", {}, None))
        log.end(conv.id, "r1")
        assert pipelines == commands == []  # nothing sent yet: emitting never touches Redis
        assert len(listener) > 0  # the local listener has them already (merged deltas)
        await log.flush()
        # begin (the replies index) in a pipeline, the 102 events in one EVAL, then end's pipeline
        assert len(pipelines) == 2 and len(commands) == 1 and b"EVAL" in commands[0]
        entries = await conn.client.xrange(reply_key(conv.id, "r1"))
        assert [int(e[0].split(b"-")[1]) for e in entries] == list(range(1, 103))
        assert int(await conn.client.get(seq_key(conv.id))) == 102 == conv.seq
        assert await conn.client.pttl(reply_key(conv.id, "r1")) > 0  # expires after the resume grace
        [(_, fields)] = await conn.client.xrange(index_key(conv.id))
        assert fields == {b"r": b"r1", b"i": b"test-instance"}
    finally:
        await conn.close()


async def test_done_reaches_local_listeners_after_the_flush_even_when_writing_fails(redis_server, monkeypatch):
    """A reply's done waits for the writer's batch; a batch that fails (Redis gone, or anything
    unexpected) must still hand it over, or the local clients would wait for it forever."""
    conn = await connect(redis_server.url)
    try:
        log = RedisEventLog(conn.client, "test-instance", keep=5.0)

        async def failing(client, packed, errors=[ConnectionError("gone"), RuntimeError("bug")]):  # noqa: B006
            raise errors.pop(0)

        monkeypatch.setattr(redis_writer, "command", failing)
        for n in (1, 2):
            conv = Conversation(None, "client", "fake-model")
            listener = Outbox()
            log.subscribe(conv.id, listener)
            log.begin(conv.id, "r")
            log.emit(conv, "r", wire.start("r", "fake-model"))
            log.emit(conv, "r", wire.done("r", "stop", None, "fake-model", {}, None))
            log.end(conv.id, "r")
            assert [e["type"] for e in await listener.get()] == ["start"]  # done waits for the batch
            await log.flush()  # fails (a connection error, then an unexpected one) and hands done over
            assert [e["type"] for e in await listener.get()] == ["done"]
    finally:
        await conn.close()


class Recorder(Outbox):
    """A listener that keeps every event it is given, unmerged (a duplicate or gap shows)."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[dict] = []
        self.ended = asyncio.Event()
        self.last: str | None = None  # the reply whose done ends what this listener waits for

    def put(self, event: dict) -> None:
        self.got.append(event)
        if event["type"] == "done" and event["reply"] == self.last:
            self.ended.set()


def spread_sessions(client, per_node: int = 2) -> list[Conversation]:
    """Sessions whose slots lie on every node of the cluster, ``per_node`` each at least."""
    convs, nodes = [], {}
    while len(nodes) < len(client.get_primaries()) or min(nodes.values()) < per_node:
        conv = Conversation(None, "client", "fake-model")
        node = client.nodes_manager.get_node_from_slot(client.keyslot(index_key(conv.id))).name
        nodes[node] = nodes.get(node, 0) + 1
        convs.append(conv)
    return convs


@pytest.mark.parametrize("announcements", ["delivered", "lost"])
async def test_cluster_reader_in_order_no_gap_no_duplicate(redis_cluster, monkeypatch, announcements):
    """Instance W writes replies in many sessions (on every node); instance R's listeners get each
    session's events exactly once, in order, with nothing missing: woken by W's announcements only
    (no safety poll), or by the safety poll only (every announcement lost)."""
    if announcements == "delivered":
        monkeypatch.setattr(redis_follow_cluster, "POLL", 3600.0)
    else:
        monkeypatch.setattr(redis_follow_cluster, "POLL", 0.05)
    wconn, rconn = await connect(redis_cluster.url), await connect(redis_cluster.url)
    assert wconn.cluster and rconn.cluster
    w = ClusterEventLog(wconn.client, "inst-w", keep=30.0)
    r = ClusterEventLog(rconn.client, "inst-r", keep=30.0)
    if announcements == "lost":
        async def lost(sessions):
            return None
        w.tell_readers = lost
    tasks = [asyncio.create_task(w.run_writer()), asyncio.create_task(r.run_reader())]
    try:
        convs = spread_sessions(rconn.client)
        early, late = convs[::2], convs[1::2]  # R listens before W starts / joins mid-reply
        rec = {c.id: Recorder() for c in convs}
        for c in early:
            await r.refresh(c.id)
            r.subscribe(c.id, rec[c.id])
        for c in convs:
            rid = f"a{c.id}"
            w.begin(c.id, rid)
            w.announce(rid)  # listed in the session's replies index (the facade does it once the record is stored)
            w.emit(c, rid, wire.start(rid, "fake-model"))
            await wconn.client.set(running_key(c.id), f"inst-w:{rid}")  # the lease redis_live would take
        for i in range(30):
            for c in convs:
                w.emit(c, f"a{c.id}", wire.delta(f"a{c.id}", f"{i} "))
            if i % 7 == 0:
                await asyncio.sleep(0.01)  # let the writer send some, so R reads while W writes
            if i == 10:
                for c in late:
                    await r.refresh(c.id)
                    r.subscribe(c.id, rec[c.id])
        big = convs[0]
        for i in range(2500):  # more than one read's worth in one flush
            w.emit(big, f"a{big.id}", wire.delta(f"a{big.id}", "x"))
        for c in convs:  # the first reply ends, a second starts in the same session (a new stream)
            w.emit(c, f"a{c.id}", wire.done(f"a{c.id}", "stop", None, "fake-model", {}, None))
            w.end(c.id, f"a{c.id}")
            rec[c.id].last = f"b{c.id}"
            w.begin(c.id, f"b{c.id}")
            w.announce(f"b{c.id}")
            w.emit(c, f"b{c.id}", wire.start(f"b{c.id}", "fake-model"))
        await asyncio.sleep(0.01)
        for c in convs:
            w.emit(c, f"b{c.id}", wire.delta(f"b{c.id}", "second"))
            w.emit(c, f"b{c.id}", wire.done(f"b{c.id}", "stop", None, "fake-model", {}, None))
            w.end(c.id, f"b{c.id}")
        async with asyncio.timeout(30):  # a guard against a test that never ends, not a speed check
            for c in convs:
                await rec[c.id].ended.wait()
        for c in convs:
            got = rec[c.id].got
            assert [e["seq"] for e in got] == list(range(1, c.seq + 1)), c.id  # every event once, in order
            assert [e["reply"] for e in got if e["type"] in ("start", "done")] == [f"a{c.id}"] * 2 + [f"b{c.id}"] * 2
            assert "".join(e["content"] for e in got if e["type"] == "delta" and e["reply"] == f"a{c.id}") == \
                "".join(f"{i} " for i in range(30)) + ("x" * 2500 if c is big else "")
        assert not r._follows  # every followed reply ended with its done
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wconn.close()
        await rconn.close()


async def test_a_change_notice_in_the_replies_index_is_never_taken_for_a_reply(redis_server):
    """``change`` writes an index entry without ``r``: ``refresh`` still finds the session's replies
    (the newest, behind more notices than it keeps replies), and the reader hands the notice to
    ``on_remote_change`` without following anything."""
    conn = await connect(redis_server.url)
    try:
        here, there = RedisEventLog(conn.client, "here", keep=5.0), RedisEventLog(conn.client, "there", keep=5.0)
        conv = Conversation(None, "client", "fake-model")
        there.begin(conv.id, "r1")
        there.emit(conv, "r1", wire.start("r1", "fake-model"))
        there.emit(conv, "r1", wire.done("r1", "stop", None, "fake-model", {}, None))
        there.end(conv.id, "r1")
        for what in ("set", "title", "set", "set"):
            there.change(conv.id, what)
        await there.flush()
        entries = await conn.client.xrange(index_key(conv.id))
        assert [f for _, f in entries][-1] == {b"c": b"set", b"i": b"there"} and len(entries) == 5
        await here.refresh(conv.id)
        assert here.last_reply(conv.id) == "r1" and here.missed(conv.id, 0)
        assert [r[0] for r in here._snap[conv.id].replies] == ["r1"]
        heard = []
        here.on_remote_change = lambda cid, what: heard.append((cid, what))
        here._indexed(conv.id, [(entries[-1][0], entries[-1][1]), (b"99-0", [b"c", b"reset", b"i", b"there"])])
        assert heard == [(conv.id, "set"), (conv.id, "reset")]
        assert here._follows == {} and [r[0] for r in here._snap[conv.id].replies] == ["r1"]
        assert here._watch[conv.id] == b"99-0"
        here._indexed(conv.id, [(b"100-0", {b"c": b"set", b"i": b"here"})])  # its own: not told again
        assert len(heard) == 2
    finally:
        await conn.close()
