"""Conversations that outlive the process (SQLite store), and replies that finish while nobody watches.

Real ``python app.py`` processes (restart, ``kill -9``, SIGTERM) against the fake upstream in
this process; the database file is read directly (another reader is allowed) to see checkpoints.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3

import aiohttp
import pytest
from conftest import extra_config
from fake_upstream import DONE, Script, chunk, reply, usage_chunk
from invariants import eventually, free_port, spawn_app, strict_json

from nexlm.persist import SEQ_SKIP, recover
from nexlm.records import Conversation

ROLE = chunk("", role=True)


def test_a_record_left_streaming_is_recovered_interrupted_with_its_seq_ahead():
    conv = Conversation("u:a", "c", "fake/fake-model", seq=40, history=[
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "so far", "finish_reason": "streaming", "model": "fake/fake-model"}])
    assert recover(conv) is True
    assert conv.history[-1] == {"role": "assistant", "content": "so far", "finish_reason": "interrupted",
                                "model": "fake/fake-model"}
    assert conv.seq == 40 + SEQ_SKIP
    assert recover(conv) is False and conv.seq == 40 + SEQ_SKIP  # once


def stored_history(path, sid: str) -> list[dict] | None:
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT record FROM sessions WHERE id = ?", (sid,)).fetchone()
    return None if row is None else json.loads(row[0])["history"]


class App:
    """One ``python app.py`` on a SQLite file; ``start`` again after it ended to restart it."""

    def __init__(self, upstream, tmp_path, extra: str = "") -> None:
        self.db = tmp_path / "nexlm.db"
        self.cfg = tmp_path / "nexlm.toml"
        self.cfg.write_text(extra_config(upstream.url, f'[store]\nkind = "sqlite"\npath = "{self.db}"\n{extra}'))
        self.port = free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await spawn_app(self.cfg, self.port)
        async with asyncio.timeout(20):
            line = await self.proc.stdout.readline()
        assert b"NexLM is running" in line, (line, await self.proc.stderr.read())

    async def end(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        async with asyncio.timeout(15):
            code = await self.proc.wait()
        stderr = (await self.proc.stderr.read()).decode()
        assert "Traceback" not in stderr, stderr
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def apps(upstream, tmp_path):
    made = []

    def make(extra: str = "") -> App:
        app = App(upstream, tmp_path, extra)
        made.append(app)
        return app

    yield make
    for app in made:
        await app.kill()


async def frames_until(ws, kind: str) -> list[dict]:
    out = []
    while not out or out[-1]["type"] != kind:
        out.append(strict_json((await ws.receive(timeout=10)).data))
    return out


def text_of(frames) -> str:
    return "".join(f["content"] for f in frames if f["type"] == "delta")


async def test_a_conversation_survives_a_restart(apps, upstream):
    app = apps()
    await app.start()
    upstream.push(reply("Paris", " it is."))
    async with aiohttp.ClientSession() as cs:
        ws = await cs.ws_connect(f"{app.url}/ws")
        sid = (await ws.receive_json(timeout=5))["session"]
        await ws.send_json({"type": "set", "params": {"temperature": 0.25}})
        await ws.send_json({"type": "chat", "message": "Capital of France?"})
        assert (await frames_until(ws, "done"))[-1]["finish_reason"] == "stop"
        before = (await (await cs.get(f"{app.url}/api/sessions/{sid}")).json())
        await ws.close()
    assert await app.end() == 0

    await app.start()
    upstream.push(reply("About 2 million."))
    async with aiohttp.ClientSession() as cs:
        ws = await cs.ws_connect(f"{app.url}/ws", params={"session": sid})
        frame = await ws.receive_json(timeout=5)
        assert frame["type"] == "session" and frame["session"] == sid
        assert [(t["role"], t["content"]) for t in frame["history"]] == [
            ("user", "Capital of France?"), ("assistant", "Paris it is.")]
        assert frame["history"][1]["finish_reason"] == "stop"
        assert frame["params"] == {"temperature": 0.25} and frame["history"] == before["history"]
        assert frame["seq"] == before["seq"]  # resume positions keep rising across the restart
        await ws.send_json({"type": "chat", "message": "And its population?"})
        done = (await frames_until(ws, "done"))[-1]
        assert done["finish_reason"] == "stop" and done["seq"] > before["seq"]
        await ws.close()
    sent = upstream.requests[-1]["body"]
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("user", "Capital of France?"), ("assistant", "Paris it is."), ("user", "And its population?")]
    assert sent["temperature"] == 0.25
    assert await app.end() == 0


async def test_kill_9_mid_reply_leaves_the_turn_interrupted_with_its_last_checkpoint(apps, upstream):
    app = apps()
    await app.start()
    gate = asyncio.Event()
    upstream.push(Script([ROLE, chunk("one "), chunk("two "), gate, chunk("three "), "hang"]))
    async with aiohttp.ClientSession() as cs:
        ws = await cs.ws_connect(f"{app.url}/ws")
        sid = (await ws.receive_json(timeout=5))["session"]
        await ws.send_json({"type": "chat", "message": "count"})
        frames = []
        while text_of(frames) != "one two ":
            frames.append(strict_json((await ws.receive(timeout=10)).data))
        # The checkpoint (at most about a second later) is in the file while the reply still runs.
        checkpointed = lambda: (stored_history(app.db, sid) or [{}])[-1].get("content") == "one two "  # noqa: E731
        await eventually(checkpointed, 10, lambda: stored_history(app.db, sid))
        assert stored_history(app.db, sid) == [
            {"role": "user", "content": "count"},
            {"role": "assistant", "content": "one two ", "finish_reason": "streaming", "model": "fake/fake-model"}]
        gate.set()  # one more event, sent after that checkpoint (the next one is about a second away)
        while text_of(frames) != "one two three ":
            frames.append(strict_json((await ws.receive(timeout=10)).data))
        app.proc.kill()  # SIGKILL: nothing runs on the way out
        await app.proc.wait()
        await ws.close()
    await upstream.wait_closed(1)
    seen = max(f["seq"] for f in frames if "seq" in f)

    await app.start()
    upstream.push(reply("three"))
    async with aiohttp.ClientSession() as cs:
        ws = await cs.ws_connect(f"{app.url}/ws", params={"session": sid})
        frame = await ws.receive_json(timeout=5)
        assert "running" not in frame
        # Its last checkpoint's text: "one two " (or, if a checkpoint fell between "three" and the kill, all of it).
        checkpoint = frame["history"][1]["content"] if len(frame["history"]) == 2 else None
        assert checkpoint in ("one two ", "one two three "), frame["history"]
        assert [(t["role"], t["content"], t.get("finish_reason")) for t in frame["history"]] == [
            ("user", "count", None), ("assistant", checkpoint, "interrupted")]
        await ws.send_json({"type": "chat", "message": "go on"})
        after = await frames_until(ws, "done")
        assert after[-1]["finish_reason"] == "stop"
        # The page ignores a seq it has seen: the new reply's events come after those before the crash.
        assert min(f["seq"] for f in after) > seen
        await ws.close()
    assert [m["content"] for m in upstream.requests[-1]["body"]["messages"]] == ["count", checkpoint, "go on"]
    assert await app.end() == 0
    assert [t.get("finish_reason") for t in stored_history(app.db, sid)] == [None, "interrupted", None, "stop"]


async def test_sigterm_records_every_running_reply_before_exit(apps, upstream):
    """One reply finishes within the grace, the other is interrupted at its end; both are on disk."""
    app = apps("[server]\nshutdown_grace_seconds = 1.0")
    await app.start()
    gate = asyncio.Event()
    upstream.push(Script([ROLE, chunk("slow "), "hang"]),
                  Script([ROLE, chunk("quick "), gate, chunk("end"), chunk(finish="stop"), usage_chunk(), DONE]))
    async with aiohttp.ClientSession() as cs:
        sids = []
        for message in ("first", "second"):
            ws = await cs.ws_connect(f"{app.url}/ws")
            sids.append((await ws.receive_json(timeout=5))["session"])
            await ws.send_json({"type": "chat", "message": message})
            await frames_until(ws, "delta")
        app.proc.send_signal(signal.SIGTERM)
        gate.set()
        async with asyncio.timeout(15):
            assert await app.proc.wait() == 0
    assert stored_history(app.db, sids[0])[-1] == {
        "role": "assistant", "content": "slow ", "finish_reason": "interrupted", "model": "fake/fake-model"}
    last = stored_history(app.db, sids[1])[-1]
    assert (last["content"], last["finish_reason"]) == ("quick end", "stop")


@pytest.mark.parametrize("store", ["sqlite", "memory"])
async def test_a_background_reply_runs_to_its_end_after_everyone_left(make_client, upstream, tmp_path, store):
    """``resume_grace_seconds = 0`` (the test config) would interrupt it: with background replies
    (the sqlite default; memory with ``background_replies = true``) it finishes and is stored."""
    extra = (f'[store]\nkind = "sqlite"\npath = "{tmp_path / "bg.db"}"' if store == "sqlite"
             else "[chat]\nbackground_replies = true")
    client = await make_client(extra)
    gate = asyncio.Event()
    upstream.push(Script([ROLE, chunk("while "), gate, chunk("you were away"), chunk(finish="stop"),
                          usage_chunk(), DONE]))
    ws = await client.ws_connect("/ws")
    sid = (await ws.receive_json(timeout=5))["session"]
    await ws.send_json({"type": "chat", "message": "tell me later"})
    await frames_until(ws, "delta")
    await ws.close()
    gate.set()
    await upstream.wait_closed(1)
    assert upstream.cut_by_client == 0  # it was read to its end, not cancelled
    ws = await client.ws_connect("/ws", params={"session": sid})
    frame = await ws.receive_json(timeout=5)
    assert "running" not in frame
    assert [(t["content"], t.get("finish_reason")) for t in frame["history"]] == [
        ("tell me later", None), ("while you were away", "stop")]
    await ws.close()


async def test_a_background_reply_can_still_be_stopped(make_client, upstream, tmp_path):
    client = await make_client(f'[store]\nkind = "sqlite"\npath = "{tmp_path / "bg.db"}"')
    upstream.push(Script([ROLE, chunk("partial"), "hang"]))
    ws = await client.ws_connect("/ws")
    sid = (await ws.receive_json(timeout=5))["session"]
    await ws.send_json({"type": "chat", "message": "long one"})
    await frames_until(ws, "delta")
    await ws.close()
    resp = await client.get(f"/api/sessions/{sid}")
    assert (await resp.json())["running"]  # nobody listens, and it runs on
    resp = await client.post(f"/api/sessions/{sid}/stop")
    assert resp.status == 200, await resp.text()
    await upstream.wait_closed(1)
    data = await (await client.get(f"/api/sessions/{sid}")).json()
    assert "running" not in data
    assert (data["history"][-1]["content"], data["history"][-1]["finish_reason"]) == ("partial", "stopped")


async def test_without_background_replies_a_reply_nobody_follows_is_interrupted(make_client, upstream, tmp_path):
    """``background_replies = false`` with sqlite: the resume grace (0 here) applies as in memory."""
    client = await make_client(f'[store]\nkind = "sqlite"\npath = "{tmp_path / "fg.db"}"\n'
                               "[chat]\nbackground_replies = false")
    upstream.push(Script([ROLE, chunk("partial"), "hang"]))
    ws = await client.ws_connect("/ws")
    sid = (await ws.receive_json(timeout=5))["session"]
    await ws.send_json({"type": "chat", "message": "long one"})
    await frames_until(ws, "delta")
    await ws.close()
    await upstream.wait_closed(1)
    data = await (await client.get(f"/api/sessions/{sid}")).json()
    assert data["history"][-1]["finish_reason"] == "interrupted"


def test_a_streaming_turn_is_the_running_reply_not_context_nor_history_to_draw():
    """A record read while its reply still runs elsewhere (a shared store) ends with a ``streaming``
    turn: it is not sent upstream as context, and the session frame leaves it to the replayed events."""
    from nexlm import wire
    from nexlm.config import ChatConfig
    from nexlm.context import context

    conv = Conversation("u:a", "c", "fake/fake-model", history=[
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "finish_reason": "stop"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "half", "finish_reason": "streaming"}])
    assert [t["content"] for t in wire.session(conv)["history"]] == ["q1", "a1", "q2"]
    conv.history.append({"role": "user", "content": "q3"})
    assert [m["content"] for m in context(conv, ChatConfig())] == ["q1", "a1", "q3"]


class _Puts:
    """A store that keeps what it was given to write (as other instances would read it)."""

    durable, shared = True, True

    def __init__(self) -> None:
        self.puts: list[Conversation] = []

    async def put(self, conv: Conversation) -> None:
        self.puts.append(conv)


async def test_a_settled_reply_writes_nothing_after_its_done_unless_something_changed_meanwhile():
    """A shared store: ``settle`` stores the reply's final record before its ``done``; the commit after
    ``done`` writes nothing more (another instance may reset the conversation on that ``done``), unless
    a change was asked for meanwhile."""
    from nexlm.persist import Persister
    from nexlm.runner import Live

    store = _Puts()
    persister = Persister(store)  # type: ignore[arg-type]
    live = Live(Conversation("u:a", "c", "fake/fake-model", seq=7, history=[{"role": "user", "content": "q"}]))
    final = [*live.conv.history, {"role": "assistant", "content": "a", "finish_reason": "stop"}]
    await persister.settle(live, final)
    assert [(c.history, c.seq) for c in store.puts] == [(final, 8)]  # the record as done leaves it
    live.conv.history[:] = final
    persister.ended(live)  # the runner's commit after done
    await persister.flush()
    assert len(store.puts) == 1
    await persister.settle(live, final)
    persister.write_soon(live)  # a setting changed between the settle and the done
    await persister.flush()
    persister.ended(live)
    await persister.flush()
    assert len(store.puts) == 4
    await persister.close()
