"""A fast fake OpenAI-compatible streaming upstream, run as its own process.

    python bench/fake_upstream.py --port 0 [--tokens 20] [--interval-ms 0] [--uvloop]

It is a real HTTP/1.1 server (keep-alive, pipelining-safe, chunked transfer
encoding) written directly on ``asyncio.Protocol`` so that it costs as little
CPU per token as possible; every byte it sends for a reply is precomputed.

``POST /v1/chat/completions`` with ``"stream": true`` answers
``text/event-stream``, one HTTP chunk per SSE event, in exactly the shape of
tests/fixtures/openai-usage-then-done.txt::

    data: {..."delta":{"role":"assistant","content":"","refusal":null}...,"usage":null}
    data: {..."delta":{"content":" lor"}...}        (one per token)
    data: {..."delta":{},..."finish_reason":"stop"}...}
    data: {...,"choices":[],"usage":{...}}
    data: [DONE]

Per-request knobs ride in the last user message, so that the same request
works directly and through NexLM (which forwards the message verbatim):
``n=<tokens>``, ``iv=<pacing ms>`` (0 = unpaced: everything written at once,
honouring TCP flow control) and ``tag=<id>`` (names the request in the
records below). Every token is exactly 4 characters, so a client can count
tokens even when a relay coalesces several into one frame.

Control endpoints (same port):
    GET  /stats        open connections, active streams, totals, own loop lag
    GET  /records?since=N   per-request records: tag, open/first/close times,
                            whether the stream completed or was cut (times are
                            CLOCK_MONOTONIC seconds, comparable across processes)
    POST /reset        clear records and counters (not the open connections)
    GET  /healthz
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

try:
    import orjson

    def _loads(b: bytes):
        return orjson.loads(b)

    def _dumps(o) -> bytes:
        return orjson.dumps(o)
except ImportError:  # pragma: no cover
    def _loads(b: bytes):
        return json.loads(b)

    def _dumps(o) -> bytes:
        return json.dumps(o, separators=(",", ":")).encode()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import knobs, now, quantile, raise_nofile, use_uvloop  # noqa: E402

WORDS = [" lor", " ips", " dol", " sit", " ame", " con", " sec", " adi"]
TOKEN_CHARS = 4
CHUNK_ID = "chatcmpl-bench"
CREATED = 1760000000


def _chunk(payload: bytes) -> bytes:
    """One SSE event as one HTTP/1.1 chunk."""
    body = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(body), body)


class Replies:
    """Precomputed bytes of replies, keyed by (model, n)."""

    def __init__(self) -> None:
        self._tokens: dict[str, list[bytes]] = {}
        self._heads: dict[str, bytes] = {}
        self._tails: dict[tuple[str, int], bytes] = {}
        self._whole: dict[tuple[str, int], bytes] = {}

    def _model(self, model: str) -> None:
        if model in self._tokens:
            return
        m = json.dumps(model)
        pre = ('{"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":'
               % (CHUNK_ID, CREATED, m))
        self._heads[model] = _chunk((pre + '[{"index":0,"delta":{"role":"assistant","content":"",'
                                     '"refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}').encode())
        self._tokens[model] = [
            _chunk((pre + '[{"index":0,"delta":{"content":%s},"logprobs":null,"finish_reason":null}],'
                    '"usage":null}' % json.dumps(w)).encode())
            for w in WORDS
        ]
        self._pre = pre

    def head(self, model: str) -> bytes:
        self._model(model)
        return self._heads[model]

    def token(self, model: str, i: int) -> bytes:
        return self._tokens[model][i % len(WORDS)]

    def tail(self, model: str, n: int) -> bytes:
        key = (model, n)
        t = self._tails.get(key)
        if t is None:
            self._model(model)
            pre = ('{"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":'
                   % (CHUNK_ID, CREATED, json.dumps(model)))
            t = (_chunk((pre + '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],'
                         '"usage":null}').encode())
                 + _chunk((pre + '[],"usage":{"prompt_tokens":9,"completion_tokens":%d,"total_tokens":%d}}'
                           % (n, n + 9)).encode())
                 + _chunk(b"[DONE]")
                 + b"0\r\n\r\n")
            if len(self._tails) < 4096:
                self._tails[key] = t
        return t

    def whole(self, model: str, n: int) -> bytes:
        """Head, n tokens and tail in one buffer (for unpaced replies)."""
        key = (model, n)
        w = self._whole.get(key)
        if w is None:
            self._model(model)
            toks = self._tokens[model]
            k = len(toks)
            cycle = b"".join(toks)
            w = self._heads[model] + cycle * (n // k) + b"".join(toks[: n % k]) + self.tail(model, n)
            if len(w) <= 8 << 20 and len(self._whole) < 64:
                self._whole[key] = w
        return w


RESP_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")


class Stats:
    def __init__(self) -> None:
        self.open_connections = 0
        self.total_connections = 0
        self.active_streams = 0
        self.total_requests = 0
        self.completed = 0
        self.cut = 0
        self.records: list[list] = []  # [seq, tag, conn_open, req_time, first_byte, end_time, completed]
        self.seq = 0
        self.lag: list[float] = []

    def reset(self) -> None:
        self.total_connections = self.open_connections
        self.total_requests = 0
        self.completed = 0
        self.cut = 0
        self.records = []
        self.lag = []


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("app", "transport", "buf", "t_open", "stream", "paused", "drain_waiter",
                 "closed", "pending")

    def __init__(self, app: "FakeUpstream") -> None:
        self.app = app
        self.transport = None
        self.buf = b""
        self.stream = None  # the running Stream, if any
        self.paused = False
        self.closed = False
        self.pending: list[tuple] = []  # pipelined requests waiting for the stream to finish

    # ---- connection
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.t_open = now()
        st = self.app.stats
        st.open_connections += 1
        st.total_connections += 1

    def connection_lost(self, exc) -> None:
        if self.closed:
            return
        self.closed = True
        self.app.stats.open_connections -= 1
        if self.stream is not None:
            self.stream.finish(False)
            self.stream = None

    def eof_received(self):
        # The client half-closed: a streaming client that goes away. Close at once so that
        # the close time is when the peer's FIN arrived.
        self.connection_lost(None)
        return False  # transport closes itself

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        s = self.stream
        if s is not None and s.unpaced_rest is not None:
            s.write_unpaced()

    # ---- request parsing (HTTP/1.1, Content-Length or chunked bodies)
    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self.buf) > 65536:
                    self._bad(b"431 Request Header Fields Too Large")
                return
            head = self.buf[:head_end].decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self._bad(b"400 Bad Request")
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            pos = head_end + 4
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body, consumed = _dechunk(self.buf, pos)
                if body is None:
                    return
                rest = self.buf[consumed:]
            else:
                n = int(headers.get("content-length", "0") or 0)
                if len(self.buf) < pos + n:
                    return
                body = self.buf[pos:pos + n]
                rest = self.buf[pos + n:]
            self.buf = rest
            req = (method, target, headers, body, now())
            if self.stream is not None:
                self.pending.append(req)
            else:
                self.handle(*req)

    def _bad(self, status: bytes) -> None:
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.close()
        self.buf = b""

    def _json(self, obj, status: bytes = b"200 OK") -> None:
        body = _dumps(obj)
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def stream_finished(self) -> None:
        self.stream = None
        while self.pending and self.stream is None and not self.closed:
            self.handle(*self.pending.pop(0))

    def handle(self, method: str, target: str, headers: dict, body: bytes, t_req: float) -> None:
        path, _, query = target.partition("?")
        app = self.app
        if method == "POST" and path.endswith("/chat/completions"):
            try:
                req = _loads(body)
            except Exception:
                self._json({"error": {"message": "bad JSON", "type": "invalid_request_error"}},
                           b"400 Bad Request")
                return
            opts = app.options_for(req)
            if not req.get("stream"):
                text = "".join(WORDS[i % len(WORDS)] for i in range(opts["n"]))
                self._json({"id": CHUNK_ID, "object": "chat.completion", "created": CREATED,
                            "model": req.get("model", "fake-model"),
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 9, "completion_tokens": opts["n"],
                                      "total_tokens": opts["n"] + 9}})
                return
            self.stream = Stream(self, req.get("model") or "fake-model", opts, t_req)
            self.stream.start()
        elif method == "GET" and path == "/stats":
            st = app.stats
            lag = sorted(st.lag)
            self._json({"open_connections": st.open_connections,
                        "total_connections": st.total_connections,
                        "active_streams": st.active_streams,
                        "total_requests": st.total_requests,
                        "completed": st.completed, "cut": st.cut,
                        "records": len(st.records),
                        "loop_lag_ms": {"n": len(lag),
                                        "p50": (quantile(lag, 0.5) or 0.0) * 1e3,
                                        "p99": (quantile(lag, 0.99) or 0.0) * 1e3,
                                        "max": (lag[-1] * 1e3 if lag else 0.0)},
                        "active_tags": [s.tag for s in app.active]})
        elif method == "GET" and path == "/records":
            since = 0
            for part in query.split("&"):
                if part.startswith("since="):
                    since = int(part[6:])
            recs = app.stats.records
            self._json({"records": [r for r in recs if r[0] >= since]})
        elif method == "POST" and path == "/reset":
            app.stats.reset()
            self._json({"ok": True})
        elif path == "/healthz":
            self._json({"ok": True})
        else:
            self._json({"error": {"message": "not found"}}, b"404 Not Found")


def _dechunk(buf: bytes, pos: int):
    out = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(buf[pos:eol].split(b";")[0], 16)
        start = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)  # trailers
            if buf[eol:eol + 4] == b"\r\n\r\n":
                return b"".join(out), eol + 4
            if end < 0:
                return None, 0
            return b"".join(out), end + 4
        if len(buf) < start + size + 2:
            return None, 0
        out.append(buf[start:start + size])
        pos = start + size + 2


class Stream:
    """One streaming reply on one connection."""

    __slots__ = ("proto", "model", "n", "iv", "tag", "t_req", "i", "t0", "handle", "done",
                 "unpaced_rest", "record", "app")

    def __init__(self, proto: UpstreamProtocol, model: str, opts: dict, t_req: float) -> None:
        self.proto = proto
        self.app = proto.app
        self.model = model
        self.n = opts["n"]
        self.iv = opts["iv"]
        self.tag = opts["tag"]
        self.t_req = t_req
        self.i = 0
        self.handle = None
        self.done = False
        self.unpaced_rest = None
        st = self.app.stats
        st.seq += 1
        st.total_requests += 1
        st.active_streams += 1
        self.app.active.add(self)
        # [seq, tag, conn_open, request_time, first_byte_time, end_time, completed, tokens_sent]
        self.record = [st.seq, self.tag, proto.t_open, t_req, 0.0, 0.0, False, 0]
        st.records.append(self.record)

    def start(self) -> None:
        replies = self.app.replies
        t = self.proto.transport
        self.record[4] = now()
        if self.iv <= 0:
            self.unpaced_rest = memoryview(RESP_HEAD + replies.whole(self.model, self.n))
            self.write_unpaced()
            return
        t.write(RESP_HEAD + replies.head(self.model) + replies.token(self.model, 0))
        self.i = 1
        self.t0 = now()
        if self.n <= 1:
            self._end()
            return
        self.handle = self.app.loop.call_at(self.t0 + self.iv, self.tick)

    def write_unpaced(self) -> None:
        t = self.proto.transport
        rest = self.unpaced_rest
        step = 262144
        while rest is not None and not self.proto.paused and not self.proto.closed:
            t.write(rest[:step])
            rest = rest[step:] if len(rest) > step else None
        self.unpaced_rest = rest
        if rest is None and not self.proto.closed:
            self.record[7] = self.n
            self.finish(True)

    def tick(self) -> None:
        if self.done:
            return
        proto = self.proto
        proto.transport.write(self.app.replies.token(self.model, self.i))
        self.i += 1
        if self.i >= self.n:
            self._end()
            return
        self.handle = self.app.loop.call_at(self.t0 + self.i * self.iv, self.tick)

    def _end(self) -> None:
        self.proto.transport.write(self.app.replies.tail(self.model, self.n))
        self.record[7] = self.n
        self.finish(True)

    def finish(self, completed: bool) -> None:
        if self.done:
            return
        self.done = True
        if self.handle is not None:
            self.handle.cancel()
        if not completed:
            self.record[7] = self.i if self.iv > 0 else -1
        self.record[5] = now()
        self.record[6] = completed
        st = self.app.stats
        st.active_streams -= 1
        if completed:
            st.completed += 1
        else:
            st.cut += 1
        self.app.active.discard(self)
        if completed and self.proto.stream is self:
            self.proto.stream_finished()


class FakeUpstream:
    def __init__(self, tokens: int, interval: float) -> None:
        self.default_n = tokens
        self.default_iv = interval
        self.replies = Replies()
        self.stats = Stats()
        self.active: set[Stream] = set()
        self.loop = None

    def options_for(self, req: dict) -> dict:
        opts = {"n": self.default_n, "iv": self.default_iv, "tag": ""}
        for k, v in knobs(req).items():
            try:
                if k == "n":
                    opts["n"] = max(1, int(v))
                elif k == "iv":
                    opts["iv"] = float(v) / 1000.0
                elif k == "tag":
                    opts["tag"] = v
            except ValueError:
                pass
        return opts

    async def lag_monitor(self) -> None:
        step = 0.01
        while True:
            t = now()
            await asyncio.sleep(step)
            late = now() - t - step
            lag = self.stats.lag
            if len(lag) < 200_000:
                lag.append(max(0.0, late))


async def serve(host: str, port: int, tokens: int, interval: float, ready_file) -> None:
    app = FakeUpstream(tokens, interval)
    loop = asyncio.get_running_loop()
    app.loop = loop
    server = await loop.create_server(lambda: UpstreamProtocol(app), host, port, backlog=4096,
                                      reuse_address=True)
    real_port = server.sockets[0].getsockname()[1]
    print(f"READY {real_port}", file=ready_file, flush=True)
    asyncio.ensure_future(app.lag_monitor())
    async with server:
        await server.serve_forever()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: pick a free port (printed as READY <port>)")
    ap.add_argument("--tokens", type=int, default=20, help="tokens per reply unless the message says n=")
    ap.add_argument("--interval-ms", type=float, default=0.0,
                    help="pacing between tokens; 0: unpaced (unless the message says iv=)")
    ap.add_argument("--uvloop", action="store_true", help="use uvloop if installed")
    a = ap.parse_args(argv)
    raise_nofile()
    if a.uvloop:
        use_uvloop()
    try:
        asyncio.run(serve(a.host, a.port, a.tokens, a.interval_ms / 1000.0, sys.stdout))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
