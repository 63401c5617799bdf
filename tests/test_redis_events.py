"""RedisEventLog on a real redis-server: the reply's path never waits for Redis, and what it
emits reaches the reply's own stream in order, one command for the events emitted together."""

from __future__ import annotations

from nexlm import redis_writer, wire
from nexlm.events import Outbox
from nexlm.records import Conversation
from nexlm.redis_conn import connect
from nexlm.redis_events import RedisEventLog, index_key, reply_key, seq_key


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
