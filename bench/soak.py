"""NexLM soak test (issue 5, "Soak run"): many clients for a long time, against a faulty upstream.

    python bench/soak.py --clients 200 --minutes 10      # the real run; writes bench/soak-results.md
    python bench/soak.py --minutes 0.5                   # a quick check of the whole thing

Three processes, all on 127.0.0.1, started here and stopped at the end:

* a fault-injecting fake OpenAI-compatible upstream (this file, ``upstream`` mode, aiohttp.web):
  ``--error-rate`` (30%) of requests fail in varied ways -- HTTP 429 with Retry-After, 500 and 503
  with JSON error bodies, 502 with an HTML body, a reset before the headers, a reset mid-stream,
  an in-band ``data: {"error": ...}`` event, a stall (before or after the first token) and EOF
  without ``finish_reason``/``[DONE]``. Good replies have the shape of
  ``bench/fake_upstream.py``'s: knobs ride in the user message (``n=<tokens> iv=<ms> tag=<id>``),
  every token is one of 8 four-character words in a fixed cycle, so a client can tell from the
  text alone whether anything was lost or repeated. It counts its own open connections and
  active streams (``GET /stats``) and records every request (``GET /records``).
* NexLM: ``python app.py --config <generated toml> --port <free>`` (run through this file's tiny
  ``launch`` mode, which only adds a SIGUSR2 handler -- full ``gc.collect()``, heap figures to a
  file -- used once after the baseline and once at the end; ``--plain`` runs app.py directly), limits lifted as in
  ``bench/run.py``, ``resume_grace_seconds = 5`` so reconnects resume, short upstream timeouts
  so stalls end in ``upstream_timeout`` within seconds.
* this process: N concurrent client loops (asyncio + aiohttp client), ~70% WebSocket and ~30% SSE,
  each doing random actions until the time is up: chat and read to ``done``; chat and stop after a
  random number of tokens; chat, drop the connection mid-reply (abort or close) and come back with
  ``/ws?session=ID&after=SEQ`` or ``GET /sse?session=ID`` + ``Last-Event-ID`` (sometimes after the
  resume grace, sometimes never); regenerate; reset; a second chat while one runs (``busy``);
  bad frames and bad requests (malformed JSON, wrong types, unknown type, out-of-range params,
  unknown model, binary frame, oversized frame, garbage Last-Event-ID).

``--hostile`` adds hostile clients for the soak phase (see ``Hostile``): non-reading listeners on
busy sessions with ``set`` floods beside them, session floods from several addresses, login guessing
and silent sockets, all from 127.2.x.y, while every normal user gets its own 127.1.x.y address and
access token; NexLM's session, connection and queue limits stay on. The report adds RSS
before/peak/after, live sessions lost (must be 0) and the normal users' completed replies.

Invariants checked on every reply, as the client sees it: a reply that starts ends with exactly one
``done`` (when the client stayed or came back in time); ``seq`` rises on every connection and a
resumed stream starts after the ``after`` it asked for; the text is a gap-free, duplicate-free
prefix of the upstream's token cycle (across a resume too), complete when ``finish_reason`` is
``stop``; an ``error`` event of a reply is followed by its ``done`` with ``finish_reason: error``;
refusals are clean ``error`` events / JSON error statuses and the WebSocket stays open (a ``ping``
gets its ``pong``); no 5xx, no ``internal_error``. One reply in ten is checked against the
session's stored history (same text, same finish_reason), and every client's session once more
at the end.

At the end every client closes, every session is DELETEd, and once nothing runs NexLM's RSS, task
count, open file descriptors, sessions and WebSockets, and the upstream's open connections, are
compared with the baseline taken after a warm-up. RSS may stay above its baseline (allocator
high-water marks); the Python-level figures must return, and the Python heap after a full
collection (``sys.getallocatedblocks()``) tells a leak from garbage waiting for the collector. Exit status 0 only if they did and no
invariant was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as _dt
import json
import os
import random
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType, web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH, LIFTED_LIMITS, ROOT, Proc, cpu_seconds, free_port, machine_lines, now, proc_fds,  # noqa: E402
                    knobs, proc_status, quantile, raise_nofile, system_busy, tests_module, use_uvloop)

WORDS = [" lor", " ips", " dol", " sit", " ame", " con", " sec", " adi"]  # as bench/fake_upstream.py
CYCLE = "".join(WORDS)
TOKEN_CHARS = 4

# Fault kinds and their weights: shares of the faulty requests.
FAULTS = {
    "http429": 5, "http500": 4, "http503": 4, "http502_html": 2, "reset_before_headers": 2,
    "reset_mid_stream": 4, "inband_error": 4, "stall": 3, "eof_without_done": 2,
}
REPLY_ERROR_CODES = {"upstream_error", "upstream_timeout", "rate_limited"}
REFUSAL_CODES = {"bad_request", "busy", "not_found", "unknown_model"}
FINISH_REASONS = {"stop", "length", "stopped", "error", "interrupted"}
GRACE = 5.0  # resume_grace_seconds given to NexLM


def cycle_ok(text: str) -> bool:
    """Is ``text`` exactly the first len(text) characters of the upstream's token cycle?"""
    n = len(text)
    if n % TOKEN_CHARS:
        return False
    return text == (CYCLE * (n // len(CYCLE) + 1))[:n]


# =============================================================== the fault-injecting upstream

INBAND_ERROR = b"data: " + json.dumps({"error": {"message": "injected in-band error", "type": "server_error",
                                                 "code": "soak_injected"}}).encode() + b"\n\n"


class Vocabulary:
    """The tests' upstream bytes (tests/fake_upstream.py): chunks, the usage chunk, [DONE], error bodies.
    Loaded by the upstream process only (not by ``launch``: NexLM's process stays as it was)."""

    def __init__(self) -> None:
        self.fake = fake = tests_module("fake_upstream")
        self.head = fake.chunk("", role=True)
        self.tokens = [fake.chunk(w) for w in WORDS]
        self.finish = fake.chunk(finish="stop")
        self.done = fake.DONE

    def usage(self, n: int) -> bytes:
        return self.fake.usage_chunk(prompt=9, completion=n)

    def error_response(self, status: int, message: str, etype: str, headers: dict | None = None) -> web.Response:
        """An HTTP error with an OpenAI-style JSON body, as the tests' ``fake_upstream.error`` writes it."""
        script = self.fake.error(status, message, headers, etype)
        return web.Response(status=status, body=script.body,
                            headers={"Content-Type": "application/json", **script.headers})


def _rst(transport) -> None:
    """Close with a TCP RST rather than a FIN."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass
    transport.abort()


class FaultUpstream:
    def __init__(self, error_rate: float, seed: int, stall_max: float) -> None:
        self.error_rate = error_rate
        self.rng = random.Random(seed)
        self.stall_max = stall_max
        self.kinds = list(FAULTS)
        self.weights = [FAULTS[k] for k in self.kinds]
        self.counts: collections.Counter = collections.Counter()
        self.outcomes: collections.Counter = collections.Counter()
        self.active = 0
        self.peak_active = 0
        # [tag, fault, t_request, t_end, tokens_sent, outcome]  (CLOCK_MONOTONIC, comparable across processes)
        self.records: list[list] = []
        self.runner: web.AppRunner | None = None
        self.lag: list[float] = []
        self.v = Vocabulary()

    def knobs(self, req) -> tuple[int, float, str]:
        n, iv, tag = 20, 0.0, ""
        for k, v in knobs(req).items():
            try:
                if k == "n":
                    n = max(1, min(100000, int(v)))
                elif k == "iv":
                    iv = max(0.0, float(v) / 1000.0)
                elif k == "tag":
                    tag = v[:80]
            except ValueError:
                pass
        return n, iv, tag

    async def chat(self, request: web.Request) -> web.StreamResponse:
        t_req = now()
        v = self.v
        try:
            req = json.loads(await request.read())
            assert isinstance(req, dict)
        except Exception:  # noqa: BLE001
            return web.json_response({"error": {"message": "bad JSON", "type": "invalid_request_error"}}, status=400)
        n, iv, tag = self.knobs(req)
        fault = self.kinds[self.rng.choices(range(len(self.kinds)), self.weights)[0]] \
            if self.rng.random() < self.error_rate else None
        rec = [tag, fault or "ok", t_req, 0.0, 0, "open"]
        self.records.append(rec)
        self.counts["requests"] += 1
        self.counts[fault or "ok"] += 1
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            if fault in ("http429", "http500", "http503"):
                status = int(fault[4:])
                headers = {"Retry-After": self.rng.choice(("0", "1"))} if status == 429 else {}
                rec[5] = "http_error"
                etype = "rate_limit_exceeded" if status == 429 else "server_error"
                return v.error_response(status, f"injected HTTP {status}", etype, headers)
            if fault == "http502_html":
                rec[5] = "http_error"
                return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                                    content_type="text/html")
            if fault == "reset_before_headers":
                rec[5] = "reset"
                _rst(request.transport)
                raise asyncio.CancelledError  # nothing more to send on a dead connection
            cut_at = self.rng.randint(0, max(0, n - 1)) if fault else None
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            await resp.write(v.head)
            t0 = now()
            for i in range(n):
                if cut_at is not None and i == cut_at:
                    break
                if i and iv:
                    d = t0 + i * iv - now()
                    if d > 0:
                        await asyncio.sleep(d)
                await resp.write(v.tokens[i % len(v.tokens)])
                rec[4] = i + 1
            if fault is None:
                await resp.write(v.finish + v.usage(n) + v.done)
                await resp.write_eof()
                rec[5] = "completed"
                return resp
            if fault == "reset_mid_stream":
                rec[5] = "reset"
                _rst(request.transport)
                raise asyncio.CancelledError
            if fault == "inband_error":
                await resp.write(INBAND_ERROR)
                await resp.write_eof()
                rec[5] = "inband_error"
                return resp
            if fault == "eof_without_done":
                await resp.write_eof()
                rec[5] = "eof"
                return resp
            # stall: say nothing until the client gives up (or stall_max passes)
            await asyncio.sleep(self.stall_max)
            await resp.write_eof()
            rec[5] = "stall_expired"
            return resp
        except asyncio.CancelledError:
            if rec[5] == "open":
                rec[5] = "cut"  # the client (NexLM) went away
            raise
        except ConnectionResetError:
            rec[5] = "cut"
            raise asyncio.CancelledError from None  # gone: nothing to answer, nothing to log
        finally:
            rec[3] = now()
            self.active -= 1
            self.outcomes[rec[5]] += 1

    async def stats(self, request: web.Request) -> web.Response:
        lag = sorted(self.lag)
        return web.json_response({
            "open_connections": len(self.runner.server.connections) - 1,  # minus this request's own
            "active_streams": self.active, "peak_active": self.peak_active,
            "counts": dict(self.counts), "outcomes": dict(self.outcomes),
            "loop_lag_ms": {"p99": (lag[int(0.99 * (len(lag) - 1))] * 1e3) if lag else 0.0,
                            "max": (lag[-1] * 1e3) if lag else 0.0},
        })

    async def get_records(self, request: web.Request) -> web.Response:
        return web.json_response({"records": self.records})

    async def lag_monitor(self) -> None:
        while True:
            t = now()
            await asyncio.sleep(0.05)
            if len(self.lag) < 100000:
                self.lag.append(max(0.0, now() - t - 0.05))


async def upstream_main(a) -> None:
    up = FaultUpstream(a.error_rate, a.seed, a.stall_max)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", up.chat)
    app.router.add_get("/stats", up.stats)
    app.router.add_get("/records", up.get_records)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    up.runner = runner
    site = web.TCPSite(runner, "127.0.0.1", a.port, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    asyncio.ensure_future(up.lag_monitor())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


# =============================================================== NexLM's launcher (heap probe)

def launch(app: str, rest: list[str]) -> None:
    """Run ``python <app> <rest>`` in this interpreter, plus a SIGUSR2 handler that runs a full
    ``gc.collect()`` and appends the Python heap's figures to $SOAK_HEAP_PROBE. Until it is
    signalled (once after the baseline, once at the end) it costs nothing: NexLM runs as usual.

    It tells a leak from garbage that merely waits for the collector: NexLM freezes its start-up
    objects and collects the old generation rarely (``gc.set_threshold(7000, 20, 20)``), so
    connection objects caught in reference cycles can pile up between full collections.
    """
    import gc
    import runpy

    probe = os.environ.get("SOAK_HEAP_PROBE")

    def on_usr2(signum, frame) -> None:
        before = {"gc_objects": len(gc.get_objects()), "blocks": sys.getallocatedblocks(),
                  "rss_kb": proc_status(os.getpid()).get("VmRSS", 0)}
        collected = gc.collect()
        objs = gc.get_objects()
        rec = {"t": now(), "before": before, "collected": collected, "gc_objects": len(objs),
               "frozen": gc.get_freeze_count(), "blocks": sys.getallocatedblocks(),
               "rss_kb": proc_status(os.getpid()).get("VmRSS", 0),
               "top": collections.Counter(type(o).__name__ for o in objs).most_common(8)}
        del objs
        if probe:
            with open(probe, "a") as f:
                f.write(json.dumps(rec) + "\n")

    signal.signal(signal.SIGUSR2, on_usr2)
    app = str(Path(app).resolve())
    sys.argv = [app, *rest]
    sys.path.insert(0, str(Path(app).parent))
    runpy.run_path(app, run_name="__main__")


# =============================================================== processes and /proc

# =============================================================== what the clients saw

class Closed(Exception):
    """The WebSocket is gone (the server closed it, or the connection broke)."""

    def __init__(self, code, why: str = "") -> None:
        super().__init__(f"websocket closed (code {code}) {why}".strip())
        self.code = code


class Violation(Exception):
    pass


class Tally:
    """Everything counted during one phase (warm-up or soak)."""

    def __init__(self) -> None:
        self.actions: collections.Counter = collections.Counter()
        self.reply_errors: collections.Counter = collections.Counter()  # error events of replies, by code
        self.refusals: collections.Counter = collections.Counter()  # refusals (error events / JSON statuses), by code
        self.finishes: collections.Counter = collections.Counter()
        self.violations: collections.Counter = collections.Counter()
        self.samples: dict[str, list[str]] = collections.defaultdict(list)
        self.ws_close_codes: collections.Counter = collections.Counter()
        self.http_status: collections.Counter = collections.Counter()
        self.resume: collections.Counter = collections.Counter()
        self.stop_marks: list[tuple[str, float]] = []  # (tag, time the stop was sent)
        self.abandon_marks: list[tuple[str, float]] = []  # (tag, time the client vanished for good)
        self.stop_to_done: list[float] = []  # client side: stop sent -> done received
        self.replies_started = 0
        self.replies_done = 0
        self.history_checks = 0
        self.tokens = 0
        self.harness_errors: collections.Counter = collections.Counter()
        # POST /sse chats without a session id that NexLM refuses after it has made a session
        # (wrong message type, bad params, unknown model): see the report
        self.sessionless_refusals = 0
        self.violation_tags: set[str] = set()  # the upstream's records of these go into the report

    def violate(self, kind: str, detail: str) -> None:
        self.violations[kind] += 1
        if len(self.samples[kind]) < 6:
            self.samples[kind].append(detail[:400])


class ReplyView:
    """One reply as one client sees it (possibly over two connections)."""

    __slots__ = ("tag", "n", "rid", "text", "chars", "done", "finish", "errors", "t_stop", "stopped", "resumed",
                 "t_drop", "done_seq", "busy_answered", "probe", "probe_seq")

    def __init__(self, tag: str, n: int) -> None:
        self.tag = tag
        self.n = n
        self.rid = None
        self.text: list[str] = []
        self.chars = 0
        self.done = 0
        self.finish = None
        self.errors: list[str] = []
        self.t_stop = None
        self.stopped = False
        self.resumed = False
        self.t_drop = 0.0
        self.done_seq = None
        self.busy_answered = False
        self.probe: ReplyView | None = None  # a busy probe that was accepted (the reply had just ended)
        self.probe_seq = None

    @property
    def tokens(self) -> int:
        return self.chars // TOKEN_CHARS


class Soak:
    def __init__(self, args, nex_url: str, tally: Tally, deadline: float, rng_seed: int) -> None:
        self.invariants = tests_module("invariants")  # the tests' checks, where the soak's are the same
        self.a = args
        self.url = nex_url
        self.t = tally
        self.deadline = deadline
        self.sessions: set[str] = set()  # every session id seen, for the final DELETE
        self.owners: dict[str, str] = {}  # --hostile: session id -> the token that made it
        self.seed = rng_seed

    # ---- --hostile: every normal user has an address and a token of its own (limits are per client)
    def user_http(self, cid: int) -> aiohttp.ClientSession:
        local = {"local_addr": (user_addr(cid), 0)} if self.a.hostile else {}
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, **local),
                                     headers=bearer(user_token(cid)) if self.a.hostile else None,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                                     read_bufsize=1 << 20)

    def seen(self, sid: str, cid: int) -> None:
        self.sessions.add(sid)
        if self.a.hostile:
            self.owners[sid] = user_token(cid)

    # ---- checks shared by both transports
    def check_done(self, rv: ReplyView, who: str, expect: set[str] | None = None, ctx: str = "") -> None:
        t = self.t
        v0 = sum(t.violations.values())
        who = f"{who} [{ctx}]" if ctx else who
        t.replies_done += 1
        t.tokens += rv.tokens
        t.finishes[rv.finish] += 1
        text = "".join(rv.text)
        if rv.done != 1:
            t.violate("done_count_not_1", f"{who} tag={rv.tag} reply={rv.rid} done x{rv.done}")
        if rv.finish not in FINISH_REASONS:
            t.violate("unknown_finish_reason", f"{who} tag={rv.tag} finish={rv.finish!r}")
        if not cycle_ok(text):
            t.violate("text_gap_or_duplicate", f"{who} tag={rv.tag} resumed={rv.resumed} text={text[:80]!r}...")
        if rv.finish == "stop" and rv.chars != rv.n * TOKEN_CHARS:
            t.violate("stop_but_incomplete", f"{who} tag={rv.tag} got {rv.chars} chars, want {rv.n * TOKEN_CHARS}")
        if rv.errors and rv.finish != "error":
            t.violate("error_without_error_done", f"{who} tag={rv.tag} errors={rv.errors} finish={rv.finish}")
        if rv.finish == "error" and not rv.errors:
            t.violate("error_done_without_error_event", f"{who} tag={rv.tag}")
        if expect is not None and rv.finish not in expect:
            t.violate("unexpected_finish", f"{who} tag={rv.tag} finish={rv.finish} expected one of {sorted(expect)}")
        if sum(t.violations.values()) != v0 and len(t.violation_tags) < 20:
            t.violation_tags.add(rv.tag)

    def reply_error(self, code, who: str, tag: str) -> None:
        self.t.reply_errors[code] += 1
        if code not in REPLY_ERROR_CODES:
            self.t.violate("unexpected_reply_error_code", f"{who} tag={tag} code={code}")

    def refusal(self, code, who: str, expected: set[str] | None) -> None:
        self.t.refusals[code] += 1
        if code not in REFUSAL_CODES or (expected is not None and code not in expected):
            self.t.violate("unexpected_refusal", f"{who} code={code} expected={sorted(expected or REFUSAL_CODES)}")

    async def check_history(self, http: aiohttp.ClientSession, sid: str, rv: ReplyView | None, who: str,
                            final: bool = False) -> None:
        """The session's stored history agrees with what the client saw."""
        self.t.history_checks += 1
        async with asyncio.timeout(15):
            async with http.get(f"{self.url}/api/sessions/{sid}") as r:
                if r.status != 200:
                    self.t.violate("history_fetch_failed", f"{who} sid={sid[:8]} status={r.status}")
                    return
                s = await r.json()
        h = s.get("history") or []
        if s.get("running") and not final:
            self.t.violate("running_after_done", f"{who} sid={sid[:8]} running={s.get('running')}")
        for kind, detail in self.invariants.history_problems(h, FINISH_REASONS):
            self.t.violate(kind, f"{who} sid={sid[:8]} {detail}")
        if rv is not None and rv.rid is not None:
            if not h or h[-1].get("role") != "assistant":
                self.t.violate("history_missing_reply", f"{who} sid={sid[:8]} tag={rv.tag}")
                return
            last = h[-1]
            text = "".join(rv.text)
            if last.get("content") != text or last.get("finish_reason") != rv.finish:
                self.t.violate("history_differs_from_stream",
                               f"{who} sid={sid[:8]} tag={rv.tag} stored {len(last.get('content') or '')} chars "
                               f"{last.get('finish_reason')}, streamed {len(text)} chars {rv.finish}")

    async def delete(self, http: aiohttp.ClientSession, sid: str | None, who: str) -> None:
        if not sid:
            return
        async with asyncio.timeout(15):
            async with http.delete(f"{self.url}/api/sessions/{sid}") as r:
                self.t.http_status[f"DELETE {r.status}"] += 1
                if r.status == 200:
                    self.sessions.discard(sid)
                else:
                    self.t.violate("delete_failed", f"{who} {sid[:8]} -> {r.status}")

    async def delete_due(self, http: aiohttp.ClientSession, pending: list, who: str) -> None:
        """Sessions a client walked away from, DELETEd once their reply's resume grace is over,
        so that the session count during the soak stays about the number of clients."""
        t = now()
        for item in [x for x in pending if x[1] <= t]:
            pending.remove(item)
            await self.delete(http, item[0], who)

    def msg(self, tag: str, n: int) -> str:
        return f"soak n={n} iv={self.a.iv:g} tag={tag}"

    def pick_n(self, rng: random.Random, kind: str = "chat") -> int:
        if kind == "disconnect" and rng.random() < 0.3:
            # long enough to outlast the resume grace: abandoned replies must be interrupted by it
            return rng.randint(int(1.5 * GRACE * 1000 / self.a.iv), int(3 * GRACE * 1000 / self.a.iv))
        if kind == "busy":
            # the second chat must reach NexLM while the first reply still runs (it may not, when an
            # upstream fault ends the reply early: that race is recognised by seq order)
            return rng.randint(max(self.a.min_tokens, min(20, self.a.max_tokens)), self.a.max_tokens)
        return rng.randint(self.a.min_tokens, self.a.max_tokens)

    def absence(self, rng: random.Random) -> tuple[str, float]:
        x = rng.random()
        if x < 0.05:
            return "abandon", 0.0
        if x < 0.15:
            return "long", GRACE + 1.5  # the reply is interrupted meanwhile (if still running)
        return "short", rng.uniform(0.05, 2.5)


# ---------------------------------------------------------------- WebSocket client

WS_ACTIONS = {"chat": 33, "stop": 15, "disconnect": 16, "regenerate": 8, "reset": 4, "set": 2, "busy": 4,
              "bad_frame": 9, "binary_frame": 1, "new_session": 3, "idle": 5}
WS_BAD_FRAMES = [
    ("{not json", "bad_request"),
    ('{"type": 5}', "bad_request"),
    ('{"foo": 1}', "bad_request"),
    ('{"type": "nope"}', "bad_request"),
    ('{"type": "chat", "message": ""}', "bad_request"),
    ('{"type": "chat", "message": 123}', "bad_request"),
    ('{"type": "chat", "message": "x", "params": {"temperature": -1}}', "bad_request"),
    ('{"type": "chat", "message": "x", "params": {"max_tokens": 1e9}}', "bad_request"),
    ('{"type": "chat", "message": "x", "params": {"top_p": "NaN"}}', "bad_request"),
    ('{"type": "chat", "message": "x", "params": {"base_url": "http://evil"}}', "bad_request"),
    ('{"type": "chat", "message": "x", "model": "nope/none"}', "unknown_model"),
    ('{"type": "edit", "index": 99, "message": "x"}', "bad_request"),
    ('{"type": "restore", "history": "x"}', "bad_request"),
]


class WSClient:
    def __init__(self, soak: Soak, cid: int) -> None:
        self.s = soak
        self.t = soak.t
        self.cid = cid
        self.who = f"ws#{cid}"
        self.rng = random.Random(soak.seed * 100003 + cid)
        self.http: aiohttp.ClientSession | None = None
        self.ws = None
        self.sid: str | None = None
        self.seq = 0  # last reply-event seq seen on this connection
        self.has_turn = False
        self.last_rv: ReplyView | None = None  # the last reply seen to its done (for history checks)
        self.last_msg: tuple[str, int] | None = None  # (tag, n) of the last user message: what regenerate answers
        self.k = 0
        self.ended: collections.deque = collections.deque(maxlen=8)  # ids of replies that got their done
        self.trail: collections.deque = collections.deque(maxlen=5)  # recent actions, for violation reports
        self.to_delete: list[tuple[str, float]] = []

    async def connect(self, after: int | None = None, new: bool = False) -> dict:
        params = {}
        if self.sid and not new:
            params["session"] = self.sid
        if after is not None:
            params["after"] = str(after)
        self.ws = await self.http.ws_connect(self.s.url + "/ws", params=params, autoping=True, max_msg_size=0,
                                             timeout=aiohttp.ClientWSTimeout(ws_close=5))
        self.seq = after or 0
        frame = await self.recv(15)
        if frame.get("type") != "session":
            self.t.violate("first_frame_not_session", f"{self.who} got {frame.get('type')}")
        else:
            if self.sid and not new and frame.get("session") != self.sid:
                self.t.violate("session_lost_on_reconnect", f"{self.who} had {self.sid[:8]} got "
                                                            f"{str(frame.get('session'))[:8]}")
            self.sid = frame.get("session")
            self.s.seen(self.sid, self.cid)
            if after is None and frame.get("running") is None:
                self.seq = 0
        return frame

    async def recv(self, timeout: float) -> dict:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type == WSMsgType.TEXT:
            ev = json.loads(msg.data)
            if ev.get("type") != "session" and "seq" in ev:
                if ev["seq"] <= self.seq:
                    self.t.violate("seq_not_rising", f"{self.who} {ev.get('type')} seq {ev['seq']} after {self.seq}")
                self.seq = max(self.seq, ev["seq"])
            return ev
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            code = self.ws.close_code
            raise Closed(code, str(msg.extra or ""))
        raise Violation(f"unexpected frame type {msg.type}")

    async def send(self, obj) -> None:
        await self.ws.send_str(obj if isinstance(obj, str) else json.dumps(obj))

    async def drop(self, abort: bool) -> None:
        ws, self.ws = self.ws, None
        if ws is None:
            return
        if abort:
            conn = ws._conn or ws._response.connection
            _rst(conn.transport if conn is not None else None)
        try:
            async with asyncio.timeout(3):
                await ws.close()
        except Exception:  # noqa: BLE001
            pass

    async def read_reply(self, rv: ReplyView, stop_after: int | None = None, drop_after: int | None = None,
                         idle: float = 30.0) -> str:
        """Read events until this reply's done ("done"), a refusal before it started ("refused"),
        or drop_after tokens ("drop")."""
        while True:
            if drop_after is not None and rv.rid is not None and rv.tokens >= drop_after and not rv.done:
                return "drop"
            if stop_after is not None and rv.rid is not None and rv.tokens >= stop_after and rv.t_stop is None:
                rv.t_stop = now()
                self.t.stop_marks.append((rv.tag, rv.t_stop))
                await self.send({"type": "stop"})
            ev = await self.recv(idle)
            typ = ev.get("type")
            if typ == "start":
                if rv.rid is None:
                    rv.rid = ev.get("reply")
                    self.t.replies_started += 1
                else:
                    self.t.violate("second_start", f"{self.who} tag={rv.tag} {rv.rid} then {ev.get('reply')}")
            elif typ in ("delta", "reasoning"):
                if ev.get("reply") != rv.rid:
                    self.t.violate("event_of_other_reply", f"{self.who} tag={rv.tag} {typ} of {ev.get('reply')}")
                elif typ == "delta":
                    c = ev.get("content") or ""
                    rv.text.append(c)
                    rv.chars += len(c)
            elif typ == "error":
                code = ev.get("code")
                if ev.get("reply") is None:
                    if rv.rid is None:
                        return "refused:" + str(code)
                    if rv.probe is not None and not rv.busy_answered:  # our own busy probe
                        self.s.refusal(code, self.who, {"busy"})
                        rv.busy_answered = True
                    else:
                        self.t.violate("unexpected_refusal_mid_reply", f"{self.who} tag={rv.tag} code={code} "
                                                                      f"[{' '.join(self.trail)}]")
                elif ev.get("reply") != rv.rid:
                    self.t.violate("event_of_other_reply", f"{self.who} tag={rv.tag} error of {ev.get('reply')}")
                else:
                    rv.errors.append(code)
                    self.s.reply_error(code, self.who, rv.tag)
            elif typ == "done":
                if ev.get("reply") == rv.rid:
                    rv.done += 1
                    rv.finish = ev.get("finish_reason")
                    rv.done_seq = ev.get("seq")
                    self.ended.append(rv.rid)
                    if rv.t_stop is not None:
                        self.t.stop_to_done.append(now() - rv.t_stop)
                    return "done"
                if ev.get("reply") in self.ended:
                    self.t.violate("duplicate_done", f"{self.who} reply {ev.get('reply')}")
                else:
                    self.t.violate("event_of_other_reply", f"{self.who} tag={rv.tag} done of {ev.get('reply')}")
            elif typ == "pong":
                pass
            elif typ == "session":
                self.t.violate("session_frame_mid_reply", f"{self.who} tag={rv.tag}")
            else:
                self.t.violate("unknown_event_type", f"{self.who} {typ!r}")

    async def start_chat(self, rv: ReplyView, frame: dict | None = None) -> None:
        await self.send(frame or {"type": "chat", "message": self.s.msg(rv.tag, rv.n)})

    async def finish(self, rv: ReplyView, expect: set[str] | None = None) -> None:
        self.s.check_done(rv, self.who, expect, " ".join(self.trail))
        self.has_turn = True
        self.last_rv = rv
        if self.rng.random() < self.s.a.history_check:
            await self.s.check_history(self.http, self.sid, rv, self.who)

    async def alive(self) -> None:
        """The socket still answers: ping -> pong."""
        await self.send({"type": "ping"})
        while True:
            ev = await self.recv(10)
            if ev.get("type") == "pong":
                return
            self.t.violate("unexpected_event_when_idle", f"{self.who} {ev.get('type')}")

    async def action(self, kind: str) -> None:
        t, s, rng = self.t, self.s, self.rng
        self.k += 1
        tag = f"w{self.cid}x{self.k}"
        if self.ws is None:
            await self.connect()
        if kind in ("chat", "stop", "disconnect", "busy", "regenerate"):
            n = s.pick_n(rng, kind)
            rv = ReplyView(tag, n)
            if kind == "regenerate":
                if not self.has_turn:
                    await self.send({"type": "regenerate"})
                    ev = await self.recv(10)
                    if ev.get("type") == "error":
                        s.refusal(ev.get("code"), self.who, {"bad_request"})
                        t.actions["regenerate_refused"] += 1
                    else:
                        t.violate("regenerate_without_turn_accepted", f"{self.who} got {ev.get('type')}")
                        await self.drop(True)
                    return
                # the upstream reads n from the last user message: the previous turn's
                rv.tag, rv.n = self.last_msg
                self.last_rv = None
                await self.start_chat(rv, {"type": "regenerate"})
            else:
                self.last_rv = None
                self.last_msg = (tag, n)
                await self.start_chat(rv)
            stop_after = rng.randint(0, max(0, n - 1)) if kind == "stop" else None
            drop_after = rng.randint(0, max(0, min(n - 1, s.a.max_tokens))) if kind == "disconnect" else None
            if kind == "busy":
                # a second chat while the first streams: refused with busy, the first goes on
                res = await self.read_reply(rv, drop_after=1 if n > 2 else 0)
                if res == "drop":
                    rv.probe = ReplyView(tag + "b", 3)
                    await self.send({"type": "chat", "message": s.msg(tag + "b", 3)})
                    res = await self.read_reply(rv)
                    # (the busy error is counted inside read_reply)
                    if res == "done" and not rv.busy_answered:
                        # No busy error before our done: the reply ended (often an upstream fault right
                        # after the first token) before NexLM read the second chat, which it then accepted.
                        # Its start must come after our done (the connection's seq order proves it).
                        rv2 = ReplyView(tag + "b", 3)
                        res2 = await self.read_reply(rv2, idle=15)
                        if res2 == "done":
                            t.actions["busy_probe_raced_the_end"] += 1
                            s.check_done(rv, self.who, ctx=" ".join(self.trail))
                            await self.finish(rv2)
                            self.last_msg = (rv2.tag, rv2.n)
                            return
                        if res2 == "refused:busy":
                            s.refusal("busy", self.who, {"busy"})
                        else:
                            t.violate("busy_probe_unanswered", f"{self.who} tag={tag} {res2}")
            else:
                res = await self.read_reply(rv, stop_after=stop_after, drop_after=drop_after)
            if res.startswith("refused"):
                t.violate("chat_refused", f"{self.who} tag={tag} {res}")
                return
            if res == "drop":
                await self.disconnect_and_resume(rv)
                return
            await self.finish(rv, {"stopped", "stop", "error"} if kind == "stop" else None)
            return
        if kind == "reset":
            await self.send({"type": "reset"})
            ev = await self.recv(10)
            if ev.get("type") != "session" or ev.get("history"):
                t.violate("reset_not_answered_with_empty_session", f"{self.who} {ev.get('type')}")
            self.has_turn = False
            self.last_rv = None
            self.last_msg = None
            return
        if kind == "set":
            await self.send({"type": "set", "params": {"temperature": round(rng.uniform(0, 2), 2)}})
            ev = await self.recv(10)
            if ev.get("type") != "session":
                t.violate("set_not_answered_with_session", f"{self.who} {ev.get('type')}")
            return
        if kind == "bad_frame":
            if rng.random() < 0.01:
                # an oversized frame (over max_frame_bytes = 1 MiB): close 1009, then come back
                await self.ws.send_str('{"type":"chat","message":"' + "x" * (1 << 20) + '"}')
                await self.expect_close({1009}, "oversized")
                return
            frame, code = rng.choice(WS_BAD_FRAMES)
            await self.send(frame)
            ev = await self.recv(10)
            if ev.get("type") != "error":
                t.violate("bad_frame_not_refused", f"{self.who} {frame[:60]} -> {ev.get('type')}")
                await self.drop(True)
                return
            s.refusal(ev.get("code"), self.who, {code})
            await self.alive()
            return
        if kind == "binary_frame":
            await self.ws.send_bytes(b"\x00\x01binary")
            await self.expect_close({1003}, "binary")
            return
        if kind == "new_session":
            old = self.sid
            await self.drop(False)
            await self.delete(old)
            self.sid = None
            self.has_turn = False
            self.last_rv = None
            self.last_msg = None
            await self.connect(new=True)
            return
        if kind == "idle":
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            await self.alive()
            return
        raise ValueError(kind)

    async def afresh(self, abort: bool) -> None:
        """After a broken action: drop the connection and continue in a new session, so that
        one failure is counted once (the old session is DELETEd at the end)."""
        await self.drop(abort)
        if self.sid:
            self.to_delete.append((self.sid, now() + GRACE + 2))
        self.sid = None
        self.has_turn = False
        self.last_rv = None
        self.last_msg = None

    async def expect_close(self, codes: set[int], what: str) -> None:
        try:
            while True:
                await self.recv(10)
        except Closed as exc:
            self.t.ws_close_codes[exc.code] += 1
            if exc.code not in codes:
                self.t.violate("wrong_close_code", f"{self.who} {what}: {exc.code}, want {sorted(codes)}")
        await self.drop(False)
        await self.connect()  # same session, still there
        await self.alive()

    async def delete(self, sid: str | None) -> None:
        await self.s.delete(self.http, sid, self.who)

    async def disconnect_and_resume(self, rv: ReplyView) -> None:
        t, rng = self.t, self.rng
        abort = rng.random() < 0.6
        last = self.seq
        mode, pause = self.s.absence(rng)
        t.resume[f"ws_{mode}_{'abort' if abort else 'close'}"] += 1
        rv.t_drop = now()
        await self.drop(abort)
        if mode == "abandon":
            t.abandon_marks.append((rv.tag, rv.t_drop))
            self.to_delete.append((self.sid, now() + GRACE + 2))
            self.sid = None  # the reply runs out its grace on the server; we start afresh
            self.has_turn = False
            self.last_rv = None
            self.last_msg = None
            return
        await asyncio.sleep(pause)
        rv.resumed = True
        frame = await self.connect(after=last)
        running = frame.get("running")
        if running is None and (frame.get("seq") or 0) <= last:
            t.violate("resume_nothing_after_drop", f"{self.who} tag={rv.tag} after={last} frame seq={frame.get('seq')}")
        if running is not None and running.get("reply") != rv.rid:
            t.violate("resume_other_reply_running", f"{self.who} tag={rv.tag} {running}")
        try:
            res = await self.read_reply(rv, idle=30.0 if running else 3.0)
        except TimeoutError:
            if mode == "long" and running is None:
                # the reply ended long enough ago that its replay log may be gone: check the history
                t.resume["ws_from_history"] += 1
                await self.history_after_absence(rv)
                return
            t.violate("resume_missing_events", f"{self.who} tag={rv.tag} after={last} mode={mode} "
                                               f"frame seq={frame.get('seq')} running={running}")
            await self.drop(True)
            return
        if res != "done":
            t.violate("resume_odd", f"{self.who} {res}")
            return
        t.resume[f"ws_resumed_{mode}"] += 1
        expect = {"interrupted", "stop", "error"} if mode == "long" else {"stop", "error"}
        await self.finish(rv, expect)

    async def history_after_absence(self, rv: ReplyView) -> None:
        async with self.http.get(f"{self.s.url}/api/sessions/{self.sid}") as r:
            h = (await r.json()).get("history") or []
        last = h[-1] if h and h[-1].get("role") == "assistant" else None
        mine = "".join(rv.text)
        if last is None or not str(last.get("content", "")).startswith(mine) or not cycle_ok(last.get("content", "")):
            self.t.violate("history_after_absence_wrong", f"{self.who} tag={rv.tag} stored={last and last.get('content', '')[:40]!r}")
        self.has_turn = True
        self.last_rv = None

    async def run(self) -> None:
        kinds = list(WS_ACTIONS)
        weights = [WS_ACTIONS[k] for k in kinds]
        self.http = self.s.user_http(self.cid)
        try:
            await asyncio.sleep(self.rng.uniform(0, self.s.a.ramp))
            while now() < self.s.deadline and (not self.s.a.max_actions or self.k < self.s.a.max_actions):
                kind = self.rng.choices(kinds, weights)[0]
                self.t.actions[f"ws_{kind}"] += 1
                self.trail.append(f"{kind}#{self.k + 1}")
                try:
                    async with asyncio.timeout(90):
                        await self.s.delete_due(self.http, self.to_delete, self.who)
                        await self.action(kind)
                except Closed as exc:
                    self.t.ws_close_codes[exc.code] += 1
                    self.t.violate("ws_closed_by_server", f"{self.who} during {kind}: {exc}")
                    await self.afresh(False)
                except TimeoutError:
                    self.t.violate("timeout", f"{self.who} during {kind} (sid {str(self.sid)[:8]})")
                    await self.afresh(True)
                except (aiohttp.ClientError, OSError) as exc:
                    self.t.violate("client_connection_error", f"{self.who} during {kind}: {type(exc).__name__}: {exc}")
                    await self.afresh(True)
                await asyncio.sleep(self.rng.uniform(0, self.s.a.think))
            if self.sid and self.ws is not None:
                await self.s.check_history(self.http, self.sid, self.last_rv, self.who, final=True)
        except asyncio.CancelledError:
            self.t.harness_errors["ws client cancelled at the hard deadline"] += 1
            raise
        except Exception as exc:  # noqa: BLE001
            self.t.harness_errors[f"ws {type(exc).__name__}: {exc}"[:120]] += 1
        finally:
            await self.drop(False)
            await self.http.close()


# ---------------------------------------------------------------- SSE client

SSE_ACTIONS = {"chat": 38, "stop": 15, "disconnect": 18, "regenerate": 8, "busy": 5, "bad_request": 8,
               "new_session": 5, "idle": 3}


class SSEStream:
    """Events of one /sse response: (event, data dict, id)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float):
        event, data, eid = "message", [], None
        async with asyncio.timeout(timeout):
            while True:
                line = await self.resp.content.readline()
                if not line:
                    return None  # EOF
                line = line.rstrip(b"\r\n")
                if not line:
                    if data:
                        return event, json.loads(b"\n".join(data)), eid
                    event = "message"
                    continue
                if line.startswith(b":"):
                    continue
                field, _, value = line.partition(b":")
                if value.startswith(b" "):
                    value = value[1:]
                if field == b"event":
                    event = value.decode()
                elif field == b"data":
                    data.append(value)
                elif field == b"id":
                    eid = value.decode()


class SSEClient:
    def __init__(self, soak: Soak, cid: int) -> None:
        self.s = soak
        self.t = soak.t
        self.cid = cid
        self.who = f"sse#{cid}"
        self.rng = random.Random(soak.seed * 100019 + cid + 7)
        self.http: aiohttp.ClientSession | None = None
        self.sid: str | None = None
        self.has_turn = False
        self.last_rv: ReplyView | None = None
        self.last_msg: tuple[str, int] | None = None
        self.k = 0
        self.seq = 0
        self.trail: collections.deque = collections.deque(maxlen=5)
        self.to_delete: list[tuple[str, float]] = []

    async def post(self, body, **kw) -> aiohttp.ClientResponse:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return await self.http.post(self.s.url + "/sse", data=data,
                                    headers={"Content-Type": "application/json", "Accept": "text/event-stream"}, **kw)

    async def refused(self, resp: aiohttp.ClientResponse, expected: set[str], what: str) -> None:
        """A refusal must be a 4xx with a JSON error body."""
        self.t.http_status[f"{what} {resp.status}"] += 1
        try:
            body = await resp.json(content_type=None)
        except Exception:  # noqa: BLE001
            body = None
        finally:
            resp.release()
        if not (400 <= resp.status < 500) or not isinstance(body, dict) or body.get("type") != "error":
            self.t.violate("refusal_not_clean", f"{self.who} {what}: HTTP {resp.status} {str(body)[:100]}")
            return
        self.s.refusal(body.get("code"), self.who, expected)

    async def read_reply(self, st: SSEStream, rv: ReplyView, stop_after=None, drop_after=None,
                         busy_probe: bool = False, first: bool = True, idle: float = 30.0) -> str:
        """Events until this reply's done ("done"; then the stream must end) or drop_after tokens ("drop")."""
        if first:
            ev = await st.next(15)
            if ev is None or ev[0] != "session":
                self.t.violate("sse_first_event_not_session", f"{self.who} tag={rv.tag} got {ev and ev[0]}")
                return "broken"
            self.sid = ev[1].get("session")
            self.s.seen(self.sid, self.cid)
        while True:
            if drop_after is not None and rv.rid is not None and rv.tokens >= drop_after:
                rv.t_drop = now()  # the caller closes the response right away
                return "drop"
            if stop_after is not None and rv.rid is not None and rv.tokens >= stop_after and rv.t_stop is None:
                rv.t_stop = now()
                self.t.stop_marks.append((rv.tag, rv.t_stop))
                async with asyncio.timeout(15):
                    async with self.http.post(f"{self.s.url}/api/sessions/{self.sid}/stop") as r:
                        self.t.http_status[f"stop {r.status}"] += 1
                        if r.status != 200:
                            self.t.violate("stop_failed", f"{self.who} tag={rv.tag} HTTP {r.status}")
            if busy_probe and rv.rid is not None and rv.tokens >= 1:
                busy_probe = False
                r = await self.post({"message": self.s.msg(rv.tag + "b", 3), "session": self.sid})
                if r.status == 200:
                    # accepted: legitimate only if our reply had ended already (compared by seq below)
                    rv.probe = ReplyView(rv.tag + "b", 3)
                    try:
                        rv.probe_seq = await self.read_probe(SSEStream(r), rv.probe)
                    finally:
                        r.close()
                else:
                    await self.refused(r, {"busy"}, "busy")
            ev = await st.next(idle)
            if ev is None:
                self.t.violate("sse_ended_without_done", f"{self.who} tag={rv.tag} reply={rv.rid} tokens={rv.tokens}")
                return "broken"
            typ, data, eid = ev
            seq = data.get("seq")
            if seq is not None:
                if seq <= self.seq:
                    self.t.violate("seq_not_rising", f"{self.who} {typ} seq {seq} after {self.seq}")
                self.seq = max(self.seq, seq)
                if eid is not None and eid != str(seq):
                    self.t.violate("sse_id_not_seq", f"{self.who} id={eid} seq={seq}")
            if typ == "start":
                if rv.rid is None:
                    rv.rid = data.get("reply")
                    self.t.replies_started += 1
                else:
                    self.t.violate("second_start", f"{self.who} tag={rv.tag}")
            elif typ == "delta":
                if data.get("reply") != rv.rid:
                    self.t.violate("event_of_other_reply", f"{self.who} tag={rv.tag} delta of {data.get('reply')}")
                else:
                    c = data.get("content") or ""
                    rv.text.append(c)
                    rv.chars += len(c)
            elif typ == "reasoning":
                pass
            elif typ == "error":
                if data.get("reply") != rv.rid:
                    self.t.violate("event_of_other_reply", f"{self.who} tag={rv.tag} error {data}")
                else:
                    rv.errors.append(data.get("code"))
                    self.s.reply_error(data.get("code"), self.who, rv.tag)
            elif typ == "done":
                if data.get("reply") != rv.rid:
                    self.t.violate("event_of_other_reply", f"{self.who} tag={rv.tag} done of {data.get('reply')}")
                    continue
                rv.done += 1
                rv.finish = data.get("finish_reason")
                rv.done_seq = seq
                if rv.t_stop is not None:
                    self.t.stop_to_done.append(now() - rv.t_stop)
                after = await st.next(10)
                if after is not None:
                    rv.done += after[0] == "done"
                    self.t.violate("sse_events_after_done", f"{self.who} tag={rv.tag} then {after[0]}")
                return "done"
            else:
                self.t.violate("unknown_event_type", f"{self.who} {typ!r}")

    async def read_probe(self, st: SSEStream, rv: ReplyView):
        """Read an accepted busy probe to its done; return the seq of its start."""
        start_seq = None
        while True:
            ev = await st.next(30)
            if ev is None:
                self.t.violate("sse_ended_without_done", f"{self.who} probe tag={rv.tag}")
                return start_seq
            typ, data, _ = ev
            if typ == "start" and rv.rid is None:
                rv.rid = data.get("reply")
                start_seq = data.get("seq")
                self.t.replies_started += 1
            elif typ == "delta" and data.get("reply") == rv.rid:
                rv.text.append(data.get("content") or "")
                rv.chars += len(data.get("content") or "")
            elif typ == "error" and data.get("reply") == rv.rid:
                rv.errors.append(data.get("code"))
                self.s.reply_error(data.get("code"), self.who, rv.tag)
            elif typ == "done" and data.get("reply") == rv.rid:
                rv.done += 1
                rv.finish = data.get("finish_reason")
                return start_seq

    async def action(self, kind: str) -> None:
        t, s, rng = self.t, self.s, self.rng
        self.k += 1
        tag = f"s{self.cid}x{self.k}"
        if kind in ("chat", "stop", "disconnect", "busy", "regenerate"):
            n = s.pick_n(rng, kind)
            rv = ReplyView(tag, n)
            if kind == "regenerate":
                if not self.has_turn or not self.sid:
                    body = {"type": "regenerate", "session": self.sid or "no-such-session"}
                    r = await self.post(body)
                    if r.status == 200:
                        t.violate("regenerate_without_turn_accepted", f"{self.who}")
                        r.close()
                    else:
                        await self.refused(r, {"bad_request", "not_found"}, "regenerate")
                        t.actions["regenerate_refused"] += 1
                    return
                rv.tag, rv.n = self.last_msg
                body = {"type": "regenerate", "session": self.sid}
            else:
                self.last_msg = (tag, n)
                body = {"message": s.msg(tag, n)}
                if self.sid:
                    body["session"] = self.sid
            self.last_rv = None
            self.seq = 0
            resp = await self.post(body)
            if resp.status != 200:
                t.violate("chat_refused", f"{self.who} tag={tag} HTTP {resp.status}")
                await self.refused(resp, REFUSAL_CODES, "chat")
                return
            st = SSEStream(resp)
            try:
                stop_after = rng.randint(0, max(0, n - 1)) if kind == "stop" else None
                drop_after = rng.randint(0, max(0, min(n - 1, s.a.max_tokens))) if kind == "disconnect" else None
                res = await self.read_reply(st, rv, stop_after=stop_after, drop_after=drop_after,
                                            busy_probe=kind == "busy")
            finally:
                resp.close()  # after done: nothing left; on "drop": the abrupt close we wanted
            if res == "drop":
                await self.disconnect_and_resume(rv)
                return
            if res != "done":
                return
            if rv.probe is not None:
                if rv.probe_seq is not None and rv.done_seq is not None and rv.probe_seq > rv.done_seq:
                    t.actions["busy_probe_raced_the_end"] += 1
                    s.check_done(rv, self.who, ctx=" ".join(self.trail))
                    await self.finish(rv.probe)
                    self.last_msg = (rv.probe.tag, rv.probe.n)
                else:
                    t.violate("two_replies_in_one_session", f"{self.who} tag={tag} first done seq {rv.done_seq}, "
                                                            f"second start seq {rv.probe_seq}")
                return
            await self.finish(rv, {"stopped", "stop", "error"} if kind == "stop" else None)
            return
        if kind == "bad_request":
            which = rng.randrange(7)
            if which == 0:
                await self.refused(await self.post(b"{not json"), {"bad_request"}, "bad_json")
            elif which == 1:
                await self.refused(await self.post({"message": ""}), {"bad_request"}, "empty")
            elif which == 2:
                t.sessionless_refusals += 1
                await self.refused(await self.post({"message": 123}), {"bad_request"}, "wrong_type")
            elif which == 3:
                t.sessionless_refusals += 1
                await self.refused(await self.post({"message": "x", "params": {"temperature": 5}}),
                                   {"bad_request"}, "bad_param")
            elif which == 4:
                await self.refused(await self.post({"type": "regenerate", "session": "no-such-session-xyz"}),
                                   {"not_found"}, "bad_session")
            elif which == 5:
                t.sessionless_refusals += 1
                await self.refused(await self.post({"message": "x", "model": "nope/none"}), {"unknown_model"},
                                   "unknown_model")
            else:
                r = await self.http.get(self.s.url + "/sse", params={"session": self.sid or "x"},
                                        headers={"Last-Event-ID": "abc", "Accept": "text/event-stream"})
                await self.refused(r, {"bad_request"}, "bad_last_event_id")
            return
        if kind == "new_session":
            await s.delete(self.http, self.sid, self.who)
            self.sid = None
            self.has_turn = False
            self.last_rv = None
            self.last_msg = None
            return
        if kind == "idle":
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            async with self.http.get(self.s.url + "/healthz") as r:
                if r.status != 200:
                    t.violate("healthz_not_ok", f"{self.who} {r.status}")
            return
        raise ValueError(kind)

    async def finish(self, rv: ReplyView, expect=None) -> None:
        self.s.check_done(rv, self.who, expect, " ".join(self.trail))
        self.has_turn = True
        self.last_rv = rv
        if self.rng.random() < self.s.a.history_check:
            await self.s.check_history(self.http, self.sid, rv, self.who)

    async def disconnect_and_resume(self, rv: ReplyView) -> None:
        t, rng = self.t, self.rng
        last = self.seq
        mode, pause = self.s.absence(rng)
        t.resume[f"sse_{mode}"] += 1
        if mode == "abandon":
            t.abandon_marks.append((rv.tag, rv.t_drop))
            self.to_delete.append((self.sid, now() + GRACE + 2))
            self.sid = None
            self.has_turn = False
            self.last_rv = None
            self.last_msg = None
            return
        await asyncio.sleep(pause)
        rv.resumed = True
        resp = await self.http.get(self.s.url + "/sse", params={"session": self.sid},
                                   headers={"Last-Event-ID": str(last), "Accept": "text/event-stream"})
        try:
            if resp.status == 204:
                if mode == "long":
                    t.resume["sse_from_history"] += 1
                    await self.history_after_absence(rv)
                    return
                t.violate("resume_204", f"{self.who} tag={rv.tag} after={last} mode={mode}")
                return
            if resp.status != 200:
                t.violate("resume_refused", f"{self.who} tag={rv.tag} HTTP {resp.status}")
                return
            st = SSEStream(resp)
            ev = await st.next(15)
            if ev is None or ev[0] != "session":
                t.violate("sse_first_event_not_session", f"{self.who} resume tag={rv.tag}")
                return
            if ev[2] != str(last):
                t.violate("sse_resume_session_id", f"{self.who} id={ev[2]} after={last}")
            self.seq = last
            res = await self.read_reply(st, rv, first=False)
        finally:
            resp.close()
        if res != "done":
            return
        t.resume[f"sse_resumed_{mode}"] += 1
        expect = {"interrupted", "stop", "error"} if mode == "long" else {"stop", "error"}
        await self.finish(rv, expect)

    def afresh(self) -> None:
        """After a broken action: continue in a new session (the old one is DELETEd later)."""
        if self.sid:
            self.to_delete.append((self.sid, now() + GRACE + 2))
        self.sid, self.has_turn, self.last_rv, self.last_msg = None, False, None, None

    async def history_after_absence(self, rv: ReplyView) -> None:
        async with self.http.get(f"{self.s.url}/api/sessions/{self.sid}") as r:
            h = (await r.json()).get("history") or []
        last = h[-1] if h and h[-1].get("role") == "assistant" else None
        mine = "".join(rv.text)
        if last is None or not str(last.get("content", "")).startswith(mine) or not cycle_ok(last.get("content", "")):
            self.t.violate("history_after_absence_wrong", f"{self.who} tag={rv.tag}")
        self.has_turn = True
        self.last_rv = None

    async def run(self) -> None:
        kinds = list(SSE_ACTIONS)
        weights = [SSE_ACTIONS[k] for k in kinds]
        self.http = self.s.user_http(self.cid)
        try:
            await asyncio.sleep(self.rng.uniform(0, self.s.a.ramp))
            while now() < self.s.deadline and (not self.s.a.max_actions or self.k < self.s.a.max_actions):
                kind = self.rng.choices(kinds, weights)[0]
                self.t.actions[f"sse_{kind}"] += 1
                self.trail.append(f"{kind}#{self.k + 1}")
                try:
                    async with asyncio.timeout(90):
                        await self.s.delete_due(self.http, self.to_delete, self.who)
                        await self.action(kind)
                except TimeoutError:
                    self.t.violate("timeout", f"{self.who} during {kind} (sid {str(self.sid)[:8]})")
                    self.afresh()
                except (aiohttp.ClientError, OSError) as exc:
                    self.t.violate("client_connection_error", f"{self.who} during {kind}: {type(exc).__name__}: {exc}")
                    self.afresh()
                await asyncio.sleep(self.rng.uniform(0, self.s.a.think))
            if self.sid:
                await self.s.check_history(self.http, self.sid, self.last_rv, self.who, final=True)
        except asyncio.CancelledError:
            self.t.harness_errors["sse client cancelled at the hard deadline"] += 1
            raise
        except Exception as exc:  # noqa: BLE001
            self.t.harness_errors[f"sse {type(exc).__name__}: {exc}"[:120]] += 1
        finally:
            await self.http.close()


# =============================================================== the orchestrator

METRIC_KEYS = ["rss_mb", "hwm_mb", "threads", "fds", "sockets", "tasks", "sessions", "websockets",
               "replies_running", "up_open_connections", "up_active_streams"]


# =============================================================== --hostile: clients that attack NexLM's limits

HOSTILE_QUEUE = 65536  # [limits] max_queued_bytes in --hostile runs: small, so the laggers reach it
HOSTILE_TOKENS = 16
MONITOR_TOKEN = "soak-monitor"


def user_addr(cid: int) -> str:
    """A normal user's own source address (the whole of 127.0.0.0/8 is loopback on Linux)."""
    return f"127.1.{cid // 250}.{cid % 250 + 1}"


def user_token(cid: int) -> str:
    return f"soak-user-{cid:04d}"


def hostile_token(i: int) -> str:
    return f"soak-hostile-{i:02d}"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def hostile_config(text: str, a) -> str:
    """The soak's config with NexLM's own limits back at their defaults (they are what is under test),
    a small outbox bound, and access tokens: one per normal user, one per hostile client."""
    text = text.replace("max_connections_per_address = 0\n", "header_timeout_seconds = 5\n")
    text = text.replace("sessions_per_minute = 0\n", "").replace("max_sessions_per_client = 1000000\n", "")
    text = text.replace("[limits]\n", f"[limits]\nmax_queued_bytes = {HOSTILE_QUEUE}\n")
    tokens = [user_token(i) for i in range(max(a.clients, a.warmup_clients))]
    tokens += [MONITOR_TOKEN] + [hostile_token(i) for i in range(HOSTILE_TOKENS)]
    return text + "[auth]\ntokens = [" + ", ".join(json.dumps(t) for t in tokens) + "]\n"


class Hostile:
    """The hostile clients of ``--hostile``, next to the normal ones until ``deadline``; every loop ends then.

    * laggers: a driver WebSocket chats in a loop (long replies) and sends bursts of ``set`` (each
      answered with a ``session`` frame, history and all, to every listener), while a raw socket with a
      4 KB receive buffer sits on the same session and never reads; when NexLM drops it (too far
      behind) it comes back with ``after=`` and again reads nothing;
    * session flooders: ``POST /api/sessions`` in a loop, each from its own address and token;
    * login guessers: wrong Bearer tokens on ``/api/models`` and wrong tokens posted to ``/login``;
    * silent sockets: 150 connections from one address that never send a byte.
    """

    LAGGERS, FLOODERS, GUESSERS, SILENT = 4, 6, 2, 150

    def __init__(self, runner: "Runner", deadline: float) -> None:
        self.url = runner.nex_url
        self.port = runner.nex_port
        self.deadline = deadline
        self.counts: collections.Counter = collections.Counter()
        self.sessions: dict[str, str] = {}  # made by hostile clients: id -> token, for the final DELETE

    def http(self, addr: str, token: str | None) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, local_addr=(addr, 0)),
                                     headers=bearer(token) if token else None,
                                     timeout=aiohttp.ClientTimeout(total=60))

    async def run(self) -> None:
        jobs = ([self.lagger(i) for i in range(self.LAGGERS)] + [self.flooder(i) for i in range(self.FLOODERS)]
                + [self.guesser(i) for i in range(self.GUESSERS)] + [self.silent()])
        for res in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(res, BaseException):
                self.counts[f"harness error: {type(res).__name__}: {str(res)[:80]}"] += 1

    async def raw_ws(self, addr: str, token: str, path: str):
        """A WebSocket on a plain socket with a 4 KB receive buffer, upgraded and then never read."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((addr, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      f"Authorization: Bearer {token}\r\n\r\n").encode())
        async with asyncio.timeout(15):
            head = await reader.readuntil(b"\r\n\r\n")
        self.counts[f"lagger upgrade {head.split(b' ', 2)[1].decode()}"] += 1
        return writer

    async def lagger(self, i: int) -> None:
        addr, token = f"127.2.0.{i + 1}", hostile_token(i)
        async with self.http(addr, token) as http:
            driver = await http.ws_connect(self.url + "/ws", max_msg_size=0)
            first = await driver.receive_json(timeout=15)
            sid, seq = first["session"], first.get("seq", 0)
            self.sessions[sid] = token
            lag = await self.raw_ws(addr, token, f"/ws?session={sid}")
            k = 0
            try:
                while now() < self.deadline:
                    k += 1
                    # 8 KB replies (the history, and so every session frame, grows by that much a turn),
                    # and sets that each carry a new 30 KB system prompt: every session frame queued
                    # for the lagger holds one of its own. Loopback's socket buffers take a few MB first.
                    await driver.send_json({"type": "chat", "message": f"n=2000 iv=0 tag=hl{i}k{k}"})
                    for j in range(30):
                        system = f"{k}.{j} " + "s" * 30000
                        await driver.send_json({"type": "set", "params": {"system": system}})
                    self.counts["set sent"] += 30
                    async with asyncio.timeout(60):
                        while True:
                            msg = await driver.receive()
                            if msg.type != WSMsgType.TEXT:
                                self.counts[f"driver closed by NexLM: {driver.close_code}"] += 1
                                return
                            ev = json.loads(msg.data)
                            seq = max(seq, ev.get("seq") or 0)
                            if ev["type"] == "session":
                                self.counts["session frames to the driver"] += 1
                            elif ev["type"] == "error" and "reply" not in ev:
                                self.counts[f"driver refused: {ev['code']}"] += 1
                                if ev["code"] != "busy":
                                    break
                            elif ev["type"] == "done":
                                self.counts[f"driver reply done: {ev['finish_reason']}"] += 1
                                break
                    try:  # a ping (masked, empty): writing is how a socket that never reads learns of a reset
                        lag.write(b"\x89\x80\x00\x00\x00\x00")
                        await asyncio.sleep(0)
                    except OSError:
                        pass
                    if lag.is_closing() or lag.transport.is_closing():
                        self.counts["lagger dropped by NexLM (too far behind)"] += 1
                        lag.close()
                        lag = await self.raw_ws(addr, token, f"/ws?session={sid}&after={seq}")
                        self.counts["lagger came back with after="] += 1
            finally:
                lag.close()
                await driver.close()

    async def flooder(self, i: int) -> None:
        addr, token = f"127.2.1.{i + 1}", hostile_token(self.LAGGERS + i)
        async with self.http(addr, token) as http:
            while now() < self.deadline:
                async with http.post(self.url + "/api/sessions", json={}) as r:
                    self.counts[f"POST /api/sessions {r.status}"] += 1
                    if r.status == 201:
                        self.sessions[(await r.json())["session"]] = token
                    elif r.status == 429 and "Retry-After" not in r.headers:
                        self.counts["429 without Retry-After"] += 1
                await asyncio.sleep(0.02)

    async def guesser(self, i: int) -> None:
        async with self.http(f"127.2.2.{i + 1}", None) as http:
            k = 0
            while now() < self.deadline:
                k += 1
                async with http.get(self.url + "/api/models", headers=bearer(f"guess-{i}-{k}")) as r:
                    self.counts[f"wrong Bearer: {r.status}"] += 1
                async with http.post(self.url + "/login", data={"token": f"guess-{i}-{k}"},
                                     allow_redirects=False) as r:
                    self.counts[f"POST /login wrong token: {r.status}"] += 1
                await asyncio.sleep(0.02)

    async def silent(self) -> None:
        """Keep up to SILENT silent connections open from one address; see which NexLM refuses or drops."""
        loop = asyncio.get_running_loop()
        socks: list[socket.socket] = []
        try:
            while now() < self.deadline:
                while len(socks) < self.SILENT:
                    sock = socket.socket()
                    sock.bind(("127.2.3.1", 0))
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, ("127.0.0.1", self.port))
                    except OSError as exc:
                        self.counts[f"silent connect failed: {exc.__class__.__name__}"] += 1
                        sock.close()
                        break
                    socks.append(sock)
                    self.counts["silent connections opened"] += 1
                await asyncio.sleep(1.0)
                alive = []
                for sock in socks:
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        alive.append(sock)
                        continue
                    except OSError:
                        data = b""
                    self.counts["silent: refused at once (503, cap per address)" if data.startswith(b"HTTP/1.1 503")
                                else "silent: closed by NexLM (header timeout)"] += 1
                    sock.close()
                socks = alive
                self.counts["silent: most held open at once"] = max(self.counts["silent: most held open at once"],
                                                                   len(socks))
        finally:
            for sock in socks:
                sock.close()

    def report(self) -> dict:
        return dict(sorted(self.counts.items()))


class Runner:
    def __init__(self, a) -> None:
        self.a = a
        self.tmp = Path(tempfile.mkdtemp(prefix="nexlm-soak-"))
        self.procs: list[Proc] = []
        self.samples: list[dict] = []
        self.notes: list[str] = []
        self.res: dict = {}
        self.mon_http: aiohttp.ClientSession | None = None

    def log(self, msg: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # ---- processes
    def start(self) -> None:
        py = sys.executable
        self.up = Proc("upstream", [py, str(Path(__file__).resolve()), "upstream", "--port", "0",
                                    "--error-rate", str(self.a.error_rate), "--seed", str(self.a.seed),
                                    *([] if self.a.no_uvloop else ["--uvloop"])],
                       self.tmp / "upstream.log", pipe_stdout=True)
        self.procs.append(self.up)
        line = self.up.readline(20)
        assert line.startswith("READY"), line
        self.up_url = f"http://127.0.0.1:{int(line.split()[1])}"
        self.nex_port = free_port()
        cfg = self.tmp / "soak.toml"
        cfg.write_text(self.config_text())
        app = Path(self.a.app).resolve()
        argv = [py, str(app), "--config", str(cfg), "--port", str(self.nex_port)]
        self.heap_probe = None
        if not self.a.plain:
            self.heap_probe = self.tmp / "heap.jsonl"
            os.environ["SOAK_HEAP_PROBE"] = str(self.heap_probe)
            argv = [py, str(Path(__file__).resolve()), "launch", *argv[1:]]
        self.nex = Proc("nexlm", argv, self.tmp / "nexlm.log", cwd=app.parent)
        self.procs.append(self.nex)
        self.nex_url = f"http://127.0.0.1:{self.nex_port}"

    def config_text(self) -> str:
        if self.a.hostile:
            return hostile_config(self.config_plain(), self.a)
        return self.config_plain()

    def config_plain(self) -> str:
        return f"""[server]
shutdown_grace_seconds = 2
max_connections_per_address = 0
[chat]
default_model = "soak/fake-model"
resume_grace_seconds = {GRACE:g}
max_sessions = 100000
session_ttl_seconds = 3600
{LIFTED_LIMITS}[providers.soak]
kind = "openai"
base_url = "{self.up_url}/v1"
models = ["fake-model"]
connect_timeout = 5
first_token_timeout = 3
idle_timeout = 2
max_retries = 2
retry_max_seconds = 6
"""

    async def wait_nexlm(self) -> None:
        deadline = now() + 30
        while True:
            if not self.nex.alive():
                raise RuntimeError(f"NexLM exited at start:\n{self.nex.log_path.read_text()[-3000:]}")
            try:
                async with self.mon_http.get(self.nex_url + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if now() > deadline:
                raise RuntimeError("NexLM did not answer /healthz within 30 s")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                rc = p.stop(signal.SIGINT if p.name == "nexlm" else signal.SIGTERM, wait=15.0)
                self.res[f"{p.name}_exit"] = rc
            except Exception as exc:  # noqa: BLE001
                self.notes.append(f"stopping {p.name}: {exc}")

    # ---- sampling
    async def sample(self) -> dict:
        pid = self.nex.pid
        st = proc_status(pid)
        fds = proc_fds(pid)
        s = {"t": now(), "rss_mb": st.get("VmRSS", 0) / 1024, "hwm_mb": st.get("VmHWM", 0) / 1024,
             "threads": st.get("Threads", 0), "fds": fds.get("total", -1), "sockets": fds.get("socket", 0),
             "cpu_nexlm": cpu_seconds(pid), "cpu_upstream": cpu_seconds(self.up.pid),
             "cpu_harness": cpu_seconds(os.getpid()), "busy": system_busy(), "load1": os.getloadavg()[0]}
        try:
            async with asyncio.timeout(10):
                async with self.mon_http.get(self.nex_url + "/api/metrics") as r:
                    m = await r.json()
            s.update({k: m.get(k) for k in ("sessions", "replies_running", "websockets", "tasks")})
            s["loop_lag_ms"] = m.get("loop_lag_ms")
        except Exception as exc:  # noqa: BLE001
            s["metrics_error"] = f"{type(exc).__name__}: {exc}"
        try:
            async with asyncio.timeout(10):
                async with self.up_http.get(self.up_url + "/stats") as r:
                    u = await r.json()
            s["up_open_connections"] = u["open_connections"]
            s["up_active_streams"] = u["active_streams"]
            s["up"] = u
        except Exception as exc:  # noqa: BLE001
            s["upstream_error"] = f"{type(exc).__name__}: {exc}"
        return s

    async def monitor(self, stop: asyncio.Event, every: float) -> None:
        while not stop.is_set():
            self.samples.append(await self.sample())
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass

    async def settle(self, base: dict | None, timeout: float) -> tuple[dict, float]:
        """Wait until nothing runs, the upstream holds no connection (NexLM's pool keeps idle
        ones for 15 s), and -- if a baseline is given -- tasks/fds/sessions/websockets are back."""
        t0 = now()
        while True:
            s = await self.sample()
            quiet = (s.get("replies_running") == 0 and s.get("up_active_streams") == 0
                     and s.get("up_open_connections") == 0 and s.get("websockets") == 0)
            if base is None:
                quiet = quiet and s.get("sessions") == 0
            if base is not None:
                quiet = quiet and all(s.get(k) is not None and s[k] <= base[k]
                                      for k in ("tasks", "fds", "sockets"))
            if quiet or now() - t0 > timeout:
                await asyncio.sleep(1.0)
                s = await self.sample()  # one more, a second later, to read a steady state
                return s, now() - t0
            await asyncio.sleep(0.5)

    # ---- phases
    async def run_clients(self, n: int, seconds: float, tally: Tally, seed: int) -> Soak:
        soak = Soak(self.a, self.nex_url, tally, now() + seconds, seed)
        rng = random.Random(seed)
        clients = [(WSClient if rng.random() < self.a.ws_share else SSEClient)(soak, i) for i in range(n)]
        self.res.setdefault("clients", {})[seed] = {
            "ws": sum(isinstance(c, WSClient) for c in clients), "sse": sum(isinstance(c, SSEClient) for c in clients)}
        tasks = [asyncio.create_task(c.run()) for c in clients]
        _done, pending = await asyncio.wait(tasks, timeout=seconds + self.a.ramp + 120)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
            self.notes.append(f"{len(pending)} client loops were cancelled at the hard deadline")
        return soak

    async def delete_sessions(self, soak: Soak) -> dict:
        """DELETE every session the clients saw, on connections of their own (closed afterwards,
        so the monitor's single connection is all that is left)."""
        statuses: collections.Counter = collections.Counter()
        sem = asyncio.Semaphore(16)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16),
                                         timeout=aiohttp.ClientTimeout(total=30)) as http:
            async def one(sid):
                async with sem:
                    try:
                        owner = soak.owners.get(sid)
                        async with http.delete(f"{self.nex_url}/api/sessions/{sid}",
                                               headers=bearer(owner) if owner else None) as r:
                            statuses[str(r.status)] += 1
                    except Exception as exc:  # noqa: BLE001
                        statuses[type(exc).__name__] += 1

            await asyncio.gather(*(one(s) for s in list(soak.sessions)))
        return dict(statuses)

    async def progress(self, t: Tally, seconds: float) -> None:
        t0 = now()
        while True:
            await asyncio.sleep(30)
            s = self.samples[-1] if self.samples else {}
            self.log(f"{now() - t0:.0f}/{seconds:.0f} s: actions {sum(t.actions.values()):,}, replies "
                     f"{t.replies_done:,}, reply errors {sum(t.reply_errors.values()):,}, violations "
                     f"{sum(t.violations.values())} {dict(t.violations) if t.violations else ''}; RSS "
                     f"{s.get('rss_mb', 0):.1f} MB, fds {s.get('fds')}, tasks {s.get('tasks')}, sessions "
                     f"{s.get('sessions')}, ws {s.get('websockets')}, running {s.get('replies_running')}, "
                     f"load {os.getloadavg()[0]:.2f}")

    async def heap(self) -> dict | None:
        """Signal the launcher: full gc.collect(), then the Python heap's figures (after the
        plain figures were sampled, so the collection does not flatter them)."""
        if self.heap_probe is None:
            return None
        n = len(self.heap_probe.read_text().splitlines()) if self.heap_probe.exists() else 0
        os.kill(self.nex.pid, signal.SIGUSR2)
        deadline = now() + 15
        while now() < deadline:
            await asyncio.sleep(0.2)
            if self.heap_probe.exists():
                lines = self.heap_probe.read_text().splitlines()
                if len(lines) > n:
                    return json.loads(lines[-1])
        self.notes.append("the heap probe did not answer")
        return None

    async def upstream_records(self) -> list:
        async with self.up_http.get(self.up_url + "/records") as r:
            return (await r.json())["records"]

    async def main(self) -> int:
        a = self.a
        # one keep-alive connection to NexLM for the whole run (it shows in NexLM's fds and tasks the
        # same way at baseline and at the end); a fresh connection per upstream /stats, so that the
        # upstream's count minus the /stats request's own connection is NexLM's.
        self.mon_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                              headers=bearer(MONITOR_TOKEN) if a.hostile else None,
                                              timeout=aiohttp.ClientTimeout(total=30))
        self.up_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                             timeout=aiohttp.ClientTimeout(total=30))
        try:
            await self.wait_nexlm()
            self.res["loadavg_before"] = os.getloadavg()
            self.log(f"NexLM pid {self.nex.pid} on {self.nex_url}, upstream pid {self.up.pid} on {self.up_url}; "
                     f"load average {self.res['loadavg_before']}")
            # warm-up: the same mix, fewer clients
            warm = Tally()
            self.log(f"warm-up: {a.warmup_clients} clients for {a.warmup_seconds:g} s")
            ws = await self.run_clients(a.warmup_clients, a.warmup_seconds, warm, a.seed + 1)
            self.res["warmup_delete"] = await self.delete_sessions(ws)
            self.res["warmup"] = warm
            base, took = await self.settle(None, 40)
            self.res["baseline"] = base
            self.res["baseline_settle_s"] = took
            self.log("baseline: " + ", ".join(f"{k} {_f(base.get(k))}" for k in METRIC_KEYS))
            self.res["heap_baseline"] = await self.heap()

            # the soak
            tally = Tally()
            seconds = a.minutes * 60
            self.log(f"soak: {a.clients} clients for {seconds:g} s, upstream error rate {a.error_rate:.0%}")
            stop = asyncio.Event()
            self.samples = []
            mon = asyncio.create_task(self.monitor(stop, a.sample_every))
            progress = asyncio.create_task(self.progress(tally, seconds))
            t0 = now()
            cpu0 = await self.sample()
            hostile = Hostile(self, now() + seconds) if a.hostile else None
            hostile_task = asyncio.create_task(hostile.run()) if hostile else None
            soak = await self.run_clients(a.clients, seconds, tally, a.seed)
            if hostile_task is not None:
                await hostile_task
                for sid, token in hostile.sessions.items():
                    soak.sessions.add(sid)
                    soak.owners[sid] = token
                self.res["hostile"] = hostile.report()
            t_clients = now() - t0
            stop.set()
            await mon
            progress.cancel()
            end_load = await self.sample()
            self.res["soak_wall_s"] = t_clients
            self.res["end_of_load"] = end_load
            self.res["cpu"] = {k: end_load[k] - cpu0[k] for k in ("cpu_nexlm", "cpu_upstream", "cpu_harness", "busy")}
            self.res["cpu"]["wall"] = end_load["t"] - cpu0["t"]
            self.log(f"clients done after {t_clients:.0f} s; DELETE {len(soak.sessions)} sessions")
            self.res["final_delete"] = await self.delete_sessions(soak)
            end, took = await self.settle(base, a.settle_timeout)
            self.res["end"] = end
            self.res["heap_end"] = await self.heap()
            self.res["end_settle_s"] = took
            self.res["tally"] = tally
            self.res["loadavg_after"] = os.getloadavg()
            self.log("end: " + ", ".join(f"{k} {_f(end.get(k))}" for k in METRIC_KEYS) + f" (settled in {took:.1f} s)")
            recs = await self.upstream_records()
            self.res["stop_latency"] = stop_latencies(tally, recs)
            self.res["violation_records"] = {tag: [r for r in recs if r[0] in (tag, tag + "b")]
                                             for tag in sorted(tally.violation_tags)}
            if a.hold > 0:
                self.log(f"holding NexLM (pid {self.nex.pid}) and the upstream for {a.hold:g} s (--hold)")
                await asyncio.sleep(a.hold)
            self.res["upstream_final"] = end.get("up")
        finally:
            await self.mon_http.close()
            await self.up_http.close()
        return 0


def _f(x, nd=1):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def stop_latencies(t: Tally, records: list) -> dict:
    """Stop (or end of the resume grace) -> the upstream saw its connection close; both CLOCK_MONOTONIC."""
    by_tag = collections.defaultdict(list)
    for r in records:
        by_tag[r[0]].append(r)

    def lat(marks, offset):
        out, raced, missing = [], 0, 0
        for tag, t_mark in marks:
            cands = [r for r in by_tag.get(tag, []) if r[2] <= t_mark + offset + 0.001]
            if not cands:
                missing += 1  # stopped before NexLM reached the upstream (or between retries)
                continue
            r = max(cands, key=lambda r: r[2])
            if r[5] != "cut" or r[3] == 0.0:
                raced += 1  # the upstream had already finished (or failed) on its own
                continue
            out.append(r[3] - (t_mark + offset))
        return {"n": len(out), "p50_ms": _ms(quantile(out, 0.5)), "p99_ms": _ms(quantile(out, 0.99)), "max_ms": _ms(max(out) if out else None),
                "over_1s": sum(1 for x in out if x > 1.0), "upstream_already_ended": raced, "no_request": missing}

    return {"stop": lat(t.stop_marks, 0.0), "grace": lat(t.abandon_marks, GRACE)}


def _ms(x):
    return None if x is None else round(x * 1000, 1)


# =============================================================== report

def machine_info() -> list[str]:
    return machine_lines(("aiohttp", "uvloop", "orjson"), sep="; ")


def metric_rows(res: dict, samples: list[dict]) -> list[tuple]:
    base, end, load_end = res["baseline"], res["end"], res["end_of_load"]
    rows = []
    names = {"rss_mb": "RSS (MB)", "hwm_mb": "RSS high-water mark, VmHWM (MB)", "threads": "threads",
             "fds": "open file descriptors", "sockets": "  of which sockets", "tasks": "asyncio tasks",
             "sessions": "sessions", "websockets": "WebSockets", "replies_running": "replies running",
             "up_open_connections": "upstream: open connections", "up_active_streams": "upstream: active streams"}
    for k in METRIC_KEYS:
        vals = [s.get(k) for s in samples if isinstance(s.get(k), (int, float))]
        peak = max(vals) if vals else None
        b, e = base.get(k), end.get(k)
        if k in ("rss_mb", "hwm_mb"):
            verdict = "" if b is None or e is None else f"{(e / b - 1) * 100:+.1f}%"
            must = False
        else:
            must = k not in ("threads",)
            verdict = "n/a" if b is None or e is None else ("back" if e <= b else f"NOT back (+{e - b})")
        rows.append((names[k], b, peak, load_end.get(k), e, verdict, must))
    return rows


def heap_line(res: dict) -> str:
    hb, he = res.get("heap_baseline"), res.get("heap_end")
    if not (hb and he):
        return "- Python heap: not probed (--plain)"
    return (f"- Python heap after a full `gc.collect()`: {he['blocks']:,} allocated blocks at the end vs "
            f"{hb['blocks']:,} at baseline ({(he['blocks'] / hb['blocks'] - 1) * 100:+.1f}%); before that collection "
            f"the end held {he['collected']:,} objects of unreachable cycles waiting for the collector "
            f"({he['before']['blocks']:,} blocks)")


def session_leak_line(res: dict, t: Tally) -> str:
    left = (res["end"].get("sessions") or 0) - (res["baseline"].get("sessions") or 0)
    line = (f"- sessions left after every session a client was told about was DELETEd: {left:+d} vs baseline; "
            f"POST /sse chats without a session id that NexLM refused (wrong message type, bad params, unknown "
            f"model): {t.sessionless_refusals}")
    if left > 0 and left == t.sessionless_refusals:
        line += (" -- the same number: each such refusal left a session behind that the client was never told "
                 "about, so nobody can DELETE it; it lives until session_ttl_seconds (NexLM bug, see the notes)")
    elif left > 0:
        line += " -- sessions leaked for some other reason too"
    return line


def hostile_lines(res: dict, t: Tally, samples: list[dict]) -> list[str]:
    h = res.get("hostile")
    if h is None:
        return []
    lost = t.violations.get("session_lost_on_reconnect", 0) + t.reply_errors.get("session_expired", 0)
    peak = max(s["rss_mb"] for s in samples)
    return [
        "",
        "## Hostile clients (--hostile)", "",
        f"- NexLM's own limits at their defaults, but `[limits] max_queued_bytes = {HOSTILE_QUEUE}`, "
        "`[server] header_timeout_seconds = 5`, access tokens on (one per normal user, each also on its own "
        f"127.1.x.y address); {Hostile.LAGGERS} laggers, {Hostile.FLOODERS} session flooders, "
        f"{Hostile.GUESSERS} login guessers, {Hostile.SILENT} silent sockets, each on 127.2.x.y addresses",
        f"- RSS: before {res['baseline']['rss_mb']:.1f} MB, peak {peak:.1f} MB, after {res['end']['rss_mb']:.1f} MB",
        f"- live sessions of normal users lost (session_expired, or a different session on reconnect): **{lost}**",
        f"- normal users' replies completed: {t.replies_done:,} ({t.finishes.get('stop', 0):,} with finish_reason "
        "stop; the rest stopped, interrupted or failed by the injected upstream faults)",
        "- hostile clients: " + ", ".join(f"{k} ×{v:,}" for k, v in h.items()),
    ]


def render(res: dict, samples: list[dict], args, argv: list[str]) -> tuple[str, bool]:
    t: Tally = res["tally"]
    rows = metric_rows(res, samples)
    back = all(r[5] == "back" for r in rows if r[6])
    clean = not t.violations and not t.harness_errors
    lines = ["# NexLM soak results", ""]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    cmd = "python bench/soak.py" + (" " + " ".join(argv) if argv else "")
    lines += [f"Run {when}: `{cmd}`", ""]
    cl = res["clients"][args.seed]
    lines += machine_info()
    la0, la1 = res["loadavg_before"], res["loadavg_after"]
    cpu = res["cpu"]
    others = max(0.0, cpu["busy"] - cpu["cpu_nexlm"] - cpu["cpu_upstream"] - cpu["cpu_harness"])
    lines += [
        f"- load average before: {', '.join(f'{x:.2f}' for x in la0)}; after: {', '.join(f'{x:.2f}' for x in la1)}; "
        f"1-min load during the soak: max {max((s['load1'] for s in samples), default=0):.2f}",
        f"- CPU over the soak ({cpu['wall']:.0f} s): NexLM {cpu['cpu_nexlm']:.0f} s ({100 * cpu['cpu_nexlm'] / cpu['wall']:.0f}% of a core), "
        f"fake upstream {cpu['cpu_upstream']:.0f} s, this harness {cpu['cpu_harness']:.0f} s, "
        f"other processes {others:.0f} s",
        f"- {args.clients} clients ({cl['ws']} WebSocket, {cl['sse']} SSE) for {args.minutes:g} min "
        f"(clients ran {res['soak_wall_s']:.0f} s, starts spread over {args.ramp:g} s); replies of "
        f"{args.min_tokens}-{args.max_tokens} tokens at {args.iv:g} ms; think time 0-{args.think:g} s; "
        f"upstream error rate {args.error_rate:.0%}; NexLM resume_grace_seconds = {GRACE:g}, "
        f"first_token_timeout 3 s, idle_timeout 2 s, max_retries 2",
        f"- warm-up: {args.warmup_clients} clients for {args.warmup_seconds:g} s, then its sessions deleted; baseline "
        f"taken {res['baseline_settle_s']:.1f} s later once nothing ran and the upstream held no connection",
        "",
        "## Result", "",
        f"- Python-level state back to baseline (tasks, fds, sockets, sessions, WebSockets, replies, upstream "
        f"connections): **{'yes' if back else 'NO'}** (settled {res['end_settle_s']:.1f} s after the sessions were deleted)",
        f"- invariant violations: **{sum(t.violations.values())}**" + (
            " (" + ", ".join(f"{k} ×{v}" for k, v in t.violations.most_common()) + ")" if t.violations else ""),
        f"- RSS: baseline {res['baseline']['rss_mb']:.1f} MB, end {res['end']['rss_mb']:.1f} MB "
        f"({(res['end']['rss_mb'] / res['baseline']['rss_mb'] - 1) * 100:+.1f}%), peak {max(s['rss_mb'] for s in samples):.1f} MB; "
        "see the RSS timeline below for whether it plateaued",
        heap_line(res),
        session_leak_line(res, t),
        *hostile_lines(res, t, samples),
        "",
        "| figure (NexLM process) | baseline | peak during soak | end of load | end (settled) | end vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for name, b, p, le, e, v, _must in rows:
        lines.append(f"| {name} | {_f(b)} | {_f(p)} | {_f(le)} | {_f(e)} | {v} |")
    hb, he = res.get("heap_baseline"), res.get("heap_end")
    if hb and he:
        lines += ["", "Python heap of the NexLM process (the launcher's SIGUSR2: a full `gc.collect()`, right after the "
                  "baseline and after the end figures were taken):", "",
                  "| | baseline | end |", "|---|---|---|",
                  f"| unreachable cycles found by the full collection (objects) | {hb['collected']:,} | {he['collected']:,} |",
                  f"| Python heap before the collection: allocated blocks | {hb['before']['blocks']:,} | {he['before']['blocks']:,} |",
                  f"| Python heap after it: allocated blocks (`sys.getallocatedblocks()`) | {hb['blocks']:,} | {he['blocks']:,} "
                  f"({(he['blocks'] / hb['blocks'] - 1) * 100:+.1f}%) |",
                  f"| GC-tracked objects after it (not counting the {hb['frozen']:,} frozen at start-up) | "
                  f"{hb['gc_objects']:,} | {he['gc_objects']:,} |",
                  f"| RSS after it (MB) | {hb['rss_kb'] / 1024:.1f} | {he['rss_kb'] / 1024:.1f} |"]
    lines += ["", "\"end of load\": the moment the last client closed (sessions not yet deleted); "
              "\"end\": after DELETE of every session, once nothing ran (NexLM's HTTP client keeps idle upstream "
              "connections for 15 s, so the settle waits for those too).", ""]

    # totals
    lines += ["## Totals", ""]
    abandoned = sum(v for k, v in t.resume.items() if "abandon" in k)
    from_history = sum(v for k, v in t.resume.items() if k.endswith("from_history"))
    lines.append(f"- replies started {t.replies_started:,}, seen to their done {t.replies_done:,} "
                 f"(not seen to the end on purpose: {abandoned} abandoned, {from_history} read back from the history "
                 f"after an absence longer than the resume grace, when the replay log had been dropped); "
                 f"tokens received {t.tokens:,}; "
                 f"history cross-checks {t.history_checks:,}")
    lines.append("- actions: " + ", ".join(f"{k} {v:,}" for k, v in sorted(t.actions.items())))
    lines.append("- finish_reason of replies seen to the end: " + ", ".join(f"{k} {v:,}" for k, v in t.finishes.most_common()))
    lines.append("- client-visible reply errors (error events), by code: " +
                 (", ".join(f"{k} {v:,}" for k, v in t.reply_errors.most_common()) or "none"))
    lines.append("- refusals (error events / JSON error statuses), by code: " +
                 (", ".join(f"{k} {v:,}" for k, v in t.refusals.most_common()) or "none"))
    lines.append("- WebSocket close codes seen: " + (", ".join(f"{k} ×{v}" for k, v in t.ws_close_codes.most_common()) or "none"))
    lines.append("- HTTP statuses (SSE refusals, stop, DELETE): " + ", ".join(f"{k} ×{v}" for k, v in sorted(t.http_status.items())))
    lines.append("- disconnects / resumes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(t.resume.items())))
    up = res.get("upstream_final") or {}
    counts = up.get("counts", {})
    if counts:
        total = counts.get("requests", 0)
        faults = {k: v for k, v in counts.items() if k in FAULTS}
        lines.append(f"- upstream requests {total:,}, of which faults injected {sum(faults.values()):,} "
                     f"({100 * sum(faults.values()) / max(1, total):.1f}%): " +
                     ", ".join(f"{k} {v:,}" for k, v in sorted(faults.items())))
        lines.append("- upstream request outcomes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(up.get("outcomes", {}).items())))
        lines.append(f"- upstream peak concurrent streams: {up.get('peak_active')}; upstream loop lag p99 "
                     f"{up.get('loop_lag_ms', {}).get('p99', 0):.1f} ms")
    sl = res["stop_latency"]
    for name, what in (("stop", "stop sent → upstream connection closed"),
                       ("grace", "resume grace over (client gone for good) → upstream connection closed")):
        x = sl[name]
        lines.append(f"- {what}: p50 {x['p50_ms']} ms, p99 {x['p99_ms']} ms, max {x['max_ms']} ms, "
                     f"over 1 s: {x['over_1s']} (n={x['n']}; upstream had already ended: {x['upstream_already_ended']}, "
                     f"no upstream request yet: {x['no_request']})")
    if t.stop_to_done:
        lines.append(f"- client side, stop sent → done received: p50 {_ms(quantile(t.stop_to_done, .5))} ms, "
                     f"p99 {_ms(quantile(t.stop_to_done, .99))} ms, max {_ms(max(t.stop_to_done))} ms (n={len(t.stop_to_done)})")
    lag = [s.get("loop_lag_ms") or {} for s in samples]
    lag_max = max((x.get("max") or 0 for x in lag), default=0)
    lag_p99 = max((x.get("p99") or 0 for x in lag), default=0)
    lines.append(f"- NexLM's own loop lag (/api/metrics, sliding window): worst p99 seen {lag_p99} ms, worst max {lag_max} ms")
    lines.append("")

    if t.violations:
        lines += ["## Invariant violations (samples)", ""]
        for k, v in t.violations.most_common():
            lines.append(f"- **{k}** ×{v}")
            for sm in t.samples[k]:
                lines.append(f"  - `{sm}`")
        lines.append("")
    if res.get("violation_records"):
        lines += ["Upstream records of the replies above ([tag, fault, t_request, t_end, tokens sent, outcome]):", ""]
        for tag, recs in res["violation_records"].items():
            lines.append(f"- {tag}: " + "; ".join(f"{r[1]} {r[4]} tokens {r[5]}" for r in recs))
        lines.append("")
    if t.harness_errors:
        lines += ["## Harness errors", ""] + [f"- {k} ×{v}" for k, v in t.harness_errors.items()] + [""]
    w: Tally = res["warmup"]
    lines.append(f"Warm-up: {sum(w.actions.values())} actions, {w.replies_done} replies, violations: "
                 f"{dict(w.violations) or 'none'}.")
    lines.append("")

    # timeline
    lines += ["## Timeline (one row per ~1/10 of the soak)", "",
              "| t (s) | RSS MB | fds | tasks | sessions | WebSockets | replies running | upstream conns | load1 |",
              "|---|---|---|---|---|---|---|---|---|"]
    if samples:
        t0 = samples[0]["t"]
        step = max(1, len(samples) // 10)
        pick = samples[::step]
        if pick[-1] is not samples[-1]:
            pick.append(samples[-1])
        for s in pick:
            lines.append(f"| {s['t'] - t0:.0f} | {s['rss_mb']:.1f} | {s['fds']} | {s.get('tasks')} | {s.get('sessions')} | "
                         f"{s.get('websockets')} | {s.get('replies_running')} | {s.get('up_open_connections')} | {s['load1']:.2f} |")
    lines.append("")
    nl = res.get("nexlm_log", {})
    lines += ["## NexLM log", "",
              f"- {nl.get('lines', 0):,} lines; WARNING {nl.get('WARNING', 0)}, ERROR {nl.get('ERROR', 0)}, "
              f"tracebacks {nl.get('Traceback', 0)}; exit status {res.get('nexlm_exit')}"]
    for sm in nl.get("samples", []):
        lines.append(f"  - `{sm}`")
    lines += ["", "## Notes", "",
              "- RSS is what the kernel counts for the process; Python's allocator (and glibc's) keeps freed arenas, "
              "so RSS after a load can stay above its baseline without a leak. The Python-level counts (tasks, fds, "
              "sessions, WebSockets, replies, upstream connections) are the figures that must return.",
              "- Every normal user has its own 127.1.x.y address and access token, so NexLM's per-client limits "
              "count each on its own; the message and reply limits are lifted (as bench/run.py does), the "
              "session, connection and queue limits are not." if args.hostile else
              "- Every client is on 127.0.0.1 and counts as one client for NexLM's limits, which the config lifts "
              "(as bench/run.py does)."]
    for n in res.get("notes", []):
        lines.append(f"- {n}")
    lines.append("")
    return "\n".join(lines), back and clean


def scan_log(path: Path) -> dict:
    out = collections.Counter()
    samples = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                out["lines"] += 1
                for k in ("WARNING", "ERROR", "Traceback", "CRITICAL"):
                    if k in line:
                        out[k] += 1
                        if len(samples) < 12 and k != "WARNING" or (k == "WARNING" and len(samples) < 6):
                            samples.append(line.strip()[:300])
    except OSError:
        pass
    return {**out, "samples": samples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="NexLM soak test (issue 5)")
    sub = ap.add_subparsers(dest="mode")
    upa = sub.add_parser("upstream", help="(internal) run the fault-injecting upstream")
    upa.add_argument("--port", type=int, default=0)
    upa.add_argument("--error-rate", type=float, default=0.3)
    upa.add_argument("--seed", type=int, default=1)
    upa.add_argument("--stall-max", type=float, default=30.0)
    upa.add_argument("--uvloop", action="store_true")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--error-rate", type=float, default=0.30, help="share of upstream requests that fail")
    ap.add_argument("--ws-share", type=float, default=0.7, help="share of clients on /ws (the rest on /sse)")
    ap.add_argument("--iv", type=float, default=40.0, help="ms between tokens")
    ap.add_argument("--min-tokens", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=60)
    ap.add_argument("--think", type=float, default=0.5, help="max pause between a client's actions (s)")
    ap.add_argument("--ramp", type=float, default=5.0, help="client starts spread over this many seconds")
    ap.add_argument("--max-actions", type=int, default=0, help="per client; 0: as many as the time allows")
    ap.add_argument("--history-check", type=float, default=0.1, help="share of replies checked against the stored history")
    ap.add_argument("--warmup-clients", type=int, default=20)
    ap.add_argument("--warmup-seconds", type=float, default=8.0)
    ap.add_argument("--settle-timeout", type=float, default=60.0)
    ap.add_argument("--sample-every", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--app", default=str(ROOT / "app.py"))
    ap.add_argument("--out", default=str(BENCH / "soak-results.md"))
    ap.add_argument("--json", default=None, help="also write the raw samples and counts here")
    ap.add_argument("--no-uvloop", action="store_true", help="harness and upstream on plain asyncio")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--plain", action="store_true",
                    help="run app.py directly, without the launcher's heap probe (SIGUSR2 -> gc.collect())")
    ap.add_argument("--hostile", action="store_true",
                    help="also run hostile clients (non-reading listeners on busy sessions, set floods, session "
                         "floods from several addresses, login guessing, silent sockets) against NexLM's own limits")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="keep NexLM and the upstream running this long after the end (to inspect or profile them)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:
        launch(argv[1], argv[2:])
        return 0
    a = ap.parse_args(argv)
    raise_nofile()
    if a.mode == "upstream":
        if a.uvloop:
            use_uvloop()
        asyncio.run(upstream_main(a))
        return 0
    if not a.no_uvloop:
        use_uvloop()
    r = Runner(a)
    ok = passed = False
    try:
        r.start()
        asyncio.run(r.main())
        ok = True
    finally:
        r.stop()
        r.res["nexlm_log"] = scan_log(r.nex.log_path) if hasattr(r, "nex") else {}
        r.res["notes"] = r.notes
        if ok:
            text, passed = render(r.res, r.samples, a, argv)
            Path(a.out).write_text(text)
            if a.json:
                Path(a.json).write_text(json.dumps({"samples": r.samples, "res": {
                    k: (vars(v) if isinstance(v, Tally) else v) for k, v in r.res.items()}}, default=str, indent=1))
            print(text)
            print(f"\nwritten to {a.out}; logs in {r.tmp}" if a.keep_logs or not passed else f"\nwritten to {a.out}",
                  file=sys.stderr)
        if ok and not a.keep_logs and passed:
            shutil.rmtree(r.tmp, ignore_errors=True)
        elif not ok:
            print(f"soak: logs kept in {r.tmp}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
