"""The stateless Gateway (nexlm/gateway.py) and OpenAI's error envelope (nexlm/openai_errors.py):
admission as the page's, the reply slot given back however a turn ends, the fallback rule,
the tool-capability check, and the status each refusal or upstream failure maps to."""

from __future__ import annotations

import asyncio

import pytest
from fake_upstream import DONE, Script, chunk, error, from_fixture, reply

from nexlm.appkeys import CONVERSATIONS, GATEWAY
from nexlm.openai_errors import from_chat_error, from_stream_error
from nexlm.providers.base import StreamError, TextDelta, plain_messages
from nexlm.validation import ChatError

MESSAGES = [{"role": "user", "content": "Hi"}]


async def collect(gw, model="fake/fake-model", messages=MESSAGES, **kw):
    async with gw.turn(None, "c1", model, messages, **kw) as turn:
        return [ev async for ev in turn], turn


async def test_a_turn_streams_and_gives_its_slot_back(client, upstream):
    gw = client.app[GATEWAY]
    limiter = client.app[CONVERSATIONS].limiter
    events, turn = await collect(gw, "fakey", params={"temperature": 0.3}, extra={"seed": 1}, door="v1")
    assert all(type(ev) is TextDelta for ev in events) and "".join(ev.text for ev in events) == "Hello world"
    assert (turn.model, turn.finish, turn.door) == ("fake/fake-model", "stop", "v1")
    assert turn.usage["completion_tokens"] == 2
    assert limiter.running_total == 0 and gw.running == 0
    body = upstream.requests[-1]["body"]
    assert body["temperature"] == 0.3 and body["seed"] == 1


async def test_the_slot_is_given_back_when_the_caller_leaves_early(client, upstream):
    gw = client.app[GATEWAY]
    upstream.push(Script([chunk("a"), "hang"]))
    async with gw.turn(None, "c1", "fake/fake-model", MESSAGES) as turn:
        async for _ in turn:
            break  # e.g. a write to a client that left failed
    await upstream.wait_closed(1)  # the upstream request was closed, not left to the garbage collector
    assert client.app[CONVERSATIONS].limiter.running_total == 0


async def test_cancelling_the_caller_closes_the_upstream(client, upstream):
    gw = client.app[GATEWAY]
    upstream.push(Script(["hang"]))

    async def run():
        await collect(gw)

    task = asyncio.create_task(run())
    await upstream.wait_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await upstream.wait_closed(1)
    assert upstream.cut_by_client == 1
    assert client.app[CONVERSATIONS].limiter.running_total == 0


async def test_refusals_hold_nothing(make_client):
    client = await make_client("[limits]\nmessages_per_minute = 1")
    gw = client.app[GATEWAY]
    with pytest.raises(ChatError) as exc:
        await collect(gw, "nope/nothing")
    assert exc.value.status == 404 and exc.value.code == "unknown_model"
    await collect(gw)
    with pytest.raises(ChatError) as exc:
        await collect(gw)
    assert exc.value.status == 429 and exc.value.retry_after > 0
    assert client.app[CONVERSATIONS].limiter.running_total == 0


async def test_concurrent_replies_per_client_are_limited_across_doors(make_client, upstream):
    client = await make_client("[limits]\nmax_replies_per_client = 1")
    gw = client.app[GATEWAY]
    gate = asyncio.Event()
    upstream.push(Script([chunk("a"), gate, chunk(finish="stop"), b"data: [DONE]\n\n"]))
    async with gw.turn(None, "c1", "fake/fake-model", MESSAGES) as turn:
        with pytest.raises(ChatError) as exc:
            await collect(gw)
        assert exc.value.code == "busy"
        gate.set()
        assert [ev async for ev in turn] == [TextDelta("a")]
    await collect(gw)  # the slot is back


async def test_tools_refused_for_a_model_that_cannot_call_them(client):
    gw = client.app[GATEWAY]
    gw.admission.registry.providers["fake"].supports_tools = False
    tools = [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(ChatError) as exc:
        await collect(gw, extra={"tools": tools})
    assert exc.value.status == 400 and exc.value.param == "tools" and "cannot call tools" in exc.value.message
    assert client.app[CONVERSATIONS].limiter.running_total == 0


async def test_fallback_before_the_first_token(make_client, upstream):
    client = await make_client('[providers.fake]\nfallback = "fake/fake-reasoner"')
    upstream.push(error(503, "overloaded"), reply("From the fallback"))
    events, turn = await collect(client.app[GATEWAY])
    assert events == [TextDelta("From the fallback")]
    assert turn.model == "fake/fake-reasoner" and turn.fallback["from"] == "fake/fake-model"


async def test_shutting_down_refuses_new_turns(client):
    gw = client.app[GATEWAY]
    await gw.close(0)
    with pytest.raises(ChatError) as exc:
        await collect(gw)
    assert exc.value.status == 503 and exc.value.code == "shutting_down"


# --------------------------------------------------------------------------- the error envelope

@pytest.mark.parametrize("exc, status, err_type, retry", [
    (ChatError("bad_request", "n must be 1", param="n"), 400, "invalid_request_error", False),
    (ChatError("unknown_model", "Unknown model", 404), 404, "invalid_request_error", False),
    (ChatError("bad_request", "too long", 413), 413, "invalid_request_error", False),
    (ChatError("rate_limited", "Too many", 429, 12.2), 429, "rate_limit_error", True),
    (ChatError("busy", "You already have 1 replies running", 503), 429, "rate_limit_error", True),
    (ChatError("overloaded", "busy server", 503), 503, "server_error", True),
])
def test_chat_errors_in_the_envelope(exc, status, err_type, retry):
    f = from_chat_error(exc)
    assert f.status == status
    assert set(f.envelope) == {"error"} and set(f.error) == {"message", "type", "param", "code"}
    assert f.error["type"] == err_type and f.error["message"] == exc.message
    assert f.error["param"] == (exc.param or ("model" if exc.code == "unknown_model" else None))
    if retry:
        assert int(f.headers["Retry-After"]) >= 1 and "x-should-retry" not in f.headers
    else:
        assert f.headers == {"x-should-retry": "false"}
    if exc.code == "rate_limited":
        assert f.headers["Retry-After"] == "13" and f.error["code"] == "rate_limit_exceeded"
    if exc.code == "unknown_model":
        assert f.error["code"] == "model_not_found"


@pytest.mark.parametrize("ev, status", [
    (StreamError("upstream_timeout", "Fake did not start answering within 2 s"), 504),
    (StreamError("upstream_error", "Fake answered 500: Internal Server Error", 500, True), 502),
    (StreamError("upstream_error", "Fake answered 400: Bad Request", 400), 400),
    (StreamError("rate_limited", "Fake answered 429", 429, True, 3.0), 429),
    (StreamError("provider_unavailable", "set DEEPSEEK_API_KEY"), 503),
])
def test_stream_errors_in_the_envelope(ev, status):
    f = from_stream_error(ev)
    assert f.status == status and f.error["message"] == ev.message
    assert f.error["type"] == ("server_error" if status >= 500 else
                               "rate_limit_error" if status == 429 else "invalid_request_error")
    assert ("Retry-After" in f.headers) == (status in (429, 503))
    # A missing key or a model that failed to load is not cured by a retry: the SDK must not retry it.
    assert (f.headers.get("x-should-retry") == "false") == (status not in (429, 503) or ev.code == "provider_unavailable")


def test_plain_messages_for_a_text_only_model():
    msgs = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "this?"},
                                     {"type": "image_url", "image_url": {"url": "data:"}}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a cat"},
    ]
    out = plain_messages(msgs)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert all(isinstance(m["content"], str) and set(m) == {"role", "content"} for m in out)
    assert out[1]["content"].startswith("What is\nthis?\n[image_url omitted")
    assert "look({})" in out[2]["content"] and "a cat" in out[3]["content"]


# --------------------------------------------------------------------------- the page's doors

async def test_the_page_ignores_tool_call_events(connect, upstream, client):
    """A tool-calling upstream reply on /ws: no crash, the turn ends as the upstream said."""
    upstream.push(from_fixture("openai-tool-calls-stream.txt"))
    ws = await connect()
    await ws.recv()  # session
    await ws.send({"type": "chat", "message": "weather?"})
    frames = await ws.until("done")
    assert frames[-1]["finish_reason"] == "tool_calls"
    assert not [f for f in frames if f["type"] in ("delta", "error")]
    await ws.close()


async def test_turns_know_their_door(client, upstream, connect):
    chat = client.app[CONVERSATIONS]
    doors = []
    for path in ("sse", "ws"):
        gate = asyncio.Event()
        upstream.push(Script([chunk("a", role=True), gate, chunk(finish="stop"), DONE]))
        if path == "sse":
            resp = await client.post("/sse", json={"message": "hi"})
        else:
            ws = await connect()
            await ws.recv()
            await ws.send({"type": "chat", "message": "hi"})
        await upstream.wait_requests(len(doors) + 1)
        doors += [live.reply.turn.door for live in chat.live.values() if live.reply is not None]
        gate.set()
        if path == "sse":
            await resp.read()
        else:
            await ws.until("done")
            await ws.close()
    assert doors == ["sse", "ws"]
