"""Load generator for the NexLM benchmark suite, run as its own process.

It speaks three things with the same code paths and the same clock:

* ``direct``: the fake upstream itself (``POST /v1/chat/completions``, OpenAI SSE
  over chunked HTTP/1.1) -- the reference, overhead zero;
* ``ws``: NexLM's ``/ws`` (first frame ``session``; ``chat`` -> ``start``,
  ``delta``..., ``done``; ``stop``; ``reset``);
* ``sse``: NexLM's ``POST /sse`` (``event:``/``data:``/``id:``; first
  ``session``, last ``done``);
* ``v1``: NexLM's ``POST /v1/chat/completions``, streaming: the same request
  and the same parser as ``direct``, only the model id differs (issue 12);
* ``direct_ns`` / ``v1_ns``: the same, non-streaming (``"stream": false``):
  one ``chat.completion`` JSON body, its "first token" the whole answer parsed.

The HTTP/1.1 client, the SSE parser and the WebSocket client (RFC 6455, with
``permessage-deflate`` offered like a browser does unless ``--no-compress``)
are written directly on ``asyncio.Protocol``: every frame/event is parsed
(JSON included) in ``data_received`` and time-stamped there, with no task
switch per token, so the load generator stays cheap and its timestamps sit
close to the wire. Replies carry ``n=<tokens> iv=<ms> tag=<id>`` in the user
message, which the fake upstream obeys; every token is exactly 4 characters,
so tokens are counted from text length even if a relay coalesces deltas.

Modes::

    python bench/loadgen.py serve --upstream HOST:PORT --nexlm HOST:PORT   # JSON lines on stdin/stdout
          [--nexlm-model fake/fake-model]   # the model id the v1 targets ask NexLM for
    python bench/loadgen.py once  --upstream ... --nexlm ... '{"cmd":"replies","target":"ws",...}'
    python bench/loadgen.py probe --nexlm HOST:PORT [--path /healthz] [--interval-ms 10]

Commands (``serve``/``once``), each answered by one JSON line:
    replies  target, concurrency, count, n, iv, record, stagger_ms, window_ms, timeout
    stops    ops, concurrency, mix, n, iv          (B5: random stops and disconnects)
    direct_stops  ops, concurrency                 (B5 reference: client closes upstream)
    idle_open n / idle_close                       (B6)
    active_start n, iv / active_stop               (B6)
    cleanup                                        DELETE every session seen
    store_sessions n                               POST /api/sessions n times (IDLE, issue 11)
    lag                                            this process's own loop lag
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import sys
import zlib
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import now, raise_nofile, rss_kb, summary_ms, use_uvloop  # noqa: E402

try:
    import orjson

    loads = orjson.loads
    dumps = orjson.dumps
except ImportError:  # pragma: no cover
    loads = json.loads

    def dumps(o) -> bytes:
        return json.dumps(o, separators=(",", ":")).encode()

TOKEN_CHARS = 4
# what the `openai` package sends, less its telemetry headers; the key is ignored by the bench's
# NexLM (no access control) and by the fake upstream
OPENAI_HEADERS = (b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                  b"Authorization: Bearer sk-bench\r\n")
OPENAI_NS_HEADERS = b"Content-Type: application/json\r\nAccept: application/json\r\nAuthorization: Bearer sk-bench\r\n"


# ----------------------------------------------------------------- replies

class Reply:
    """One reply as the client sees it."""

    __slots__ = ("tag", "t0", "t_first", "t_last", "n", "frames", "times", "finish", "error",
                 "session", "fut", "t_action", "reply_id", "want", "want_fut", "ended")

    def __init__(self, tag: str, record: bool, fut) -> None:
        self.tag = tag
        self.t0 = 0.0
        self.t_first = 0.0
        self.t_last = 0.0
        self.n = 0
        self.frames = 0
        self.times = [] if record else None
        self.finish = None
        self.error = None
        self.session = None
        self.fut = fut
        self.t_action = 0.0
        self.reply_id = None
        self.want = 0
        self.want_fut = None
        self.ended = False

    def got(self, chars: int, t: float) -> None:
        if chars <= 0:
            return
        if self.n == 0:
            self.t_first = t
        self.n += max(1, chars // TOKEN_CHARS)
        self.t_last = t
        self.frames += 1
        if self.times is not None:
            self.times.append(t)
        if self.want_fut is not None and self.n >= self.want and not self.want_fut.done():
            self.want_fut.set_result(True)

    def end(self, finish, error=None) -> None:
        if self.ended:
            return
        self.ended = True
        if finish is not None:
            self.finish = finish
        if error is not None and self.error is None:
            self.error = error
        if not self.fut.done():
            self.fut.set_result(self)
        if self.want_fut is not None and not self.want_fut.done():
            self.want_fut.set_result(False)


class SSEParser:
    """Incremental text/event-stream parser (LF or CRLF line ends)."""

    __slots__ = ("buf", "event", "data", "id", "on_event")

    def __init__(self, on_event) -> None:
        self.buf = b""
        self.event = b""
        self.data = []
        self.id = None
        self.on_event = on_event

    def feed(self, chunk: bytes, t: float) -> None:
        buf = self.buf + chunk if self.buf else chunk
        pos = 0
        find = buf.find
        while True:
            eol = find(b"\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            pos = eol + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self.data:
                    data = self.data[0] if len(self.data) == 1 else b"\n".join(self.data)
                    ev = self.event or b"message"
                    self.data = []
                    self.event = b""
                    self.on_event(ev, data, t)
                else:
                    self.event = b""
                continue
            if line[0] == 58:  # ':' comment
                continue
            field, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self.data.append(value)
            elif field == b"event":
                self.event = value
            elif field == b"id":
                self.id = value
        self.buf = buf[pos:] if pos < len(buf) else b""


class OpenAISink:
    """The direct upstream's OpenAI chat.completion.chunk stream."""

    __slots__ = ("reply", "sse", "status", "errbody", "finish", "got_done")

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.sse = SSEParser(self.on_event)
        self.status = 0
        self.errbody = b""
        self.finish = None
        self.got_done = False

    def on_head(self, status, headers, t) -> None:
        self.status = status

    def on_body(self, data, t) -> None:
        if self.status == 200:
            self.sse.feed(data, t)
        elif len(self.errbody) < 2000:
            self.errbody += data

    def on_event(self, event, data, t) -> None:
        if data == b"[DONE]":
            self.got_done = True
            return
        obj = loads(data)
        ch = obj.get("choices")
        if ch:
            c0 = ch[0]
            d = c0.get("delta")
            if d:
                c = d.get("content")
                if c:
                    self.reply.got(len(c), t)
            fr = c0.get("finish_reason")
            if fr:
                self.finish = fr
        elif obj.get("error"):
            self.reply.error = "upstream_error"

    def on_end(self, t) -> None:
        if self.status != 200:
            self.reply.end(None, f"http {self.status}: {self.errbody[:200]!r}")
        elif not self.got_done:
            self.reply.end(None, "stream ended without [DONE]")
        else:
            self.reply.end(self.finish)

    def on_error(self, msg) -> None:
        self.reply.end(None, msg)


class CompletionSink:
    """A non-streaming ``chat.completion`` answer: the reply's only "token" is the whole message,
    time-stamped when its body is complete and parsed."""

    __slots__ = ("reply", "status", "body")

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.status = 0
        self.body = b""

    def on_head(self, status, headers, t) -> None:
        self.status = status

    def on_body(self, data, t) -> None:
        self.body = self.body + data if self.body else data

    def on_end(self, t) -> None:
        r = self.reply
        if self.status != 200:
            r.end(None, f"http {self.status}: {self.body[:200]!r}")
            return
        try:
            c0 = loads(self.body)["choices"][0]
            content = c0["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            r.end(None, f"not a chat.completion: {self.body[:200]!r}")
            return
        r.got(len(content), t)
        r.end(c0.get("finish_reason"))

    def on_error(self, msg) -> None:
        self.reply.end(None, msg)


class NexSSESink:
    """NexLM's /sse event stream."""

    __slots__ = ("reply", "sse", "status", "errbody", "lg")

    def __init__(self, reply: Reply, lg: "LoadGen") -> None:
        self.reply = reply
        self.sse = SSEParser(self.on_event)
        self.status = 0
        self.errbody = b""
        self.lg = lg

    def on_head(self, status, headers, t) -> None:
        self.status = status

    def on_body(self, data, t) -> None:
        if self.status == 200:
            self.sse.feed(data, t)
        elif len(self.errbody) < 2000:
            self.errbody += data

    def on_event(self, event, data, t) -> None:
        if event == b"delta":
            obj = loads(data)
            self.reply.got(len(obj.get("content") or ""), t)
        elif event == b"session":
            obj = loads(data)
            sid = obj.get("session")
            self.reply.session = sid
            if sid:
                self.lg.sessions.add(sid)
            if self.reply.want_fut is not None and self.reply.want == 0 and not self.reply.want_fut.done():
                self.reply.want_fut.set_result(True)
        elif event == b"start":
            self.reply.reply_id = loads(data).get("reply")
        elif event == b"done":
            obj = loads(data)
            self.reply.finish = obj.get("finish_reason")
        elif event == b"error":
            obj = loads(data)
            if self.reply.error is None:
                self.reply.error = obj.get("code") or "error"
        else:
            loads(data)

    def on_end(self, t) -> None:
        r = self.reply
        if self.status != 200:
            r.end(None, f"http {self.status}: {self.errbody[:200]!r}")
        elif r.finish is None:
            r.end(None, r.error or "stream ended without done")
        else:
            r.end(r.finish)

    def on_error(self, msg) -> None:
        self.reply.end(None, msg)


class NullSink:
    __slots__ = ("status", "body", "fut")

    def __init__(self, fut) -> None:
        self.status = 0
        self.body = b""
        self.fut = fut

    def on_head(self, status, headers, t):
        self.status = status

    def on_body(self, data, t):
        if len(self.body) < 1 << 20:
            self.body += data

    def on_end(self, t):
        if not self.fut.done():
            self.fut.set_result(self)

    def on_error(self, msg):
        if not self.fut.done():
            self.status = -1
            self.body = msg.encode()
            self.fut.set_result(self)


# ----------------------------------------------------------------- HTTP/1.1 client

_HEAD, _CHUNKED, _CL, _UNTIL_CLOSE, _IDLE = range(5)


class HTTPConn(asyncio.Protocol):
    """A persistent HTTP/1.1 client connection, one request at a time."""

    def __init__(self, pool: "Pool | None") -> None:
        self.pool = pool
        self.transport = None
        self.buf = b""
        self.state = _IDLE
        self.sink = None
        self.closed = False
        self.keep = True
        self.remaining = 0
        self.crlf = False
        self.status = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        sink, state = self.sink, self.state
        self.sink = None
        self.state = _IDLE
        if sink is not None and state != _IDLE:
            if state == _UNTIL_CLOSE:
                sink.on_end(now())
            else:
                sink.on_error("connection lost" + (f": {exc}" if exc else ""))

    def request(self, method: bytes, path: bytes, hostport: bytes, headers: bytes, body: bytes, sink) -> None:
        self.sink = sink
        self.state = _HEAD
        self.keep = True
        self.remaining = 0
        self.crlf = False
        self.transport.write(b"%s %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s"
                             % (method, path, hostport, headers, len(body), body))

    def data_received(self, data: bytes) -> None:
        t = now()
        st = self.state
        if st == _HEAD:
            buf = (self.buf + data) if self.buf else data
            if buf[:2] == b"\r\n":
                buf = buf.lstrip(b"\r\n")
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            head = buf[:i].decode("latin-1").split("\r\n")
            data = buf[i + 4:]
            self.buf = b""
            try:
                self.status = int(head[0].split(" ", 2)[1])
            except (IndexError, ValueError):
                self.status = 0
            headers = {}
            for line in head[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            if headers.get("connection", "").lower() == "close":
                self.keep = False
            if "chunked" in headers.get("transfer-encoding", "").lower():
                st = self.state = _CHUNKED
            elif "content-length" in headers:
                st = self.state = _CL
                self.remaining = int(headers["content-length"])
            elif self.status in (204, 304) or self.status < 200:
                st = self.state = _CL
                self.remaining = 0
            else:
                st = self.state = _UNTIL_CLOSE
                self.keep = False
            self.sink.on_head(self.status, headers, t)
            if st == _CL and self.remaining == 0:
                self._finish(t)
                return
            if not data:
                return
        if st == _CHUNKED:
            self._chunked(data, t)
        elif st == _CL:
            take = data[: self.remaining]
            self.remaining -= len(take)
            self.sink.on_body(take, t)
            if self.remaining == 0:
                self._finish(t)
        elif st == _UNTIL_CLOSE:
            self.sink.on_body(data, t)
        # _IDLE: stray bytes (e.g. the final CRLF) are ignored

    def _chunked(self, data: bytes, t: float) -> None:
        buf = (self.buf + data) if self.buf else data
        pos = 0
        n = len(buf)
        out = []
        done = False
        while pos < n:
            if self.remaining:
                end = pos + self.remaining
                if end > n:
                    end = n
                out.append(buf[pos:end])
                self.remaining -= end - pos
                pos = end
                if not self.remaining:
                    self.crlf = True
                continue
            if self.crlf:
                if n - pos < 2:
                    break
                pos += 2
                self.crlf = False
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:
                done = True  # the final CRLF (no trailers expected) is skipped as stray bytes
                pos = n
                break
            self.remaining = size
        self.buf = buf[pos:] if pos < n else b""
        if out:
            self.sink.on_body(out[0] if len(out) == 1 else b"".join(out), t)
        if done:
            self.buf = b""
            self._finish(t)

    def _finish(self, t: float) -> None:
        sink = self.sink
        self.sink = None
        self.state = _IDLE
        if not self.keep:
            self.transport.close()
            self.closed = True
        elif self.pool is not None:
            self.pool.release(self)
        sink.on_end(t)


class Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.hostport = f"{host}:{port}".encode()
        self.idle: list[HTTPConn] = []
        self.opened = 0

    async def acquire(self) -> HTTPConn:
        while self.idle:
            c = self.idle.pop()
            if not c.closed:
                return c
        return await self.connect()

    async def connect(self, pooled: bool = True) -> HTTPConn:
        loop = asyncio.get_running_loop()
        _, c = await loop.create_connection(lambda: HTTPConn(self if pooled else None), self.host, self.port)
        self.opened += 1
        return c

    def release(self, c: HTTPConn) -> None:
        if not c.closed:
            self.idle.append(c)

    def close_all(self) -> None:
        for c in self.idle:
            if not c.closed:
                c.transport.close()
        self.idle = []


# ----------------------------------------------------------------- WebSocket client

class WSConn(asyncio.Protocol):
    """Minimal RFC 6455 client: text frames, ping/pong, close, permessage-deflate."""

    def __init__(self, lg: "LoadGen", host: str, port: int, path: str, compress: bool) -> None:
        self.lg = lg
        self.host = host
        self.port = port
        self.path = path
        self.compress = compress
        self.transport = None
        self.buf = b""
        self.open = False
        self.closed = False
        self.handshake = asyncio.get_running_loop().create_future()
        self.inbox: deque = deque()
        self.waiter = None
        self.reply: Reply | None = None
        self.session = None
        self.decomp = None
        self.frag: list[bytes] = []
        self.frag_rsv1 = 0
        self.extensions = ""

    # -- plumbing
    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16))
        ext = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if self.compress else b""
        transport.write(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nOrigin: http://%s:%d\r\n%s\r\n"
                        % (self.path.encode(), self.host.encode(), self.port, key, self.host.encode(),
                           self.port, ext))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.open = False
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        r = self.reply
        if r is not None:
            self.reply = None
            r.end(None, "websocket closed")
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def data_received(self, data: bytes) -> None:
        t = now()
        if not self.open:
            buf = self.buf + data
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            head = buf[:i].decode("latin-1").split("\r\n")
            data = buf[i + 4:]
            self.buf = b""
            try:
                status = int(head[0].split(" ", 2)[1])
            except (IndexError, ValueError):
                status = 0
            if status != 101:
                if not self.handshake.done():
                    self.handshake.set_exception(ConnectionError(f"handshake: HTTP {status}"))
                self.transport.close()
                return
            for line in head[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "sec-websocket-extensions":
                    self.extensions = v.strip()
                    if "permessage-deflate" in v:
                        self.decomp = zlib.decompressobj(-15)
            self.open = True
            if not self.handshake.done():
                self.handshake.set_result(True)
            if not data:
                return
        buf = (self.buf + data) if self.buf else data
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            ln = b1 & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2:pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2:pos + 10], "big")
                hl = 10
            masked = b1 & 0x80
            if masked:
                hl += 4
            if n - pos < hl + ln:
                break
            payload = buf[pos + hl:pos + hl + ln]
            if masked:
                payload = _mask(payload, buf[pos + hl - 4:pos + hl])
            pos += hl + ln
            op = b0 & 0x0F
            if op == 1 or op == 2:
                if b0 & 0x80:
                    self._message(payload, b0 & 0x40, t)
                else:
                    self.frag = [payload]
                    self.frag_rsv1 = b0 & 0x40
            elif op == 0:
                self.frag.append(payload)
                if b0 & 0x80:
                    whole = b"".join(self.frag)
                    self.frag = []
                    self._message(whole, self.frag_rsv1, t)
            elif op == 9:
                self._send(0xA, payload)
            elif op == 8:
                if not self.closed:
                    self._send(0x8, payload[:2])
                    self.transport.close()
                    self.closed = True
                break
        self.buf = buf[pos:] if pos < n else b""

    def _message(self, payload: bytes, rsv1: int, t: float) -> None:
        if rsv1:
            payload = self.decomp.decompress(payload + b"\x00\x00\xff\xff")
        try:
            obj = loads(payload)
        except ValueError:
            obj = {"type": "_text", "text": payload[:200].decode("utf-8", "replace")}
        typ = obj.get("type")
        r = self.reply
        if r is not None:
            if typ == "delta":
                r.got(len(obj.get("content") or ""), t)
                return
            if typ == "reasoning":
                return
            if typ == "start":
                r.reply_id = obj.get("reply")
                return
            if typ == "done":
                self.reply = None
                fr = obj.get("finish_reason")
                r.end(fr, r.error if fr == "error" else None)
                return
            if typ == "error":
                if r.error is None:
                    r.error = obj.get("code") or "error"
                if r.reply_id is None and obj.get("reply") is None:
                    # rejected before a reply started: no done follows
                    self.reply = None
                    r.end(None, r.error)
                return
        if typ == "session":
            self.session = obj.get("session")
            if self.session:
                self.lg.sessions.add(self.session)
        self.inbox.append(obj)
        self._wake()

    def _send(self, op: int, payload: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        n = len(payload)
        key = random.getrandbits(32).to_bytes(4, "big")
        if n < 126:
            hdr = bytes((0x80 | op, 0x80 | n))
        elif n < 65536:
            hdr = bytes((0x80 | op, 0xFE)) + n.to_bytes(2, "big")
        else:
            hdr = bytes((0x80 | op, 0xFF)) + n.to_bytes(8, "big")
        self.transport.write(hdr + key + _mask(payload, key))

    # -- API
    def send_json(self, obj) -> None:
        self._send(0x1, dumps(obj))

    async def recv(self, timeout: float = 10.0):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.inbox:
            if self.closed:
                raise ConnectionError("websocket closed")
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError("no message")
            self.waiter = loop.create_future()
            h = loop.call_later(left, self._wake)
            try:
                await self.waiter
            finally:
                h.cancel()
                self.waiter = None
        return self.inbox.popleft()

    async def recv_type(self, typ: str, timeout: float = 10.0):
        while True:
            m = await self.recv(timeout)
            if m.get("type") == typ:
                return m
            if m.get("type") == "error":
                raise RuntimeError(f"error frame: {m.get('code')}: {m.get('message')}")

    def close(self) -> None:
        if not self.closed:
            self._send(0x8, (1000).to_bytes(2, "big"))
            self.transport.close()
            self.closed = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True


def _mask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if not n:
        return data
    k = key * (n // 4 + 1)
    return (int.from_bytes(data, "big") ^ int.from_bytes(k[:n], "big")).to_bytes(n, "big")


# ----------------------------------------------------------------- the load generator

class LoadGen:
    def __init__(self, upstream: tuple[str, int] | None, nexlm: tuple[str, int] | None,
                 compress: bool = True, ws_path: str = "/ws", direct_model: str = "fake-model",
                 nexlm_model: str = "fake/fake-model") -> None:
        self.upstream = upstream
        self.nexlm = nexlm
        self.compress = compress
        self.ws_path = ws_path
        self.direct_model = direct_model
        self.nexlm_model = nexlm_model
        self.up_pool = Pool(*upstream) if upstream else None
        self.nex_pool = Pool(*nexlm) if nexlm else None
        self.sessions: set[str] = set()
        self.idle: list[WSConn] = []
        self.active: list[tuple[WSConn, Reply]] = []
        self.lag: list[float] = []
        self.counter = 0
        self.loop = asyncio.get_running_loop()
        self.ws_extensions = ""

    # -- infrastructure
    async def lag_monitor(self) -> None:
        step = 0.005
        while True:
            t = now()
            await asyncio.sleep(step)
            if len(self.lag) < 1_000_000:
                self.lag.append(max(0.0, now() - t - step))

    def tag(self, prefix: str = "t") -> str:
        self.counter += 1
        return f"{prefix}{os.getpid()}x{self.counter}"

    async def ws_connect(self, timeout: float = 30.0) -> WSConn:
        host, port = self.nexlm
        _, c = await self.loop.create_connection(
            lambda: WSConn(self, host, port, self.ws_path, self.compress), host, port)
        await asyncio.wait_for(c.handshake, timeout)
        self.ws_extensions = c.extensions
        await c.recv_type("session", timeout)
        return c

    async def open_many(self, factory, n: int, parallel: int = 64):
        sem = asyncio.Semaphore(parallel)
        out, errors = [], []

        async def one():
            async with sem:
                for attempt in range(3):
                    try:
                        out.append(await factory())
                        return
                    except Exception as e:  # noqa: BLE001
                        err = f"{type(e).__name__}: {e}"
                        await asyncio.sleep(0.05 * (attempt + 1))
                errors.append(err)

        await asyncio.gather(*(one() for _ in range(n)))
        return out, errors

    def _msg(self, n: int, iv: float, tag: str) -> str:
        return f"bench n={n} iv={iv:g} tag={tag}"

    def _wait(self, fut, timeout: float):
        h = self.loop.call_later(timeout, lambda: fut.done() or fut.set_exception(TimeoutError()))
        fut.add_done_callback(lambda _f: h.cancel())
        return fut

    def start_reply(self, target: str, conn, n: int, iv: float, record: bool, tag: str) -> Reply:
        fut = self.loop.create_future()
        r = Reply(tag, record, fut)
        msg = self._msg(n, iv, tag)
        if target == "ws":
            conn.reply = r
            r.t0 = now()
            conn.send_json({"type": "chat", "message": msg})
        elif target == "sse":
            body = dumps({"message": msg})
            sink = NexSSESink(r, self)
            r.t0 = now()
            conn.request(b"POST", b"/sse", self.nex_pool.hostport,
                         b"Content-Type: application/json\r\nAccept: text/event-stream\r\nOrigin: http://%s\r\n"
                         % self.nex_pool.hostport, body, sink)
        else:  # the OpenAI API: direct, v1 (through NexLM), and their non-streaming twins
            stream = target in ("direct", "v1")
            pool = self.pool(target)
            req = {"model": self.direct_model if pool is self.up_pool else self.nexlm_model,
                   "messages": [{"role": "user", "content": msg}], "stream": stream}
            if stream:
                req["stream_options"] = {"include_usage": True}
            body = dumps(req)
            sink = OpenAISink(r) if stream else CompletionSink(r)
            r.t0 = now()
            conn.request(b"POST", b"/v1/chat/completions", pool.hostport,
                         OPENAI_HEADERS if stream else OPENAI_NS_HEADERS, body, sink)
        return r

    def pool(self, target: str) -> "Pool":
        """The HTTP connections a target's requests go over (``ws`` has its own sockets)."""
        return self.up_pool if target in ("direct", "direct_ns") else self.nex_pool

    async def worker_conn(self, target: str):
        if target == "ws":
            return await self.ws_connect()
        return await self.pool(target).acquire()

    # -- commands
    async def cmd_replies(self, a: dict) -> dict:
        """C workers, each with its own connection, each doing `count` replies in a row."""
        target = a["target"]
        C = int(a.get("concurrency", 1))
        count = int(a.get("count", 1))
        n = int(a.get("n", 20))
        iv = float(a.get("iv", 0))
        record = bool(a.get("record", False))
        stagger = float(a.get("stagger_ms", 0)) / 1e3
        pause = float(a.get("pause_ms", 0)) / 1e3
        timeout = float(a.get("timeout", 30 + n * iv / 1e3 * 3))
        reset = bool(a.get("reset_between", True))
        conns, open_errors = await self.open_many(lambda: self.worker_conn(target), C)
        if target != "ws":  # HTTP connections live in the pool; each reply takes one from there
            pool = self.pool(target)
            for c in conns:
                pool.release(c)
        replies: list[Reply] = []
        lag0 = len(self.lag)
        t_start = now() + 0.02

        async def worker(i, conn):
            d = t_start + (stagger * i / max(1, C)) - now()
            if d > 0:
                await asyncio.sleep(d)
            for k in range(count):
                if k and pause:
                    await asyncio.sleep(pause)
                try:
                    if target == "ws":
                        if conn is None or conn.closed:
                            conn = await self.ws_connect()
                        elif k and reset:
                            conn.send_json({"type": "reset"})
                            await conn.recv_type("session")
                        r = self.start_reply("ws", conn, n, iv, record, self.tag())
                    else:
                        pool = self.pool(target)
                        t_acq = now()
                        c = await pool.acquire()
                        r = self.start_reply(target, c, n, iv, record, self.tag())
                        r.t0 = t_acq
                except Exception as e:  # noqa: BLE001
                    fut = self.loop.create_future()
                    r = Reply("", False, fut)
                    r.error = f"{type(e).__name__}: {e}"
                    replies.append(r)
                    conn = None
                    continue
                replies.append(r)
                try:
                    await self._wait(r.fut, timeout)
                except TimeoutError:
                    r.error = r.error or "timeout"
                    if target == "ws" and conn is not None:
                        conn.reply = None
                        conn.abort()
                        conn = None
            if target == "ws" and conn is not None:
                conn.close()

        await asyncio.gather(*(worker(i, c if target == "ws" else None) for i, c in enumerate(conns)))
        return self._report(replies, open_errors, a, lag0)

    def _report(self, replies, open_errors, a, lag0) -> dict:
        ok = [r for r in replies if r.error is None and r.finish in ("stop", "length")]
        errs = [r.error or f"finish={r.finish}" for r in replies if r not in ok]
        res: dict = {"replies": len(replies), "ok": len(ok), "errors": len(errs) + len(open_errors),
                     "error_samples": sorted(set(map(str, errs + open_errors)))[:8]}
        if replies:
            t0 = min(r.t0 for r in replies if r.t0) if any(r.t0 for r in replies) else 0
            t1 = max((r.t_last for r in replies), default=0)
            tokens = sum(r.n for r in replies)
            res["tokens"] = tokens
            res["wall"] = max(0.0, t1 - t0)
            res["tokens_per_s"] = tokens / res["wall"] if res["wall"] > 0 else 0.0
            res["frames"] = sum(r.frames for r in replies)
            res["short"] = sum(1 for r in ok if r.n != int(a.get("n", 0)))
        if a.get("raw_ttft"):
            res["ttft"] = [round((r.t_first - r.t0) * 1e3, 4) for r in ok if r.n]
        if a.get("record"):
            gaps = []
            for r in ok:
                ts = r.times
                gaps.extend(ts[i + 1] - ts[i] for i in range(len(ts) - 1))
            if a.get("raw_gaps"):
                res["gaps"] = [round(g * 1e3, 4) for g in gaps]
            res["gap_all"] = summary_ms(gaps)
            win = float(a.get("window_ms", 0)) / 1e3
            if win >= 0 and ok:
                # steady-state window: every stream has started (+ warm-up), none has finished
                t_all = max(r.t_first for r in replies if r.n) + win
                t_end = min((r.t_last for r in ok), default=0)
                wg, per_stream_max = [], []
                frames_in_window = 0
                for r in replies:
                    ts = r.times or []
                    frames_in_window += sum(1 for x in ts if t_all <= x <= t_end)
                    m = 0.0
                    for i in range(len(ts) - 1):
                        if ts[i] >= t_all and ts[i + 1] <= t_end:
                            g = ts[i + 1] - ts[i]
                            wg.append(g)
                            if g > m:
                                m = g
                    per_stream_max.append(m)
                res["window_s"] = max(0.0, t_end - t_all)
                res["window_t"] = [t_all, t_end]
                res["window_frames"] = frames_in_window
                res["gap_window"] = summary_ms(wg)
                res["stalls_over_40ms"] = sum(1 for g in wg if g > 0.040)
                res["streams_with_stall"] = sum(1 for m in per_stream_max if m > 0.040)
                # each stream's worst gap in the window (issue 11: "each stream's worst gap p50/p99")
                res["stream_worst_gap"] = summary_ms([m for m in per_stream_max if m > 0])
                res["streams_started"] = sum(1 for r in replies if r.n)
        lag = self.lag[lag0:]
        res["loadgen_lag"] = summary_ms(lag)
        return res

    async def cmd_stops(self, a: dict) -> dict:
        """B5: random stops and disconnects in the middle of paced replies."""
        ops = int(a.get("ops", 1000))
        C = int(a.get("concurrency", 20))
        n = int(a.get("n", 1_000_000))
        iv = float(a.get("iv", 20))
        mix = a.get("mix") or {"ws_stop": 0.5, "ws_close": 0.15, "ws_abort": 0.1, "sse_close": 0.15,
                                "sse_stop": 0.1}
        waits = a.get("wait_tokens") or [0, 0, 1, 1, 2, 3, 5, 8, 13]
        kinds = list(mix)
        weights = [mix[k] for k in kinds]
        out = []
        left = [ops]
        rng = random.Random(int(a.get("seed", 1)))

        async def worker():
            ws = None
            while left[0] > 0:
                left[0] -= 1
                kind = rng.choices(kinds, weights)[0]
                k = rng.choice(waits)
                tag = self.tag("s")
                rec = {"kind": kind, "tag": tag, "wait": k}
                try:
                    if kind.startswith("ws"):
                        if ws is None or ws.closed:
                            ws = await self.ws_connect()
                        r = self.start_reply("ws", ws, n, iv, False, tag)
                        if k:
                            r.want = k
                            r.want_fut = self.loop.create_future()
                            await self._wait(r.want_fut, 10)
                        rec["t_action"] = now()
                        rec["tokens"] = r.n
                        if kind == "ws_stop":
                            ws.send_json({"type": "stop"})
                            try:
                                await self._wait(r.fut, 10)
                            except TimeoutError:
                                r.error = "no done after stop"
                            rec["t_done"] = r.t_last if False else now()
                            rec["finish"] = r.finish
                            rec["error"] = r.error
                            ws.send_json({"type": "reset"})
                            await ws.recv_type("session")
                        elif kind == "ws_close":
                            ws.reply = None
                            ws.close()
                            ws = None
                        else:
                            ws.reply = None
                            ws.abort()
                            ws = None
                    else:
                        c = await self.nex_pool.connect(pooled=False)
                        r = self.start_reply("sse", c, n, iv, False, tag)
                        r.want = max(k, 0)
                        r.want_fut = self.loop.create_future()
                        await self._wait(r.want_fut, 10)
                        if kind == "sse_stop" and not r.session:
                            # need the session id before stopping over HTTP
                            r.want_fut = self.loop.create_future()
                            r.want = max(1, r.n + 1)
                            await self._wait(r.want_fut, 10)
                        rec["t_action"] = now()
                        rec["tokens"] = r.n
                        if kind == "sse_close":
                            c.transport.close()
                        else:
                            fut = self.loop.create_future()
                            sink = NullSink(fut)
                            sc = await self.nex_pool.acquire()
                            rec["t_action"] = now()
                            sc.request(b"POST", b"/api/sessions/%s/stop" % r.session.encode(),
                                       self.nex_pool.hostport, b"Content-Type: application/json\r\n", b"{}", sink)
                            await self._wait(fut, 10)
                            rec["stop_status"] = sink.status
                            try:
                                await self._wait(r.fut, 10)
                            except TimeoutError:
                                r.error = "no done after stop"
                            rec["finish"] = r.finish
                            rec["error"] = r.error
                            c.transport.close()
                except Exception as e:  # noqa: BLE001
                    rec["error"] = f"{type(e).__name__}: {e}"
                    if ws is not None:
                        ws.abort()
                    ws = None
                out.append(rec)
            if ws is not None:
                ws.close()

        lag0 = len(self.lag)
        await asyncio.gather(*(worker() for _ in range(C)))
        return {"ops": out, "loadgen_lag": summary_ms(self.lag[lag0:])}

    async def cmd_direct_stops(self, a: dict) -> dict:
        """B5 reference: the client itself closes the upstream connection mid-reply."""
        ops = int(a.get("ops", 100))
        C = int(a.get("concurrency", 10))
        iv = float(a.get("iv", 20))
        waits = a.get("wait_tokens") or [1, 2, 3, 5]
        rng = random.Random(2)
        out = []
        left = [ops]

        async def worker():
            while left[0] > 0:
                left[0] -= 1
                tag = self.tag("d")
                c = await self.up_pool.connect(pooled=False)
                r = self.start_reply("direct", c, 1_000_000, iv, False, tag)
                r.want = rng.choice(waits)
                r.want_fut = self.loop.create_future()
                try:
                    await self._wait(r.want_fut, 10)
                except TimeoutError:
                    pass
                t = now()
                c.transport.close()
                out.append({"kind": "direct_close", "tag": tag, "t_action": t, "tokens": r.n})

        await asyncio.gather(*(worker() for _ in range(C)))
        return {"ops": out}

    async def cmd_idle_open(self, a: dict) -> dict:
        n = int(a["n"])
        t = now()
        conns, errors = await self.open_many(self.ws_connect, n, int(a.get("parallel", 64)))
        self.idle.extend(conns)
        return {"opened": len(conns), "errors": len(errors), "error_samples": sorted(set(errors))[:5],
                "seconds": now() - t, "open_total": sum(1 for c in self.idle if not c.closed)}

    async def cmd_idle_close(self, a: dict) -> dict:
        k = 0
        for c in self.idle:
            if not c.closed:
                c.close()
                k += 1
        self.idle = []
        await asyncio.sleep(0.2)
        return {"closed": k}

    async def cmd_active_start(self, a: dict) -> dict:
        n = int(a["n"])
        iv = float(a.get("iv", 100))
        tokens = int(a.get("tokens", 1_000_000))
        t = now()
        conns, errors = await self.open_many(self.ws_connect, n, int(a.get("parallel", 64)))
        t_open = now() - t
        rss_sockets = None
        if a.get("rss_pid"):
            await asyncio.sleep(1.0)
            rss_sockets = rss_kb(int(a["rss_pid"])) or None
        waits = []
        for c in conns:
            r = self.start_reply("ws", c, tokens, iv, False, self.tag("a"))
            r.want = 1
            r.want_fut = self.loop.create_future()
            self.active.append((c, r))
            waits.append(r.want_fut)
            await asyncio.sleep(0)
        done, pending = await asyncio.wait(waits, timeout=float(a.get("timeout", 60)))
        started = sum(1 for _, r in self.active if r.n > 0)
        return {"connected": len(conns), "connect_errors": len(errors), "streaming": started,
                "rss_sockets_kb": rss_sockets,
                "not_streaming": len(self.active) - started, "open_seconds": t_open,
                "start_seconds": now() - t - t_open,
                "errors": sorted({r.error for _, r in self.active if r.error})[:5]}

    async def cmd_active_stop(self, a: dict) -> dict:
        for c, _r in self.active:
            if not c.closed:
                c.send_json({"type": "stop"})
        futs = [r.fut for _, r in self.active]
        if futs:
            await asyncio.wait(futs, timeout=float(a.get("timeout", 30)))
        stopped = sum(1 for _, r in self.active if r.finish == "stopped")
        for c, _ in self.active:
            c.close()
        k = len(self.active)
        self.active = []
        await asyncio.sleep(0.2)
        return {"streams": k, "stopped": stopped}

    async def cmd_list_sessions(self, a: dict) -> dict:
        """The sessions this load generator made since the last ``cleanup`` (STORES: read them back)."""
        return {"sessions": sorted(self.sessions)}

    async def cmd_cleanup(self, a: dict) -> dict:
        ids = list(self.sessions)
        self.sessions.clear()
        statuses: dict = {}
        sem = asyncio.Semaphore(int(a.get("parallel", 16)))

        async def one(sid):
            async with sem:
                fut = self.loop.create_future()
                sink = NullSink(fut)
                try:
                    c = await self.nex_pool.acquire()
                    c.request(b"DELETE", b"/api/sessions/" + sid.encode(), self.nex_pool.hostport, b"", b"", sink)
                    await self._wait(fut, 10)
                    s = sink.status
                except Exception as e:  # noqa: BLE001
                    s = type(e).__name__
                statuses[str(s)] = statuses.get(str(s), 0) + 1

        await asyncio.gather(*(one(s) for s in ids))
        self.nex_pool.close_all()
        if self.up_pool:
            self.up_pool.close_all()
        return {"deleted": len(ids), "statuses": statuses}

    async def cmd_store_sessions(self, a: dict) -> dict:
        """Issue 11: store N idle sessions with ``POST /api/sessions`` (a short seeded history each),
        as another client would; they are not in ``self.sessions`` (``cleanup`` leaves them)."""
        n = int(a["n"])
        body = dumps({"history": [{"role": "user", "content": "What is the capital of France?"},
                                  {"role": "assistant", "content": "The capital of France is Paris."}]})
        statuses: dict = {}
        sem = asyncio.Semaphore(int(a.get("parallel", 32)))
        t = now()

        async def one():
            async with sem:
                fut = self.loop.create_future()
                sink = NullSink(fut)
                try:
                    c = await self.nex_pool.acquire()
                    c.request(b"POST", b"/api/sessions", self.nex_pool.hostport,
                              b"Content-Type: application/json\r\n", body, sink)
                    await self._wait(fut, 10)
                    s = sink.status
                except Exception as e:  # noqa: BLE001
                    s = type(e).__name__
                statuses[str(s)] = statuses.get(str(s), 0) + 1

        await asyncio.gather(*(one() for _ in range(n)))
        self.nex_pool.close_all()
        return {"created": statuses.get("201", 0), "statuses": statuses, "seconds": now() - t}

    async def cmd_lag(self, a: dict) -> dict:
        return {"loadgen_lag": summary_ms(self.lag)}

    async def run(self, a: dict) -> dict:
        cmd = a.get("cmd")
        fn = getattr(self, f"cmd_{cmd}", None)
        if fn is None:
            return {"error": f"unknown command {cmd!r}"}
        try:
            res = await fn(a)
        except Exception as e:  # noqa: BLE001
            import traceback
            return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        res["ws_extensions"] = self.ws_extensions
        return res


# ----------------------------------------------------------------- probe (B7)

async def probe_main(host: str, port: int, path: str, interval: float) -> None:
    """GET `path` on a keep-alive connection every `interval` s; RTTs between start/stop lines."""
    loop = asyncio.get_running_loop()
    pool = Pool(host, port)
    samples: list[tuple[float, float]] = []
    running = [False]
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    errors = [0]

    async def sampler():
        nxt = now()
        while True:
            nxt += interval
            d = nxt - now()
            if d > 0:
                await asyncio.sleep(d)
            else:
                nxt = now()
            if not running[0]:
                continue
            fut = loop.create_future()
            sink = NullSink(fut)
            t = now()
            try:
                c = await pool.acquire()
                c.request(b"GET", path.encode(), pool.hostport, b"", b"", sink)
                h = loop.call_later(5, lambda f=fut: f.done() or f.set_result(None))
                try:
                    await fut
                finally:
                    h.cancel()
                if sink.status == 200:
                    samples.append((t, now() - t))
                else:
                    errors[0] += 1
            except Exception:  # noqa: BLE001
                errors[0] += 1

    task = asyncio.ensure_future(sampler())
    print("READY", flush=True)
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = line.decode().strip()
        if cmd == "start":
            samples.clear()
            errors[0] = 0
            running[0] = True
            print(json.dumps({"ok": True}), flush=True)
        elif cmd == "stop":
            running[0] = False
            rtts = [s[1] for s in samples]
            print(json.dumps({"rtt": summary_ms(rtts), "errors": errors[0],
                              "raw": [round(x * 1e3, 4) for x in rtts]}), flush=True)
        elif cmd == "quit":
            break
    task.cancel()


# ----------------------------------------------------------------- entry points

def _hostport(s: str | None):
    if not s:
        return None
    h, _, p = s.rpartition(":")
    return (h or "127.0.0.1", int(p))


async def serve_main(args) -> None:
    lg = LoadGen(_hostport(args.upstream), _hostport(args.nexlm), compress=not args.no_compress,
                 ws_path=args.ws_path, nexlm_model=args.nexlm_model)
    mon = asyncio.ensure_future(lg.lag_monitor())
    loop = asyncio.get_running_loop()
    if args.mode == "once":
        res = await lg.run(json.loads(args.command))
        print(json.dumps(res), flush=True)
        mon.cancel()
        return
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True, "uvloop": args.uvloop_used}), flush=True)
    while True:
        line = await reader.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        a = json.loads(line)
        if a.get("cmd") == "quit":
            break
        res = await lg.run(a)
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
    mon.cancel()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="NexLM benchmark load generator")
    ap.add_argument("mode", choices=["serve", "once", "probe"])
    ap.add_argument("command", nargs="?", help="JSON command for `once`")
    ap.add_argument("--upstream", help="HOST:PORT of the fake upstream (direct rounds)")
    ap.add_argument("--nexlm", help="HOST:PORT of NexLM")
    ap.add_argument("--ws-path", default="/ws")
    ap.add_argument("--nexlm-model", default="fake/fake-model", help="the model id v1 and v1_ns ask NexLM for")
    ap.add_argument("--no-compress", action="store_true",
                    help="do not offer permessage-deflate (browsers do offer it)")
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--path", default="/healthz", help="probe: path to GET")
    ap.add_argument("--interval-ms", type=float, default=10.0, help="probe: sampling interval")
    args = ap.parse_intermixed_args(argv)
    raise_nofile()
    args.uvloop_used = False if args.no_uvloop else use_uvloop()
    if args.mode == "probe":
        host, port = _hostport(args.nexlm)
        asyncio.run(probe_main(host, port, args.path, args.interval_ms / 1e3))
    else:
        asyncio.run(serve_main(args))


if __name__ == "__main__":
    main()
