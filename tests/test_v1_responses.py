"""``POST /v1/responses`` with the official ``openai`` package as the client, over the fake upstream:
text, streaming (raw events and the SDK's stream helper), function calls, reasoning, errors
raising the SDK's own exceptions, stateful requests refused, a client leaving closing the upstream."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from fake_upstream import DONE, Script, chunk, error, from_fixture, reply
from openai import AsyncOpenAI

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}
TIME = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}
MODEL = "fake/fake-model"


def sdk(client, key: str = "unused") -> AsyncOpenAI:
    # trust_env off: no proxy from the environment between the SDK and 127.0.0.1
    return AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=key, max_retries=0,
                       http_client=openai.DefaultAsyncHttpxClient(trust_env=False))


@pytest.fixture
async def oai(client):
    c = sdk(client)
    yield c
    await c.close()


def sent(upstream, i: int = -1) -> dict:
    return upstream.requests[i]["body"]


async def test_non_stream_text(oai, upstream):
    r = await oai.responses.create(model=MODEL, input="Hi", instructions="Be brief.", max_output_tokens=50,
                                   temperature=0.5, store=False)
    assert r.status == "completed" and r.output_text == "Hello world"
    assert r.model == MODEL and r.instructions == "Be brief." and r.max_output_tokens == 50
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (5, 2, 7)
    body = sent(upstream)
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert body["max_tokens"] == 50 and body["temperature"] == 0.5
    assert "store" not in body and "instructions" not in body


async def test_an_alias_names_the_model(oai, upstream):
    r = await oai.responses.create(model="fakey", input="Hi")
    assert r.output_text == "Hello world" and r.model == MODEL


async def test_stream_events(oai, upstream):
    upstream.push(reply("Hel", "lo", "!"))
    stream = await oai.responses.create(model=MODEL, input="Hi", stream=True)
    events = [ev async for ev in stream]
    kinds = [e.type for e in events]  # the provider may merge deltas that arrived in one read: runs collapsed
    runs = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert runs == ["response.created", "response.in_progress", "response.output_item.added",
                    "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                    "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello!"
    assert events[-1].response.output_text == "Hello!" and events[-1].response.usage.output_tokens == 3


async def test_the_sdks_stream_helper(oai, upstream):
    upstream.push(reply("Par", "is"))
    async with oai.responses.stream(model=MODEL, input="Capital of France?") as s:
        deltas = [ev.delta async for ev in s if ev.type == "response.output_text.delta"]
        final = await s.get_final_response()
    assert "".join(deltas) == "Paris"
    assert final.output_text == "Paris" and final.status == "completed"


async def test_function_calls_streamed_through_the_stream_helper(oai, upstream):
    upstream.push(from_fixture("openai-tool-calls-stream.txt"))
    async with oai.responses.stream(model=MODEL, input="Weather and time in Paris?", tools=[WEATHER, TIME],
                                    tool_choice="auto") as s:
        arg_deltas = [ev.delta async for ev in s if ev.type == "response.function_call_arguments.delta"]
        final = await s.get_final_response()
    calls = [(o.type, o.call_id, o.name, json.loads(o.arguments)) for o in final.output]
    assert calls == [("function_call", "call_Wq1A9", "get_weather", {"location": "Paris"}),
                     ("function_call", "call_Zk7B2", "get_time", {"tz": "Europe/Paris"})]
    assert "".join(arg_deltas) == '{"location": "Paris"}{"tz": "Europe/Paris"}'
    assert final.usage.total_tokens == 123
    body = sent(upstream)
    assert body["tools"][0] == {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    assert body["tool_choice"] == "auto"


async def test_function_calls_non_stream_then_the_results_sent_back(oai, upstream):
    upstream.push(from_fixture("openai-tool-calls-stream.txt"))
    r = await oai.responses.create(model=MODEL, input="Weather?", tools=[WEATHER, TIME])
    assert [o.type for o in r.output] == ["function_call", "function_call"]
    assert r.output[0].arguments == '{"location": "Paris"}' and r.output[0].status == "completed"
    # The next turn, stateless: the whole conversation with the calls and their outputs.
    history = [{"role": "user", "content": "Weather?"}] + [o.model_dump(exclude_none=True) for o in r.output] + [
        {"type": "function_call_output", "call_id": "call_Wq1A9", "output": "18 C, sunny"},
        {"type": "function_call_output", "call_id": "call_Zk7B2", "output": "14:05"}]
    upstream.push(reply("Sunny, 18 C."))
    r2 = await oai.responses.create(model=MODEL, input=history, tools=[WEATHER, TIME])
    assert r2.output_text == "Sunny, 18 C."
    msgs = sent(upstream)["messages"]
    assert msgs[1]["role"] == "assistant" and [c["id"] for c in msgs[1]["tool_calls"]] == ["call_Wq1A9", "call_Zk7B2"]
    assert msgs[2:] == [{"role": "tool", "tool_call_id": "call_Wq1A9", "content": "18 C, sunny"},
                        {"role": "tool", "tool_call_id": "call_Zk7B2", "content": "14:05"}]


async def test_reasoning(oai, upstream):
    upstream.push(reply("42", reasoning=("Let me ", "think.")))
    stream = await oai.responses.create(model="fake/fake-reasoner", input="Answer?", stream=True)
    events = [ev async for ev in stream]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Let me think."
    final = events[-1].response
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "Let me think." and final.output_text == "42"
    upstream.push(reply("42", reasoning=("Hm.",)))
    r = await oai.responses.create(model="fake/fake-reasoner", input="Answer?")
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text == "Hm." and r.output_text == "42"


async def test_cut_off_by_max_output_tokens_is_incomplete(oai, upstream):
    upstream.push(reply("Once", " upon", finish="length"))
    r = await oai.responses.create(model=MODEL, input="A story", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "Once upon"


async def test_stateful_requests_are_refused(oai, upstream):
    with pytest.raises(openai.BadRequestError) as info:
        await oai.responses.create(model=MODEL, input="Hi", previous_response_id="resp_abc")
    assert info.value.status_code == 400 and "does not store responses" in info.value.message
    assert info.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:
        await oai.responses.create(model=MODEL, input="Hi", store=True)
    assert info.value.body["param"] == "store"
    with pytest.raises(openai.BadRequestError) as info:
        await oai.responses.create(model=MODEL, input="Hi", extra_body={"frobnicate": 1})
    assert "frobnicate" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        await oai.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}])
    assert "only function tools" in info.value.message
    assert upstream.requests == []


async def test_errors_raise_the_sdks_exceptions(oai, upstream, client):
    with pytest.raises(openai.NotFoundError):
        await oai.responses.create(model="fake/no-such-model", input="Hi")
    upstream.push(error(429, "Slow down", {"Retry-After": "7"}))
    with pytest.raises(openai.RateLimitError) as info:
        await oai.responses.create(model=MODEL, input="Hi", stream=True)
    assert info.value.response.headers["retry-after"]
    upstream.push(error(500, "upstream broke"))
    with pytest.raises(openai.APIStatusError) as info:
        await oai.responses.create(model=MODEL, input="Hi", stream=True)
    assert info.value.status_code == 502 and info.value.response.headers["x-should-retry"] == "false"
    assert "sk-test-secret-key-123" not in info.value.response.text
    r = await client.post("/v1/responses", data=b"{not json")
    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"


async def test_upstream_timeout_is_504(make_client, upstream):
    c = await make_client("[providers.fake]\nfirst_token_timeout = 0.3")
    upstream.push(Script(["hang"]))
    async with sdk(c) as oai:
        with pytest.raises(openai.APIStatusError) as info:
            await oai.responses.create(model=MODEL, input="Hi")
    assert info.value.status_code == 504


async def test_a_failure_after_the_first_token_is_response_failed(oai, upstream):
    upstream.push(from_fixture("in-stream-error.txt"))
    stream = await oai.responses.create(model=MODEL, input="Hi", stream=True)
    events = [ev async for ev in stream]
    assert events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.error.message
    assert failed.output[0].content[0].text == "Partial "
    upstream.push(from_fixture("in-stream-error.txt"))
    with pytest.raises(openai.APIStatusError) as info:  # not streamed: nothing was sent, so a real status
        await oai.responses.create(model=MODEL, input="Hi")
    assert info.value.status_code == 502


async def test_access_control_and_limits(make_client, upstream):
    c = await make_client('[auth]\ntokens = ["tok-A-7f3c9e"]\n[limits]\nmessages_per_minute = 1')
    async with sdk(c, "wrong") as bad, sdk(c, "tok-A-7f3c9e") as good:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.responses.create(model=MODEL, input="Hi")
        assert info.value.body["type"] == "authentication_error"  # OpenAI's envelope, not NexLM's
        assert (await good.responses.create(model=MODEL, input="Hi")).output_text == "Hello world"
        with pytest.raises(openai.RateLimitError) as info:
            await good.responses.create(model=MODEL, input="Hi")
        assert int(info.value.response.headers["retry-after"]) >= 1
    assert len(upstream.requests) == 1


async def test_a_client_leaving_mid_stream_closes_the_upstream(client, upstream):
    upstream.push(Script([chunk("", role=True), chunk("Hel"), "hang"]))
    r = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    seen = b""
    while b"response.output_text.delta" not in seen:
        seen += await r.content.readany()
    r.close()  # the client goes away
    await upstream.wait_closed(1)
    assert upstream.cut_by_client == 1


async def test_a_client_leaving_before_the_first_token_closes_the_upstream(client, upstream):
    upstream.push(Script(["hang"]), Script(["hang"]))
    for stream in (False, True):
        before = upstream.closed
        task = asyncio.create_task(client.post("/v1/responses", json={"model": MODEL, "input": "Hi",
                                                                       "stream": stream}))
        await upstream.wait_requests(before + 1)
        task.cancel()
        with pytest.raises((asyncio.CancelledError, aiohttp.ClientError)):
            await task
        await upstream.wait_closed(before + 1)
    assert upstream.cut_by_client == 2


async def test_an_upstream_without_usage_completes_with_usage_null(oai, upstream):
    upstream.push(Script([chunk("", role=True), chunk("ok"), chunk(finish="stop"), DONE]))
    r = await oai.responses.create(model=MODEL, input="Hi")
    assert r.output_text == "ok" and r.usage is None


async def test_a_codex_shaped_request(client, upstream):
    """What Codex CLI sends (store false, include, reasoning, prompt_cache_key, reasoning items back)."""
    upstream.push(from_fixture("openai-tool-calls-stream.txt"))
    body = {
        "model": MODEL, "instructions": "You are Codex.", "store": False, "stream": True,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Sandbox: on"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": None, "encrypted_content": None},
        ],
        "tools": [{**WEATHER, "strict": False}], "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "0c1f", "text": {"verbosity": "medium"},
    }
    r = await client.post("/v1/responses", json=body)
    assert r.status == 200
    text = await r.text()
    assert text.rstrip().split("\n")[-2] == "event: response.completed"
    up = sent(upstream)
    assert up["messages"] == [{"role": "system", "content": "You are Codex."},
                              {"role": "system", "content": "Sandbox: on"},
                              {"role": "user", "content": "Weather in Paris?"}]
    assert up["parallel_tool_calls"] is False and up["tools"][0]["function"]["strict"] is False
    assert not {"reasoning", "include", "prompt_cache_key", "store", "text", "input"} & set(up)


async def test_a_body_over_the_limit_is_413_in_openais_envelope(make_client, upstream):
    c = await make_client("[limits]\nmax_frame_bytes = 2000")
    async with sdk(c) as oai:
        with pytest.raises(openai.APIStatusError) as info:
            await oai.responses.create(model=MODEL, input="x" * 5000)
    assert info.value.status_code == 413 and "2000 bytes" in info.value.message
    assert upstream.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_leaving_is_noticed_without_handler_cancellation(upstream, tmp_path, stream):
    """aiohttp's default (handler_cancellation off): chat's Watch stops the turn here too, and the
    client's reply slot is given back."""
    from aiohttp import web
    from conftest import extra_config

    from nexlm.appkeys import CONVERSATIONS
    from nexlm.config import load_settings
    from nexlm.server import create_app

    path = tmp_path / "nexlm.toml"
    path.write_text(extra_config(upstream.url, ""))
    app = create_app(load_settings(str(path), env={}))
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    upstream.push(Script([chunk("", role=True), chunk("Hel"), "hang"] if stream else ["hang"]))
    try:
        async with aiohttp.ClientSession() as http:
            r = None
            if stream:  # the stream has started (a delta arrived), then the client goes
                r = await http.post(f"http://127.0.0.1:{port}/v1/responses",
                                    json={"model": MODEL, "input": "Hi", "stream": True})
                seen = b""
                while b"response.output_text.delta" not in seen:
                    seen += await r.content.readany()
                r.close()
            else:
                task = asyncio.create_task(http.post(f"http://127.0.0.1:{port}/v1/responses",
                                                     json={"model": MODEL, "input": "Hi"}))
                await upstream.wait_requests(1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        await upstream.wait_closed(1)
        assert upstream.cut_by_client == 1
        async with asyncio.timeout(5):
            while app[CONVERSATIONS].limiter.running_total:
                await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()


async def test_shutdown_ends_a_running_stream_with_response_failed(oai, client, upstream):
    from nexlm.appkeys import GATEWAY

    upstream.push(Script([chunk("", role=True), chunk("Hel"), "hang"]))
    stream = await oai.responses.create(model=MODEL, input="Hi", stream=True)
    async for ev in stream:
        if ev.type == "response.output_text.delta":
            break
    await client.app[GATEWAY].close(0.05)
    await upstream.wait_closed(1)
    rest = [ev async for ev in stream]
    assert rest[-1].type == "response.failed"
    assert "restarting" in rest[-1].response.error.message
    assert rest[-1].response.output[0].content[0].text == "Hel"
    with pytest.raises(openai.APIStatusError) as info:  # and no new turn starts
        await oai.responses.create(model=MODEL, input="Hi")
    assert info.value.status_code == 503 and "retry-after" in info.value.response.headers


async def test_stored_responses_do_not_exist(oai):
    for call in (oai.responses.retrieve("resp_abc"), oai.responses.delete("resp_abc"),
                 oai.responses.cancel("resp_abc"), oai.responses.input_items.list("resp_abc")):
        with pytest.raises(openai.NotFoundError) as info:
            await call
        assert "does not store responses" in info.value.message
