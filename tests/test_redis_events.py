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
