"""``/v1`` through the official ``openai`` package (a client none of us wrote), against the app
on a real port and the fake upstream: models, chat completions streamed and not, usage,
reasoning, tool calls, each error as the SDK's own exception, and a client leaving (streamed
or not, before or after the first token) closing the upstream request."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import openai
import pytest
from aiohttp import web
from conftest import extra_config
from fake_upstream import FIXTURES, Script, chunk, error, from_fixture, reply
from invariants import free_port, spawn_app

from nexlm.appkeys import CONVERSATIONS, GATEWAY, REGISTRY
from nexlm.config import load_settings
from nexlm.server import create_app

TOKEN = "v1-test-token-0123456789"
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"location": {"type": "string"}}}}}]
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def sdk(make_client):
    """``await sdk(extra_toml, **client_kw)`` -> (AsyncOpenAI on the app's real port, the test client)."""
    made = []

    async def make(extra: str = "", api_key: str = "unused", sent: list | None = None, **kw):
        """``sent``: a list that gets every HTTP request the SDK makes (to count its retries)."""
        client = await make_client(extra)
        kw.setdefault("max_retries", 0)

        async def record(req):
            if sent is not None:
                sent.append(req)

        # trust_env off: no proxy from the environment between the SDK and 127.0.0.1
        http = openai.DefaultAsyncHttpxClient(trust_env=False, event_hooks={"request": [record]})
        oa = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=api_key, http_client=http, **kw)
        made.append(oa)
        return oa, client

    yield make
    for oa in made:
        await oa.close()


def settled(client) -> bool:
    return client.app[CONVERSATIONS].limiter.running_total == 0


# --------------------------------------------------------------------------- models

async def test_models_list_has_the_ids_of_api_models(sdk):
    oa, client = await sdk()
    page = await oa.models.list()
    ids = [m.id for m in page.data]
    listing = await (await client.get("/api/models")).json()
    assert ids == [m["id"] for m in listing["models"] if m["available"]]  # the page's ids, those that answer
    assert "fake/fake-model" in ids and "fake/fake-reasoner" in ids
    assert all(m.object == "model" and m.owned_by == m.id.split("/")[0] for m in page.data)
    assert (await oa.models.retrieve("fakey")).id == "fake/fake-model"  # an alias names a model too
    with pytest.raises(openai.NotFoundError):
        await oa.models.retrieve("nope/none")


async def test_models_need_the_token_when_access_control_is_on(sdk):
    """Open WebUI checks a connection by listing models with its Bearer token."""
    oa, _ = await sdk(f'[auth]\ntokens = ["{TOKEN}"]', api_key=TOKEN)
    assert "fake/fake-model" in [m.id for m in (await oa.models.list()).data]
    bad, _ = await sdk(f'[auth]\ntokens = ["{TOKEN}"]', api_key="wrong-token-0123456789")
    with pytest.raises(openai.AuthenticationError) as exc:
        await bad.models.list()
    assert exc.value.status_code == 401
    assert exc.value.body["message"] == "A valid access token is required."  # OpenAI's envelope, its error object


async def test_chat_needs_the_token_when_access_control_is_on(sdk, upstream):
    oa, _ = await sdk(f'[auth]\ntokens = ["{TOKEN}"]', api_key="x" * 20)
    with pytest.raises(openai.AuthenticationError):
        await oa.chat.completions.create(model="fakey", messages=HI)
    assert upstream.requests == []
    good, _ = await sdk(f'[auth]\ntokens = ["{TOKEN}"]', api_key=TOKEN)
    r = await good.chat.completions.create(model="fakey", messages=HI)
    assert r.choices[0].message.content == "Hello world"


# --------------------------------------------------------------------------- chat: text

async def test_chat_not_streamed(sdk, upstream):
    oa, client = await sdk()
    r = await oa.chat.completions.create(model="fakey", messages=HI, temperature=0.2, max_tokens=50, seed=3,
                                         stop=["\n\n"], user="alice")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "fake/fake-model"
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content == "Hello world"
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 2, 7)
    sent = upstream.requests[-1]["body"]
    assert sent["model"] == "fake-model" and sent["messages"] == HI
    assert (sent["temperature"], sent["max_tokens"], sent["seed"], sent["stop"], sent["user"]) == \
        (0.2, 50, 3, ["\n\n"], "alice")
    assert settled(client)


async def test_chat_streamed_with_usage(sdk, upstream):
    oa, client = await sdk()
    upstream.push(reply("Hel", "lo", " there"))
    stream = await oa.chat.completions.create(model="fake/fake-model", messages=HI, stream=True,
                                              stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == "fake/fake-model" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 3  # the usage chunk is the last
    assert all(c.usage is None for c in body)
    assert settled(client)


async def test_chat_streamed_wire_bytes(sdk, upstream):
    """The exact frame shapes: data lines only, usage null, [DONE] last, no usage chunk unasked."""
    _, client = await sdk()
    resp = await client.post("/v1/chat/completions", json={"model": "fakey", "messages": HI, "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    raw = (await resp.read()).decode()
    frames = [f for f in raw.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    objs = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert all(o["usage"] is None and len(o["choices"]) == 1 for o in objs)
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert objs[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    theirs = json.loads((FIXTURES / "openai-tool-calls-stream.txt").read_text().split("\n\n")[0].removeprefix("data: "))
    assert all(set(o) == set(theirs) and set(o["choices"][0]) == set(theirs["choices"][0]) for o in objs)


async def test_reasoning_streamed_and_not(sdk, upstream):
    oa, _ = await sdk()
    upstream.push(from_fixture("deepseek-reasoner-stream.txt"), from_fixture("deepseek-reasoner-stream.txt"))
    stream = await oa.chat.completions.create(model="fake/fake-reasoner", messages=HI, stream=True)
    chunks = [c async for c in stream]
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, text) == ("用户问的是 2+2。", "2+2 = 4。")
    r = await oa.chat.completions.create(model="fake/fake-reasoner", messages=HI)
    msg = r.choices[0].message
    assert msg.content == "2+2 = 4。" and msg.reasoning_content == "用户问的是 2+2。"
    assert r.usage.completion_tokens_details.reasoning_tokens == 12


# --------------------------------------------------------------------------- chat: tools

async def test_tool_calls_streamed(sdk, upstream):
    oa, _ = await sdk()
    upstream.push(from_fixture("openai-tool-calls-stream.txt"))
    stream = await oa.chat.completions.create(model="fakey", messages=HI, tools=WEATHER, tool_choice="auto",
                                              parallel_tool_calls=True, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    async for c in stream:
        d = c.choices[0].delta
        for tc in d.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert call["id"] is None and tc.type == "function"  # id and name come once, first
                call["id"], call["name"] = tc.id, tc.function.name
            call["arguments"] += tc.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls == {0: {"id": "call_Wq1A9", "name": "get_weather", "arguments": '{"location": "Paris"}'},
                     1: {"id": "call_Zk7B2", "name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}}
    sent = upstream.requests[-1]["body"]
    assert sent["tools"] == WEATHER and sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is True


async def test_tool_calls_not_streamed_and_the_results_sent_back(sdk, upstream):
    oa, _ = await sdk()
    upstream.push(from_fixture("openai-tool-calls-stream.txt"))
    r = await oa.chat.completions.create(model="fakey", messages=HI, tools=WEATHER)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(t.id, t.type, t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls] == [
        ("call_Wq1A9", "function", "get_weather", {"location": "Paris"}),
        ("call_Zk7B2", "function", "get_time", {"tz": "Europe/Paris"})]
    # The next request carries the assistant's calls and the tool's answer, as OpenAI's do.
    follow = [*HI, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": "call_Wq1A9", "content": "18 °C"},
              {"role": "tool", "tool_call_id": "call_Zk7B2", "content": [{"type": "text", "text": "14:00"}]}]
    r2 = await oa.chat.completions.create(model="fakey", messages=follow, tools=WEATHER)
    assert r2.choices[0].message.content == "Hello world"
    sent = upstream.requests[-1]["body"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather" and sent[1]["content"] is None
    assert sent[3]["content"] == [{"type": "text", "text": "14:00"}]


async def test_tools_refused_for_a_model_that_cannot_call_them(sdk, upstream):
    oa, client = await sdk()
    client.app[REGISTRY].providers["fake"].supports_tools = False  # as the embedded model
    with pytest.raises(openai.BadRequestError) as exc:
        await oa.chat.completions.create(model="fakey", messages=HI, tools=WEATHER)
    assert "cannot call tools" in exc.value.message and exc.value.param == "tools"
    assert upstream.requests == []


# --------------------------------------------------------------------------- errors

async def test_unknown_model_is_not_found(sdk, upstream):
    oa, client = await sdk()
    with pytest.raises(openai.NotFoundError) as exc:
        await oa.chat.completions.create(model="nope/none", messages=HI)
    assert exc.value.code == "model_not_found" and "Unknown model" in exc.value.message
    assert exc.value.param == "model"
    assert upstream.requests == [] and settled(client)


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"),
    ({"frobnicate": True}, "frobnicate"),
    ({"temperature": 3}, "temperature"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 0}, "max_tokens"),
])
async def test_bad_requests_name_the_field(sdk, upstream, body, param):
    oa, client = await sdk()
    fields = {"model": "fakey", "messages": HI, **body}
    with pytest.raises(openai.BadRequestError) as exc:
        await oa.chat.completions.create(model=fields.pop("model"), messages=fields.pop("messages"), extra_body=fields)
    assert exc.value.param == param and exc.value.type == "invalid_request_error"
    assert upstream.requests == [] and settled(client)


async def test_body_not_json_and_too_large(sdk):
    _, client = await sdk("[limits]\nmax_frame_bytes = 2000")
    resp = await client.post("/v1/chat/completions", data=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"
    resp = await client.post("/v1/chat/completions", json={"model": "fakey", "messages": [
        {"role": "user", "content": "x" * 5000}]})
    assert resp.status == 413 and resp.headers["x-should-retry"] == "false"
    assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}


async def test_unknown_routes_and_methods_in_the_envelope(sdk):
    _, client = await sdk()
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        resp = await client.request(method, path)
        assert resp.status == status
        assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("stream", [False, True])
async def test_an_empty_reply(sdk, upstream, stream):
    oa, _ = await sdk()
    upstream.push(reply())
    r = await oa.chat.completions.create(model="fakey", messages=HI, stream=stream)
    if stream:
        chunks = [c async for c in r]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "stop"


async def test_rate_limit(sdk, upstream):
    oa, _ = await sdk("[limits]\nmessages_per_minute = 1")
    await oa.chat.completions.create(model="fakey", messages=HI)
    with pytest.raises(openai.RateLimitError) as exc:
        await oa.chat.completions.create(model="fakey", messages=HI)
    assert int(exc.value.response.headers["Retry-After"]) >= 1
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_failure_before_the_first_token_is_a_502_never_retried(sdk, upstream, stream):
    sent = []
    oa, client = await sdk(max_retries=2, sent=sent)  # the SDK's default: x-should-retry: false must stop it
    upstream.push(error(500, "boom"))
    with pytest.raises(openai.APIStatusError) as exc:
        await oa.chat.completions.create(model="fakey", messages=HI, stream=stream)
    assert exc.value.status_code == 502 and exc.value.response.headers["x-should-retry"] == "false"
    assert "answered 500" in exc.value.message and "sk-test" not in exc.value.message
    assert "127.0.0.1" not in exc.value.message  # neither the key nor the base_url
    assert len(upstream.requests) == 1 and len(sent) == 1 and settled(client)


async def test_upstream_timeout_is_a_504(sdk, upstream):
    oa, _ = await sdk("[providers.fake]\nfirst_token_timeout = 0.3")
    upstream.push(Script([], head_delay=30))
    with pytest.raises(openai.APIStatusError) as exc:
        await oa.chat.completions.create(model="fakey", messages=HI, stream=True)
    assert exc.value.status_code == 504 and exc.value.code == "upstream_timeout"


async def test_upstream_failure_after_the_first_token_is_an_error_event(sdk, upstream):
    oa, client = await sdk()
    failure = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
    upstream.push(Script([chunk("Partial ", role=True), failure]))
    stream = await oa.chat.completions.create(model="fakey", messages=HI, stream=True)
    got = []
    with pytest.raises(openai.APIError) as exc:
        async for c in stream:
            got.append(c.choices[0].delta.content or "")
    assert "".join(got) == "Partial "
    assert "mid-reply" in exc.value.message
    assert settled(client)


# --------------------------------------------------------------------------- a client that leaves

async def test_leaving_mid_stream_closes_the_upstream(sdk, upstream):
    oa, client = await sdk()
    upstream.push(Script([chunk("first", role=True), "hang"]))
    stream = await oa.chat.completions.create(model="fakey", messages=HI, stream=True)
    async for c in stream:
        if c.choices and c.choices[0].delta.content:
            break
    await stream.close()
    await upstream.wait_closed(1, timeout=1.0)
    assert upstream.cut_by_client == 1
    await _eventually(lambda: settled(client))


@pytest.mark.parametrize("stream", [False, True])
async def test_leaving_before_the_first_token_closes_the_upstream(sdk, upstream, stream):
    oa, client = await sdk()
    upstream.push(Script(["hang"]))
    task = asyncio.create_task(oa.chat.completions.create(model="fakey", messages=HI, stream=stream))
    await upstream.wait_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await upstream.wait_closed(1, timeout=1.0)
    assert upstream.cut_by_client == 1
    await _eventually(lambda: settled(client))


async def test_leaving_is_noticed_without_handler_cancellation(upstream, tmp_path):
    """aiohttp's default (handler_cancellation off): the handler's own watch stops the turn."""
    path = tmp_path / "nexlm.toml"
    path.write_text(extra_config(upstream.url, ""))
    app = create_app(load_settings(str(path), env={}))
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    upstream.push(Script(["hang"]))
    try:
        async with aiohttp.ClientSession() as http:
            task = asyncio.create_task(http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                                 json={"model": "fakey", "messages": HI}))
            await upstream.wait_requests(1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await upstream.wait_closed(1, timeout=1.0)
        await _eventually(lambda: app[CONVERSATIONS].limiter.running_total == 0)
    finally:
        await runner.cleanup()


async def _eventually(predicate, timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)



async def test_shutdown_ends_running_v1_turns_after_the_grace(sdk, upstream):
    oa, client = await sdk()
    upstream.push(Script([chunk("first", role=True), "hang"]))
    stream = await oa.chat.completions.create(model="fakey", messages=HI, stream=True)
    first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    await client.app[GATEWAY].close(0.05)
    await upstream.wait_closed(1, timeout=1.0)
    with pytest.raises(openai.APIError) as exc:
        async for _ in stream:
            pass
    assert "restarting" in exc.value.message  # told in the stream, not cut
    assert settled(client)
    with pytest.raises(openai.APIStatusError) as exc:  # and no new turn starts
        await oa.chat.completions.create(model="fakey", messages=HI)
    assert exc.value.status_code == 503 and "Retry-After" in exc.value.response.headers



async def test_through_app_py_leaving_and_sigterm(upstream, tmp_path):
    """``python app.py`` as users run it: a client leaving mid-stream closes the upstream, and
    SIGTERM ends a running /v1 stream with an error event after the grace, then exits cleanly."""
    cfg = tmp_path / "nexlm.toml"
    cfg.write_text(extra_config(upstream.url, "[server]\nshutdown_grace_seconds = 0.3"))
    port = free_port()
    upstream.push(Script([chunk("one", role=True), "hang"]), Script([chunk("two", role=True), "hang"]))
    proc = await spawn_app(cfg, port)
    oa = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                            http_client=openai.DefaultAsyncHttpxClient(trust_env=False))
    try:
        async with asyncio.timeout(15):
            assert b"NexLM is running" in await proc.stdout.readline()
        stream = await oa.chat.completions.create(model="fakey", messages=HI, stream=True)
        async for c in stream:
            if c.choices and c.choices[0].delta.content:
                break
        await stream.close()
        await upstream.wait_closed(1, timeout=1.0)

        stream = await oa.chat.completions.create(model="fakey", messages=HI, stream=True)
        got = []
        with pytest.raises(openai.APIError) as exc:
            async for c in stream:
                got.append(c.choices[0].delta.content or "")
                if got[-1] == "two":
                    proc.send_signal(signal.SIGTERM)
        assert "".join(got) == "two" and "restarting" in exc.value.message
        await upstream.wait_closed(2, timeout=2.0)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
        stderr = (await proc.stderr.read()).decode()
        assert "Traceback" not in stderr and "sk-test-secret-key-123" not in stderr, stderr
    finally:
        await oa.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_origins_programs_and_listed_pages(sdk, upstream):
    """Programs send no Origin: allowed. A listed page gets CORS (preflight without the token,
    then Access-Control-Allow-Origin); any other origin is refused before anything runs."""
    _, client = await sdk(f'[auth]\ntokens = ["{TOKEN}"]\n[server]\nallowed_origins = ["https://ui.example"]')
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "fakey", "messages": HI}
    resp = await client.post("/v1/chat/completions", json=body, headers=auth)
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
    pre = await client.options("/v1/chat/completions", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert pre.status == 204 and pre.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    assert "x-stainless-os" in pre.headers["Access-Control-Allow-Headers"]
    resp = await client.post("/v1/chat/completions", json=body, headers={**auth, "Origin": "https://ui.example"})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    evil = await client.post("/v1/chat/completions", json=body, headers={**auth, "Origin": "https://evil.example"})
    assert evil.status == 403 and (await evil.json())["error"]["code"] == "forbidden_origin"
    assert "Access-Control-Allow-Origin" not in evil.headers
    assert len(upstream.requests) == 2


async def test_non_streamed_tool_calls_have_openais_shape(sdk, upstream):
    """Our chat.completion for a tool-calling reply has the fields, at every level, of OpenAI's own
    (tests/fixtures/openai-tool-calls-nonstream.json)."""
    _, client = await sdk()
    theirs = json.loads((FIXTURES / "openai-tool-calls-nonstream.json").read_text())
    upstream.push(from_fixture("openai-tool-calls-stream.txt"))
    resp = await client.post("/v1/chat/completions", json={"model": "fakey", "messages": HI, "tools": WEATHER})
    ours = await resp.json()
    assert set(ours) == set(theirs)
    [oc], [tc] = ours["choices"], theirs["choices"]
    assert set(oc) == set(tc) and set(oc["message"]) == set(tc["message"])
    assert set(oc["message"]["tool_calls"][0]) == set(tc["message"]["tool_calls"][0])
    assert set(oc["message"]["tool_calls"][0]["function"]) == set(tc["message"]["tool_calls"][0]["function"])
    assert oc["finish_reason"] == tc["finish_reason"] == "tool_calls" and oc["message"]["content"] is None
    assert ours["object"] == theirs["object"] and set(ours["usage"]) >= set(theirs["usage"])


async def test_a_provider_without_its_key_is_503_never_retried(sdk, upstream):
    sent = []
    oa, _ = await sdk('[providers.fake]\napi_key = ""\napi_key_env = "FAKE_TEST_KEY"', max_retries=2, sent=sent)
    with pytest.raises(openai.InternalServerError) as exc:
        await oa.chat.completions.create(model="fakey", messages=HI)
    assert exc.value.status_code == 503 and "set FAKE_TEST_KEY" in exc.value.message
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert upstream.requests == [] and len(sent) == 1  # the SDK did not retry


@pytest.mark.parametrize("stream", [False, True])
async def test_a_server_bug_is_still_openais_shape(sdk, upstream, stream, monkeypatch):
    """A provider that raises (a bug, never an upstream failure): 500 in the envelope before the
    first token, an error event after it; the reply slot is given back either way."""
    oa, client = await sdk()
    provider = client.app[REGISTRY].providers["fake"]
    real = provider.parse

    async def broken(chunks, watch=None):
        async for ev in real(chunks, watch):
            yield ev
            raise RuntimeError("a bug")

    monkeypatch.setattr(provider, "parse", broken)
    if stream:
        s = await oa.chat.completions.create(model="fakey", messages=HI, stream=True)
        with pytest.raises(openai.APIError) as exc:
            async for _ in s:
                pass
    else:
        with pytest.raises(openai.InternalServerError) as exc:
            await oa.chat.completions.create(model="fakey", messages=HI)
    assert "went wrong on the server" in exc.value.message and "a bug" not in exc.value.message
    await _eventually(lambda: settled(client))
