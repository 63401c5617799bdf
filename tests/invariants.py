"""The "nothing lost" invariants of issue 5, and the recording clients the fault tests use.

``Harness`` wraps one app under test (a ``TestClient``) and its ``FakeUpstream``.
Every WebSocket (``Peer``) and event stream (``SSEStream``) opened through it
records what the client received, and ``Peer.chat``/``Harness.start`` record
which user messages the server accepted (it answered with ``start``).
``await h.check()`` then asserts, once things settle:

- every frame/event received was strict JSON (no ``NaN``) with a known type, and
  reply events carried rising ``seq`` numbers on each connection;
- each accepted user message appears once, in order, in its session's history;
  every user turn is followed by exactly one assistant turn (none left streaming);
- the assistant turn of every reply a client saw from ``start`` to ``done`` holds
  exactly the text that was streamed to it, with the ``done``'s finish_reason;
- every ``start`` a still-connected client saw was followed by exactly one ``done`` (also when the
  server closed it with 1000/1001; a 1013, "too far behind", may cut a reply short: it resumes);
  a server's close code is one the protocol documents;
- no session has a running reply, a grace timer or a listener left; the limiter's
  counters are back to zero; the chat layer holds no reply task;
- no task running NexLM code is left behind (beyond the app's sweeper and loop-lag
  tasks), and the fake upstream has no open request;
- no byte any client received contains a configured API key.

Waits are bounded polls (``eventually``), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import struct
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from aiohttp import WSMsgType

from nexlm.appkeys import CONVERSATIONS

NEXLM_DIR = str(Path(__file__).resolve().parent.parent / "nexlm")
APP_TASKS = ("session sweeper", "loop lag")  # the app's own long-lived tasks
KINDS = {"session", "start", "status", "delta", "reasoning", "done", "error", "pong"}
REPLY_KINDS = {"start", "status", "delta", "reasoning", "done"}
FINISH_REASONS = {"stop", "length", "stopped", "error", "interrupted", "content_filter", "tool_calls"}
# What a server close may say (docs/protocol.md): 1000/1001 end cleanly, after every reply's done;
# 1013 (too far behind, or no session) and 1003/1009 (bad frames) may cut a reply short; 1006: cut.
CLOSE_CODES = {1000, 1001, 1003, 1006, 1009, 1013}
_SURROGATE = re.compile("[\ud800-\udfff]")


# ---------------------------------------------------------------------------- small helpers

def _no_constants(name: str):
    raise ValueError(f"not JSON: {name}")


def strict_json(text: str):
    """``json.loads`` that refuses ``NaN``/``Infinity``: what a browser's JSON.parse accepts."""
    return json.loads(text, parse_constant=_no_constants)


def clean(text: str) -> str:
    """What the server should store for a user's text: NULs dropped, lone surrogates replaced."""
    return _SURROGATE.sub("\ufffd", text.replace("\x00", ""))


async def eventually(predicate, timeout: float, what) -> None:
    """Poll ``predicate`` until it holds; fail with ``what()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled after {timeout:g} s: {what() if callable(what) else what}")
        await asyncio.sleep(0.01)


def history_problems(history: list[dict], finish_reasons=FINISH_REASONS) -> list[tuple[str, str]]:
    """What is wrong with a stored history's shape: roles must alternate user, assistant (no user turn
    left without its reply) and every assistant turn has a known finish_reason. Also used by
    bench/soak.py on the histories it fetches (``GET /api/sessions/{id}``)."""
    out = []
    for i, turn in enumerate(history):
        want = "user" if i % 2 == 0 else "assistant"
        if turn.get("role") != want:
            out.append(("history_not_alternating", f"at {i}: {turn.get('role')}"))
            break
        if want == "assistant" and turn.get("finish_reason") not in finish_reasons:
            out.append(("history_bad_finish", f"at {i}: {turn.get('finish_reason')}"))
    if len(history) % 2:
        out.append(("history_user_without_reply", f"len={len(history)}"))
    return out


APP = Path(__file__).resolve().parent.parent / "app.py"


def app_env() -> dict:
    """The environment without anything that would configure NexLM behind a test's back."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("NEXLM_", "DEEPSEEK_", "OPENAI_", "LOCAL_LLM", "LOCAL_MODEL"))}


async def spawn_app(config, port: int) -> asyncio.subprocess.Process:
    """A real ``python app.py --config CONFIG --port PORT`` (access logger, signals and all), piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable, str(APP), "--config", str(config), "--port", str(port),
        cwd=APP.parent, env=app_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


def access_log_line(method: str, path: str, status: int = 200, **request_kw) -> str:
    """The line app.py's access logger writes for a request (built without a server)."""
    import logging

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from app import AccessLogger

    logger = logging.getLogger("test.access")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        AccessLogger(logger, "").log(make_mocked_request(method, path, **request_kw), web.Response(status=status), 0.01)
    finally:
        logger.removeHandler(handler)
    [record] = records
    return record.getMessage()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """A base_url where nothing listens: connection refused."""
    return f"http://127.0.0.1:{free_port()}/v1"


class Blackhole:
    """A listening socket whose accept queue is full, so a new connect() gets no answer at all.

    Linux drops the SYN when the accept backlog is full, which is the only way to
    get a genuine *connect* timeout on loopback (a server that accepts but never
    answers is a first-token timeout instead: see ``Script(head_delay=...)``).
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(s)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


def _stack_files(task: asyncio.Task) -> list[str]:
    files = []
    obj = task.get_coro()
    for _ in range(200):
        if obj is None:
            break
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None) or getattr(obj, "gi_frame", None)
        if frame is not None:
            files.append(frame.f_code.co_filename)
        obj = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None) or getattr(obj, "gi_yieldfrom", None)
    return files


def nexlm_tasks(exclude: set) -> list[asyncio.Task]:
    """Live tasks, not in ``exclude``, that run NexLM code (a reply, a writer, a handler)."""
    out = []
    for t in asyncio.all_tasks():
        if t in exclude or t.done() or t is asyncio.current_task() or t.get_name() in APP_TASKS:
            continue
        name = t.get_name()
        if name.startswith(("reply ", "ws writer")) or any(f.startswith(NEXLM_DIR) for f in _stack_files(t)):
            out.append(t)
    return out


# ---------------------------------------------------------------------------- connections

class Conn:
    """What a WebSocket and an event stream share: the frames received, in order."""

    transport = ""

    def __init__(self, h: "Harness") -> None:
        self.h = h
        self.frames: list[dict] = []
        self.raw: list[str] = []
        self.sid: str | None = None
        self.first: dict | None = None  # the answer to the chat that opened it: start or error
        self.closed_by_client = False
        self.close_code: int | None = None  # set when the server closed a WebSocket
        self.resumed_after: int | None = None  # opened with after=/Last-Event-ID

    def _record(self, text: str, event_id: str | None = None) -> dict:
        self.raw.append(text)
        try:
            frame = strict_json(text)
        except ValueError as exc:
            raise AssertionError(f"{self.transport}: a frame that is not strict JSON ({exc}): {text[:300]!r}") from None
        assert isinstance(frame, dict) and frame.get("type") in KINDS, f"unexpected frame {text[:300]!r}"
        kind = frame["type"]
        if kind in REPLY_KINDS:
            assert isinstance(frame.get("reply"), str) and isinstance(frame.get("seq"), int), frame
        if kind == "error":
            assert isinstance(frame.get("code"), str) and isinstance(frame.get("message"), str) and frame["message"], frame
        if kind == "session":
            self.sid = self.sid or frame["session"]
            assert frame["session"] == self.sid, "a connection changed session"
        if event_id is not None and "seq" in frame and kind != "session":
            assert int(event_id) == frame["seq"], f"SSE id {event_id} != seq {frame['seq']}"
        self.frames.append(frame)
        return frame

    async def until(self, kind: str, timeout: float = 5.0, reply: str | None = None) -> list[dict]:
        """Frames up to and including the first of type ``kind`` (for ``reply``, if given)."""
        out = []
        async with asyncio.timeout(timeout):
            while True:
                f = await self.recv(timeout)
                out.append(f)
                if f["type"] == kind and (reply is None or f.get("reply") == reply):
                    return out

    async def recv(self, timeout: float = 5.0) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def text(self, reply: str | None = None) -> str:
        return "".join(f["content"] for f in self.frames
                       if f["type"] == "delta" and (reply is None or f["reply"] == reply))


class Peer(Conn):
    """A recording WebSocket client."""

    transport = "ws"

    def __init__(self, h: "Harness", ws) -> None:
        super().__init__(h)
        self.ws = ws

    async def recv(self, timeout: float = 5.0) -> dict:
        async with asyncio.timeout(timeout):
            msg = await self.ws.receive()
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            if self.close_code is None:  # what the server's close frame said, else what aiohttp saw
                self.close_code = msg.data if msg.type == WSMsgType.CLOSE else self.ws.close_code
            raise ConnectionClosed(self.close_code)
        assert msg.type == WSMsgType.TEXT, f"expected a text frame, got {msg.type.name} {msg.data!r}"
        return self._record(msg.data)

    async def expect_close(self, timeout: float = 5.0) -> int:
        """Read until the server closes; return the close code."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self.recv(timeout)
        except ConnectionClosed as exc:
            return exc.code

    async def send(self, obj) -> None:
        if isinstance(obj, dict) and obj.get("type") in ("regenerate", "edit", "reset", "restore") and self.sid:
            self.h.nonlinear.add(self.sid)
        await self.ws.send_str(obj if isinstance(obj, str) else json.dumps(obj))

    async def chat(self, message, timeout: float = 5.0, **extra) -> dict:
        """Send a chat; return its answer (``start``, or the refusal ``error``), recording acceptance."""
        await self.send({"type": "chat", "message": message, **extra})
        return await self.answer(message, timeout)

    async def answer(self, message, timeout: float = 5.0) -> dict:
        """The answer to a chat already sent: its ``start`` or a refusal (an error without a reply)."""
        async with asyncio.timeout(timeout):
            while True:
                f = await self.recv(timeout)
                if f["type"] == "start" and f["reply"] not in self.h.starts:
                    self.h.starts.add(f["reply"])
                    self.h.accept(self.sid, message)
                    self.first = self.first or f
                    return f
                if f["type"] == "error" and "reply" not in f:
                    self.first = self.first or f
                    return f

    async def sync(self, timeout: float = 5.0) -> list[dict]:
        """Ping and read up to the pong: everything the server queued before it."""
        await self.send({"type": "ping"})
        return await self.until("pong", timeout)

    async def stop(self) -> None:
        await self.send({"type": "stop"})

    async def close(self) -> None:
        if not self.ws.closed:
            self.closed_by_client = True
        await self.ws.close()


class ConnectionClosed(Exception):
    def __init__(self, code) -> None:
        super().__init__(f"closed by the server with code {code}")
        self.code = code


class SSEStream(Conn):
    """A recording event-stream reader over one ``/sse`` response."""

    transport = "sse"

    def __init__(self, h: "Harness", resp) -> None:
        super().__init__(h)
        self.resp = resp
        self.status = resp.status
        self.ids: list[str | None] = []
        self._buf = b""
        self.eof = False

    async def recv(self, timeout: float = 5.0) -> dict:
        async with asyncio.timeout(timeout):
            while b"\n\n" not in self._buf:
                data = await self.resp.content.readany()
                if not data:
                    self.eof = True
                    raise ConnectionClosed(None)
                self._buf += data
        block, self._buf = self._buf.split(b"\n\n", 1)
        text = block.decode()
        if all(line.startswith(":") for line in text.split("\n") if line):
            return await self.recv(timeout)  # a comment (ping)
        fields: dict[str, str] = {}
        for line in text.split("\n"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        assert "event" in fields and "data" in fields, f"malformed SSE block {text!r}"
        self.ids.append(fields.get("id"))
        frame = self._record(fields["data"], fields.get("id"))
        assert frame["type"] == fields["event"], f"event: {fields['event']} with data of type {frame['type']}"
        return frame

    async def rest(self, timeout: float = 5.0) -> list[dict]:
        """Every remaining event until the stream ends."""
        out = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    out.append(await self.recv(timeout))
        except ConnectionClosed:
            return out

    async def stop(self) -> dict:
        r = await self.h.client.post(f"/api/sessions/{self.sid}/stop")
        return await self.h.json(r)

    async def close(self) -> None:
        if not self.eof:
            self.closed_by_client = True
        self.resp.close()


# ---------------------------------------------------------------------------- the harness

class _Probe:
    def __init__(self, chat, sid: str) -> None:
        self._chat, self._sid = chat, sid

    def __getattr__(self, name):
        view = self._chat.view(self._sid)
        if view is None:
            raise AssertionError(f"session {self._sid[:6]} is gone")
        return getattr(view, name)


class Harness:
    def __init__(self, client, upstream) -> None:
        self.client = client
        self.upstream = upstream
        self.app = client.app
        self.chat = client.app[CONVERSATIONS]
        self.settings = self.chat.settings
        self.baseline = set(asyncio.all_tasks())
        self.accepted: dict[str, list[str]] = defaultdict(list)
        self.starts: set[str] = set()
        self.conns: list[Conn] = []
        self.nonlinear: set[str] = set()  # sessions whose history was rewritten (regenerate/edit/reset)
        self.gone: set[str] = set()  # sessions the test expects to have been removed
        self.http_raw: list[bytes] = []

    # -- recording

    def accept(self, sid: str | None, message) -> None:
        assert sid, "acceptance recorded before the session frame"
        self.accepted[sid].append(clean(message))

    def session(self, sid: str):
        """The session as the server sees it now, looked up without counting as activity; each
        attribute read looks again (tests poll ``s.seq``, ``s.reply``...). ``None`` once it is gone."""
        return None if self.chat.view(sid) is None else _Probe(self.chat, sid)

    def history(self, sid: str) -> list[dict]:
        s = self.session(sid)
        assert s is not None, f"session {sid[:8]}.. is gone"
        return s.history

    async def json(self, resp) -> dict:
        body = await resp.read()
        self.http_raw.append(body)
        return strict_json(body.decode())

    async def get(self, path: str, **kw):
        r = await self.client.get(path, **kw)
        self.http_raw.append(await r.read())
        return r

    # -- connections

    async def ws(self, path: str = "/ws", **kw) -> Peer:
        """A WebSocket, its ``session`` frame already read."""
        peer = Peer(self, await self.client.ws_connect(path, **kw))
        self.conns.append(peer)
        first = await peer.recv()
        assert first["type"] == "session", first
        if "after=" in path:
            peer.resumed_after = int(path.split("after=", 1)[1].split("&", 1)[0])
        return peer

    async def sse(self, method: str = "POST", headers: dict | None = None, **kw) -> SSEStream:
        """An event stream; ``status`` is checked by the caller (a refusal has a JSON body)."""
        resp = await self.client.request(method, "/sse", headers=headers, **kw)
        stream = SSEStream(self, resp)
        if resp.status == 200:
            self.conns.append(stream)
            first = await stream.recv()
            assert first["type"] == "session", first
            if headers and "Last-Event-ID" in headers:
                stream.resumed_after = int(headers["Last-Event-ID"])
        else:
            stream.eof = True
            stream.error = await self.json(resp) if resp.status >= 400 else None
        return stream

    async def start(self, transport: str, message="hi", sid: str | None = None, **fields) -> Conn:
        """Open a connection of ``transport`` and send one chat on it; the answer is ``conn.first``."""
        if transport == "ws":
            peer = await self.ws(f"/ws?session={sid}" if sid else "/ws")
            await peer.chat(message, **fields)
            return peer
        body = {"message": message, **fields}
        if sid:
            body["session"] = sid
        stream = await self.sse("POST", json=body)
        assert stream.status == 200, f"/sse answered {stream.status}: {getattr(stream, 'error', None)}"
        first = await stream.recv()
        if first["type"] == "start":
            self.starts.add(first["reply"])
            self.accept(stream.sid, message)
        stream.first = first
        return stream

    # -- the invariants

    async def settle(self, timeout: float | None = None) -> None:
        """Until no reply runs, no grace timer is pending and the upstream has nothing open."""
        if timeout is None:
            timeout = 3.0 + self.settings.chat.resume_grace_seconds
        chat = self.chat

        def pending():
            return f"{chat.stats()}, upstream open {self.upstream.open}"

        def settled():
            st = chat.stats()
            return (st["reply_tasks"] == st["replies_running"] == st["grace_timers"] == st["limiter_running"] == 0
                    and self.upstream.open == 0)

        await eventually(settled, timeout, pending)

    async def check(self, settle: float | None = None) -> None:
        await self.settle(settle)
        # Drain what still-open connections have been sent, then close them.
        for c in self.conns:
            if isinstance(c, Peer) and not c.ws.closed and c.close_code is None:
                try:
                    await c.sync()
                except ConnectionClosed:
                    pass
                except ConnectionResetError:  # the server closed it: read what it sent before
                    await c.expect_close()
            elif isinstance(c, SSEStream) and not c.eof and not c.closed_by_client:
                await c.rest()
        for c in self.conns:
            self._check_connection(c)
        for c in self.conns:
            await c.close()
        await eventually(lambda: self.chat.stats()["listeners"] == 0, 3.0,
                         lambda: f"listeners left: {self.chat.stats()}")
        await self.settle()
        self._check_histories()
        stats = self.chat.stats()
        assert stats["limiter_running"] == 0 and stats["limiter_clients"] == 0, "reply slots leaked in the limiter"
        assert stats["sessions"] <= self.settings.chat.max_sessions
        await eventually(lambda: not nexlm_tasks(self.baseline), 3.0,
                         lambda: "tasks left behind: " + ", ".join(
                             f"{t.get_name()} {_stack_files(t)[-1:]}" for t in nexlm_tasks(self.baseline)))
        assert self.upstream.open == 0, f"{self.upstream.open} upstream requests still open"
        self._check_no_keys()

    def _check_connection(self, c: Conn) -> None:
        seqs = [f["seq"] for f in c.frames if f["type"] in REPLY_KINDS]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), \
            f"{c.transport}: reply event seqs not strictly rising: {seqs}"
        seen_start: set[str] = set()
        dones: dict[str, int] = defaultdict(int)
        for f in c.frames:
            if f["type"] not in REPLY_KINDS:
                continue
            rid = f["reply"]
            assert dones[rid] == 0, f"{c.transport}: {f['type']} after the done of reply {rid}"
            if f["type"] == "start":
                assert rid not in seen_start, f"{c.transport}: two starts for reply {rid}"
                seen_start.add(rid)
            elif c.resumed_after is None and rid not in seen_start:
                raise AssertionError(f"{c.transport}: {f['type']} for reply {rid} before its start")
            if f["type"] == "done":
                dones[rid] += 1
                assert f["finish_reason"] in FINISH_REASONS, f
        assert c.close_code is None or c.close_code in CLOSE_CODES, f"{c.transport}: closed with {c.close_code}"
        # A connection the client kept open (or the server closed with "going away") sees every reply end.
        if not c.closed_by_client and c.close_code in (None, 1000, 1001):
            missing = [rid for rid in seen_start if dones[rid] != 1]
            assert not missing, (f"{c.transport}: replies started but never done on this connection: {missing} "
                                 f"(closed by the server with {c.close_code})")

    def _check_histories(self) -> None:
        for s in self.chat.views():
            problems = history_problems(s.history)
            assert not problems, (f"session {s.id[:6]}: {problems}, roles {[t['role'] for t in s.history]} "
                                  "(a turn left streaming or recorded twice?)")
        for sid, messages in self.accepted.items():
            if sid in self.gone:
                continue
            s = self.session(sid)
            assert s is not None, f"session {sid[:6]} with accepted messages disappeared"
            if sid in self.nonlinear:
                continue
            users = [t["content"] for t in s.history if t["role"] == "user"]
            assert users == messages, f"session {sid[:6]}: user turns {users!r}, accepted {messages!r}"
        # The text a client saw from start to done is exactly what was stored.
        for sid in {c.sid for c in self.conns}:
            s = self.session(sid)
            if s is None or sid in self.nonlinear:
                continue
            starts: dict[str, int] = {}
            full: dict[str, tuple[str, str]] = {}
            for c in self.conns:
                if c.sid != sid:
                    continue
                for f in c.frames:
                    if f["type"] == "start":
                        starts.setdefault(f["reply"], f["seq"])
                for rid in {f["reply"] for f in c.frames if f["type"] == "start"}:
                    done = [f for f in c.frames if f["type"] == "done" and f["reply"] == rid]
                    if done:
                        full[rid] = (c.text(rid), done[0]["finish_reason"])
            order = sorted(starts, key=starts.get)
            turns = [t for t in s.history if t["role"] == "assistant"]
            assert len(turns) >= len(order), f"session {sid[:6]}: {len(order)} replies seen, {len(turns)} recorded"
            offset = len(turns) - len(order)
            for i, rid in enumerate(order):
                if rid in full:
                    text, finish = full[rid]
                    turn = turns[offset + i]
                    assert (turn["content"], turn["finish_reason"]) == (text, finish), \
                        f"session {sid[:6]} reply {rid}: stored {turn['content']!r}/{turn['finish_reason']}, " \
                        f"sent {text!r}/{finish}"

    def keys(self) -> list[str]:
        keys = [p.api_key for p in self.settings.providers.values() if p.api_key]
        keys += [v for p in self.settings.providers.values() for v in p.headers.values() if len(v) >= 8]
        return keys

    def received(self) -> str:
        """Every byte any client of this harness received, as text."""
        parts = [r for c in self.conns for r in c.raw]
        parts += [b.decode("utf-8", "replace") for b in self.http_raw]
        return "\n".join(parts)

    def _check_no_keys(self) -> None:
        everything = self.received()
        for key in self.keys():
            assert key not in everything, "an API key reached a client"


async def check_invariants(client, upstream, accepted: dict[str, list[str]] | None = None,
                           tasks_before: set | None = None) -> None:
    """The invariants for an app driven without a ``Harness`` (e.g. by another test module).

    ``accepted``: session id -> the user messages the test saw accepted, in order.
    ``tasks_before``: ``asyncio.all_tasks()`` taken after the app started; without it, any live
    task running NexLM code (besides the app's sweeper and loop-lag tasks) counts as left behind.
    """
    h = Harness(client, upstream)
    h.baseline = set(tasks_before or ())
    for sid, messages in (accepted or {}).items():
        h.accepted[sid] = [clean(m) for m in messages]
    await h.check()


@pytest.fixture
async def make_harness(make_client, upstream):
    """``h = await make_harness(extra_toml)``: an app on the fake upstream, with its recording clients.

    The app gets a short shutdown grace and is closed before the fake upstream, so a test that
    fails while a reply is held by a gate tears down in a second, not after the upstream's
    60 s shutdown timeout.
    """
    made: list[Harness] = []

    async def make(extra: str = "", env: dict | None = None, **kw) -> Harness:
        extra = "[server]\nshutdown_grace_seconds = 0.2\n" + extra
        made.append(Harness(await make_client(extra, env=env, **kw), upstream))
        return made[-1]

    yield make
    for harness in made:
        await harness.client.close()


@pytest.fixture
async def h(make_harness) -> Harness:
    return await make_harness()


# ---------------------------------------------------------------------------- a raw WebSocket client

class RawWS:
    """A minimal WebSocket client on a plain socket with tiny buffers, which reads only when asked.

    aiohttp's client reads everything into its own queue; a slow reader has to be
    a socket nobody drains. Also sends what aiohttp refuses to (invalid UTF-8).
    """

    def __init__(self, reader, writer, status: int) -> None:
        self.reader, self.writer, self.status = reader, writer, status

    @classmethod
    async def connect(cls, port: int, path: str = "/ws", rcvbuf: int = 4096,
                      headers: dict | None = None) -> "RawWS":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"{extra}\r\n").encode())
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        return cls(reader, writer, int(head.split(b" ", 2)[1]))

    async def send(self, payload: bytes, opcode: int = 0x1) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.writer.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        await self.writer.drain()

    async def send_json(self, obj) -> None:
        await self.send(json.dumps(obj).encode())

    async def recv(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame."""
        async with asyncio.timeout(timeout):
            b1, b2 = await self.reader.readexactly(2)
            n = b2 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return b1 & 0x0F, await self.reader.readexactly(n)

    async def recv_json(self, timeout: float = 5.0) -> dict:
        op, payload = await self.recv(timeout)
        assert op == 0x1, f"expected a text frame, got opcode {op} {payload[:100]!r}"
        return strict_json(payload.decode())

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def request_times(upstream) -> list[float]:
    """When each upstream request arrived (monotonic), filled in as they come."""
    times: list[float] = []
    original = upstream._changed

    def changed() -> None:
        while len(times) < len(upstream.requests):
            times.append(time.monotonic())
        original()

    upstream._changed = changed
    return times
