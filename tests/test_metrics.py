"""``GET /metrics`` read back with prometheus_client's own text parser, the turn observer hook,
and the one log line per reply."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from conftest import extra_config
from fake_upstream import Script, chunk, error, from_fixture, reply
from invariants import eventually, free_port, h, make_harness, request_times, spawn_app  # noqa: F401  (h, make_harness: fixtures)
from prometheus_client.parser import text_string_to_metric_families

from nexlm.appkeys import CONVERSATIONS, REGISTRY, SSE_STREAMS, WEBSOCKETS
from nexlm.config import ConfigError, load_settings
from nexlm.engine import Turn
from nexlm.metrics import Metrics
from nexlm.providers.base import ChatRequest, Finish, TextDelta
from nexlm.providers.registry import Resolved
from nexlm.replylog import JsonFormatter

MODEL = "fake/fake-model"
TOKEN = "metrics-test-token-0123456789"
# OpenTelemetry's GenAI buckets, written out here so a change to the module's shows up.
TTFT_LE = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
           20.0, 40.0, 80.0, float("inf")]
DURATION_LE = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, float("inf")]


def parse(text: str) -> dict:
    """{family name: family}, by prometheus_client's parser (it raises on anything malformed)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


async def scrape(client, **kw) -> dict:
    r = await client.get("/metrics", **kw)
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(await r.text())


def by_labels(families: dict, family: str, sample: str, *keys: str) -> dict:
    """{label values (in ``keys`` order): value} of one sample name."""
    return {tuple(s.labels[k] for k in keys): s.value for s in families[family].samples if s.name == sample}


def one(families: dict, family: str, sample: str | None = None, **labels) -> float:
    [value] = [s.value for s in families[family].samples
               if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items())]
    return value


async def test_metrics_after_ws_and_sse_traffic(h, upstream, caplog):
    """Four replies (ws stop, ws upstream failure, sse stop, ws stopped by the user): every count
    they must have produced, exactly, and one log line each with the right fields."""
    caplog.set_level(logging.INFO, logger="nexlm.replies")
    upstream.push(reply("Hello", " world"), error(500, "boom"), reply("A", "B", "C"),
                  Script([chunk("", role=True), chunk("partial"), "hang"]))
    peer = await h.ws()
    await peer.chat("one")
    assert (await peer.until("done"))[-1]["finish_reason"] == "stop"
    await peer.chat("two")
    frames = await peer.until("done")
    assert frames[-2]["type"] == "error" and frames[-1]["finish_reason"] == "error"
    stream = await h.start("sse", "three")
    assert (await stream.until("done"))[-1]["finish_reason"] == "stop"
    await peer.chat("four")
    await peer.until("delta")
    await peer.stop()
    assert (await peer.until("done"))[-1]["finish_reason"] == "stopped"
    await h.settle()

    m = await scrape(h.client)
    assert by_labels(m, "nexlm_replies", "nexlm_replies_total", "door", "model", "finish_reason") == {
        ("ws", MODEL, "stop"): 1, ("ws", MODEL, "error"): 1, ("sse", MODEL, "stop"): 1, ("ws", MODEL, "stopped"): 1}
    assert by_labels(m, "nexlm_requests", "nexlm_requests_total", "door", "model") == {
        ("ws", MODEL): 3, ("sse", MODEL): 1}
    # Time to first token: the three replies that streamed a token; duration: all four.
    ttft = m["nexlm_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    assert one(m, "nexlm_time_to_first_token_seconds", "nexlm_time_to_first_token_seconds_count", model=MODEL) == 3
    assert [float(s.labels["le"]) for s in ttft.samples if s.name.endswith("_bucket")] == TTFT_LE
    assert one(m, "nexlm_reply_duration_seconds", "nexlm_reply_duration_seconds_count", model=MODEL) == 4
    assert [float(s.labels["le"]) for s in m["nexlm_reply_duration_seconds"].samples
            if s.name.endswith("_bucket")] == DURATION_LE
    # NexLM's own latency, for each reply whose upstream reported its timing: never above the TTFT.
    added_sum = one(m, "nexlm_added_latency_seconds", "nexlm_added_latency_seconds_sum", model=MODEL)
    assert one(m, "nexlm_added_latency_seconds", "nexlm_added_latency_seconds_count", model=MODEL) == 3
    assert 0 <= added_sum <= one(m, "nexlm_time_to_first_token_seconds", "nexlm_time_to_first_token_seconds_sum",
                                 model=MODEL)
    # Usage: 5 prompt tokens each for the two finished replies, 2 + 3 completion tokens.
    assert by_labels(m, "nexlm_input_tokens", "nexlm_input_tokens_total", "model") == {(MODEL,): 10}
    assert by_labels(m, "nexlm_output_tokens", "nexlm_output_tokens_total", "model") == {(MODEL,): 5}
    assert by_labels(m, "nexlm_upstream_errors", "nexlm_upstream_errors_total", "provider", "code") == {
        ("fake", "upstream_error"): 1}
    # Gauges, read at scrape time: the WebSocket is still open, the event stream is over.
    assert by_labels(m, "nexlm_active_connections", "nexlm_active_connections", "transport") == {
        ("ws",): 1, ("sse",): 0}
    assert one(m, "nexlm_active_replies") == 0 and one(m, "nexlm_queued_replies") == 0
    assert one(m, "nexlm_sessions") == 2
    assert m["nexlm_event_loop_lag_seconds"].type == "histogram"

    # One log line per reply, in order, with the fields and nothing of the conversation.
    records = [r for r in caplog.records if r.name == "nexlm.replies"]
    got = [(r.fields["door"], r.fields["finish_reason"], r.fields["tokens_in"], r.fields["tokens_out"])
           for r in records]
    assert got == [("ws", "stop", 5, 2), ("ws", "error", None, None), ("sse", "stop", 5, 3), ("ws", "stopped", None, None)]
    sessions = [peer.sid[:6], peer.sid[:6], stream.sid[:6], peer.sid[:6]]
    for record, prefix in zip(records, sessions):
        f = record.fields
        assert list(f) == ["door", "session", "model", "ttft_ms", "tokens_in", "tokens_out", "finish_reason",
                           "duration_ms"]
        assert f["session"] == prefix and f["model"] == MODEL
        assert (f["ttft_ms"] is None) == (f["finish_reason"] == "error")
        assert f["duration_ms"] >= (f["ttft_ms"] or 0) >= 0
        line = record.getMessage()
        assert line == "reply " + " ".join(f"{k}={'-' if v is None else v}" for k, v in f.items())
        for secret in ("one", "two", "three", "Hello", "partial", "sk-test-secret-key-123", peer.sid, stream.sid):
            assert secret not in line
        as_json = json.loads(JsonFormatter().format(record))
        assert as_json["message"] == "reply" and as_json["logger"] == "nexlm.replies"
        assert {k: as_json[k] for k in f} == f
    await h.check()


async def test_v1_turns_are_observed_too(h, upstream, caplog):
    """The stateless gateway's turns (door "v1"): streamed, not streamed, tool calls (their first
    fragment is the first token), an upstream failure; one log line each, without a session."""
    caplog.set_level(logging.INFO, logger="nexlm.replies")
    upstream.push(reply("Hi", " there"), reply("Plain"), from_fixture("openai-tool-calls-stream.txt"),
                  error(500, "boom"))
    hi = [{"role": "user", "content": "a v1 question"}]
    r = await h.client.post("/v1/chat/completions", json={"model": MODEL, "messages": hi, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    assert r.status == 200 and "data: [DONE]" in await r.text()
    r = await h.client.post("/v1/chat/completions", json={"model": "fakey", "messages": hi})
    assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == "Plain"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = await h.client.post("/v1/chat/completions", json={"model": MODEL, "messages": hi, "tools": tools,
                                                          "stream": True})
    assert r.status == 200 and "tool_calls" in await r.text()
    r = await h.client.post("/v1/chat/completions", json={"model": MODEL, "messages": hi, "stream": True})
    assert r.status == 502
    await h.settle()

    m = await scrape(h.client)
    assert by_labels(m, "nexlm_replies", "nexlm_replies_total", "door", "model", "finish_reason") == {
        ("v1", MODEL, "stop"): 2, ("v1", MODEL, "tool_calls"): 1, ("v1", MODEL, "error"): 1}
    assert by_labels(m, "nexlm_requests", "nexlm_requests_total", "door", "model") == {("v1", MODEL): 4}
    assert one(m, "nexlm_time_to_first_token_seconds", "nexlm_time_to_first_token_seconds_count", model=MODEL) == 3
    assert one(m, "nexlm_added_latency_seconds", "nexlm_added_latency_seconds_count", model=MODEL) == 3
    assert one(m, "nexlm_reply_duration_seconds", "nexlm_reply_duration_seconds_count", model=MODEL) == 4
    assert by_labels(m, "nexlm_input_tokens", "nexlm_input_tokens_total", "model") == {(MODEL,): 5 + 5 + 82}
    assert by_labels(m, "nexlm_output_tokens", "nexlm_output_tokens_total", "model") == {(MODEL,): 2 + 1 + 41}
    assert by_labels(m, "nexlm_upstream_errors", "nexlm_upstream_errors_total", "provider", "code") == {
        ("fake", "upstream_error"): 1}
    assert one(m, "nexlm_sessions") == 0  # stateless: nothing stored
    records = [r for r in caplog.records if r.name == "nexlm.replies"]
    assert [(r.fields["door"], r.fields["session"], r.fields["finish_reason"]) for r in records] == [
        ("v1", None, "stop"), ("v1", None, "stop"), ("v1", None, "tool_calls"), ("v1", None, "error")]
    assert all(" session=- " in r.getMessage() and "question" not in r.getMessage() for r in records)
    await h.check()


@pytest.mark.parametrize("where", ["provider", "relay"])
async def test_a_server_bug_counts_as_an_error(client, upstream, monkeypatch, where):
    """A bug inside the provider, or in the /v1 handler around the turn: the turn is observed
    once, as "error" (not as a client that left)."""
    if where == "provider":
        provider = client.app[REGISTRY].providers["fake"]
        real = provider.parse

        async def broken(chunks, watch=None):
            async for ev in real(chunks, watch):
                yield ev
                raise RuntimeError("a bug")

        monkeypatch.setattr(provider, "parse", broken)
    else:
        import nexlm.transports.v1.chat as v1chat

        async def broken_complete(turn):
            async for _ in turn:
                raise RuntimeError("a bug")

        monkeypatch.setattr(v1chat, "_complete", broken_complete)
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "q"}]})
    assert r.status == 500
    await eventually(lambda: client.app[CONVERSATIONS].limiter.running_total == 0, 5, "the reply slot is held")
    m = await scrape(client)
    assert by_labels(m, "nexlm_replies", "nexlm_replies_total", "door", "model", "finish_reason") == {
        ("v1", MODEL, "error"): 1}


async def test_gauges_while_replies_run(h, upstream):
    """Read at scrape time: an /sse stream and a /ws reply held by a gate, one of them queued
    (as a single-slot model would report it); all back to zero once they end."""
    gate = asyncio.Event()
    upstream.push(Script([chunk("", role=True), chunk("a"), gate, chunk(finish="stop")]),
                  Script([chunk("", role=True), chunk("b"), gate, chunk(finish="stop")]))
    peer = await h.ws()
    await peer.chat("one")
    await peer.until("delta")
    stream = await h.start("sse", "two")
    await stream.until("delta")
    provider = h.app[REGISTRY].providers["fake"]
    provider.single_slot, provider.waiting = True, lambda: 1  # as the embedded model reports its queue
    try:
        m = await scrape(h.client)
    finally:
        del provider.single_slot, provider.waiting
    assert by_labels(m, "nexlm_active_connections", "nexlm_active_connections", "transport") == {
        ("ws",): 1, ("sse",): 1}
    assert one(m, "nexlm_active_replies") == 2 and one(m, "nexlm_queued_replies") == 1
    assert one(m, "nexlm_sessions") == 2
    gate.set()
    await peer.until("done")
    await stream.until("done")
    await peer.close()
    await h.settle()
    await eventually(lambda: not h.app[WEBSOCKETS] and not h.app[SSE_STREAMS], 5, "a stream is still counted")
    m = await scrape(h.client)
    assert by_labels(m, "nexlm_active_connections", "nexlm_active_connections", "transport") == {
        ("ws",): 0, ("sse",): 0}
    assert one(m, "nexlm_active_replies") == 0 and one(m, "nexlm_queued_replies") == 0
    await h.check()


async def test_upstream_timing_starts_at_the_turns_first_request(make_harness, upstream):
    """Retries are the upstream's time, not NexLM's: ``sent`` is stamped before the first POST
    (not the retried one), ``first_token`` after the last request arrived, and our own first
    token after that."""
    h = await make_harness("[providers.fake]\nmax_retries = 1\nretry_max_seconds = 5")
    arrived = request_times(upstream)
    upstream.push(error(503, "busy"), reply("late"))
    turns = []
    chat = h.app[CONVERSATIONS]
    observer = chat.on_turn_done
    chat.on_turn_done = lambda turn, session=None: (turns.append(turn), observer(turn, session=session))
    peer = await h.ws()
    await peer.chat("q")
    assert (await peer.until("done"))[-1]["finish_reason"] == "stop"
    [turn] = turns
    assert len(arrived) == 2
    assert turn.started < turn.upstream.sent < arrived[0] < arrived[1] < turn.upstream.first_token < turn.first_token
    m = await scrape(h.client)
    assert one(m, "nexlm_added_latency_seconds", "nexlm_added_latency_seconds_count", model=MODEL) == 1
    assert by_labels(m, "nexlm_upstream_errors", "nexlm_upstream_errors_total", "provider", "code") == {}
    await h.check()


async def test_event_loop_lag_is_sampled(h):
    async def count() -> float:
        return one(await scrape(h.client), "nexlm_event_loop_lag_seconds", "nexlm_event_loop_lag_seconds_count")

    seen = [await count()]

    async def poll():
        seen.append(await count())

    deadline = asyncio.get_running_loop().time() + 5
    while seen[-1] < 2 and asyncio.get_running_loop().time() < deadline:
        await poll()
        await asyncio.sleep(0.02)
    assert seen[-1] >= 2, seen


@pytest.mark.parametrize("public", [False, True])
async def test_metrics_access_control(make_client, public):
    extra = f'[auth]\ntokens = ["{TOKEN}"]\n' + ("[metrics]\npublic = true\n" if public else "")
    client = await make_client(extra)
    r = await client.get("/metrics")
    assert r.status == (200 if public else 401)
    if not public:
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "nexlm_replies" not in await r.text()
    m = await scrape(client, headers={"Authorization": f"Bearer {TOKEN}"})
    assert "nexlm_active_connections" in m
    # public opens /metrics only: the JSON metrics and everything else still want the token.
    assert (await client.get("/api/metrics")).status == 401
    assert (await client.get("/api/models")).status == 401


async def test_labels_come_only_from_bounded_sets(h):
    """A made-up model name is refused and leaves no label; only configured ids appear."""
    peer = await h.ws()
    refused = await peer.chat("x", model="evil/INJECTED-NAME")
    assert refused["type"] == "error" and refused["code"] == "unknown_model"
    r = await h.client.get("/sse", params={"message": "x", "model": "INJECTED-TOO"})
    assert r.status == 404
    await peer.chat("y")
    await peer.until("done")
    await h.settle()
    r = await h.client.get("/metrics")
    text = await r.text()
    assert "INJECTED" not in text
    models = {s.labels["model"] for f in parse(text).values() for s in f.samples if "model" in s.labels}
    assert models == {MODEL}
    await h.check()


class _Stub:
    name = "fake"


def _turn(model_id: str = MODEL, **kw) -> Turn:
    return Turn(Resolved(model_id, _Stub(), "fake-model"), ChatRequest("fake-model"), **kw)


def test_unknown_values_are_counted_as_other(tmp_path):
    path = tmp_path / "nexlm.toml"
    path.write_text(extra_config("http://127.0.0.1:9/v1", ""))
    metrics = Metrics(load_settings(str(path), env={}))
    turn = _turn("ghost/asked-for", door="telnet", on_done=metrics.turn_done)
    turn.model = "someone/else"  # as if a fallback answered with a model nobody configured
    turn.failures.append(("ghost", "made_up_code"))
    turn.usage = {"prompt_tokens": "many", "completion_tokens": -3}  # nonsense from an upstream: not counted
    turn.end("weird-reason")
    m = parse(metrics.render().decode())
    assert by_labels(m, "nexlm_replies", "nexlm_replies_total", "door", "model", "finish_reason") == {
        ("other", "other", "other"): 1}
    assert by_labels(m, "nexlm_requests", "nexlm_requests_total", "door", "model") == {("other", "other"): 1}
    assert by_labels(m, "nexlm_upstream_errors", "nexlm_upstream_errors_total", "provider", "code") == {
        ("other", "other"): 1}
    assert by_labels(m, "nexlm_input_tokens", "nexlm_input_tokens_total", "model") == {}
    assert by_labels(m, "nexlm_output_tokens", "nexlm_output_tokens_total", "model") == {}


class _Provider:
    """A provider whose stream is a script: events, or an Event to wait on forever."""

    name = "fake"

    def __init__(self, *events) -> None:
        self.events = events

    async def stream(self, request):
        for ev in self.events:
            if isinstance(ev, asyncio.Event):
                await ev.wait()
            else:
                yield ev


async def test_on_done_is_called_exactly_once_however_the_turn_ends():
    seen: list[str] = []

    def make(*events, **kw) -> Turn:
        return Turn(Resolved(MODEL, _Provider(*events), "fake-model"), ChatRequest("fake-model"),
                    on_done=lambda t: seen.append(t.finish), **kw)

    finished = make(TextDelta("hi"), Finish("length"))
    assert [ev async for ev in finished] == [TextDelta("hi")]
    finished.end("length")  # the owner records it too: no second call
    assert seen == ["length"]

    stopped = make(TextDelta("hi"), asyncio.Event())

    async def consume(turn):
        async for _ in turn:
            pass

    task = asyncio.create_task(consume(stopped))
    await eventually(lambda: stopped.first_token is not None, 5, "no first token")
    stopped.stop_reason = "stopped"
    task.cancel()
    await asyncio.wait([task])
    stopped.end("stopped")
    assert seen == ["length", "stopped"]

    never_ran = make(TextDelta("hi"))
    never_ran.end("interrupted")
    never_ran.end("error")
    assert seen == ["length", "stopped", "interrupted"]

    closed = make(TextDelta("a"), TextDelta("b"), Finish("stop"))
    events = closed.__aiter__()
    assert await events.__anext__() == TextDelta("a")
    await events.aclose()  # a consumer that stops reading (a client gone)
    assert seen == ["length", "stopped", "interrupted", "interrupted"]

    def broken(turn):
        raise RuntimeError("observer bug")

    quiet = Turn(Resolved(MODEL, _Provider(Finish("stop")), "fake-model"), ChatRequest("fake-model"), on_done=broken)
    assert [ev async for ev in quiet] == []  # an observer's failure does not break the reply
    assert quiet.finish == "stop" and quiet.ended is not None


@pytest.mark.parametrize("key, value, needle", [
    ("log_format", '"xml"', "[server] log_format"),
    ("log_level", '"loud"', "[server] log_level"),
])
def test_log_settings_are_checked(tmp_path, key, value, needle):
    path = tmp_path / "nexlm.toml"
    path.write_text(f"[server]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_settings(str(path), env={})


async def test_app_py_writes_json_log_lines(upstream, tmp_path):
    """``python app.py`` with ``log_format = "json"``: every stderr line is one JSON object, and
    the reply's line carries its fields; ``log_level = "warning"`` then silences it."""
    import aiohttp

    lines_by_level = {}
    for level in ("info", "warning"):
        cfg = tmp_path / f"{level}.toml"
        cfg.write_text(extra_config(upstream.url, f'[server]\nlog_format = "json"\nlog_level = "{level}"\n'))
        port = free_port()
        proc = await spawn_app(cfg, port)
        try:
            async with asyncio.timeout(15):
                assert b"NexLM is running" in await proc.stdout.readline()
            async with aiohttp.ClientSession() as cs:
                async with cs.get(f"http://127.0.0.1:{port}/sse", params={"message": "a secret question"}) as r:
                    assert r.status == 200
                    body = await r.text()
                assert "event: done" in body
        finally:
            proc.terminate()
            async with asyncio.timeout(10):
                await proc.wait()
        lines = (await proc.stderr.read()).decode().splitlines()
        lines_by_level[level] = [json.loads(line) for line in lines]  # each line is JSON, or this raises
    replies = [o for o in lines_by_level["info"] if o.get("logger") == "nexlm.replies"]
    assert len(replies) == 1, lines_by_level["info"]
    [r] = replies
    assert r["message"] == "reply" and r["level"] == "info"
    assert (r["door"], r["model"], r["finish_reason"], r["tokens_in"], r["tokens_out"]) == ("sse", MODEL, "stop", 5, 2)
    assert len(r["session"]) == 6 and r["ttft_ms"] <= r["duration_ms"]
    assert not any("secret question" in json.dumps(o) for o in lines_by_level["info"])
    assert not any(o.get("logger") == "nexlm.replies" for o in lines_by_level["warning"])
