"""The embedded model through the real transports: zero-config default, /ws, /sse, stop,
two concurrent chats, and an event loop that keeps answering while the model generates."""

from __future__ import annotations

import asyncio
import json

import pytest

import llama_cpp  # noqa: F401  (part of the install: missing, these tests fail rather than skip)

from nexlm.config import EMBEDDED_MODEL, load_settings
from nexlm.server import create_app

pytestmark = pytest.mark.slow
LOCAL = f"local/{EMBEDDED_MODEL}"


@pytest.fixture
async def local_client(aiohttp_client, tmp_path):
    """The app exactly as `python app.py` starts it with no file and no keys (but a short grace)."""
    cfg = tmp_path / "n.toml"
    cfg.write_text("[chat]\nresume_grace_seconds = 0\n[limits]\nmax_replies_per_client = 4\n")
    return await aiohttp_client(create_app(load_settings(str(cfg), env={})))


async def recv(ws, timeout=120):
    return await ws.receive_json(timeout=timeout)


async def until_done(ws):
    frames = []
    while True:
        f = await recv(ws)
        frames.append(f)
        if f["type"] == "done":
            return frames


async def test_zero_config_default_is_the_embedded_model(local_client):
    data = await (await local_client.get("/api/models")).json()
    assert data["default"] == LOCAL
    local = next(m for m in data["models"] if m["id"] == LOCAL)
    assert local["available"] is True and "offline" in local["label"]
    assert local["label"] == "SmolLM2 135M Instruct, offline demo: small, English"


async def answer(client, prompt: str) -> tuple[str, dict]:
    """One turn at temperature 0 in a fresh session: (text, done)."""
    ws = await client.ws_connect("/ws")
    await recv(ws)
    await ws.send_json({"type": "chat", "message": prompt, "params": {"temperature": 0, "max_tokens": 96}})
    frames = await until_done(ws)
    await ws.close()
    return "".join(f["content"] for f in frames if f["type"] == "delta"), frames[-1]


@pytest.mark.parametrize("prompt, expect", [
    ("What is the capital of France? Answer in one sentence.", ("paris",)),
    ("Hello!", ("hello", "hi", "hey", "greetings")),
    ("What color is the sky on a clear day? Answer in one word.", ("blue",)),
    ("How many days are there in a week?", ("7", "seven")),
])
async def test_default_model_answers_simple_questions(local_client, prompt, expect):
    """The zero-config model is instruction-tuned: it answers, and ends its turn by itself."""
    text, done = await answer(local_client, prompt)
    assert any(word in text.lower() for word in expect), text
    assert done["finish_reason"] == "stop", (done, text)
    if len(prompt) > 20:  # a greeting may well answer "Hello!"; a question must not come back
        assert prompt.lower() not in text.lower(), "the prompt was echoed back"


async def test_second_turn_answers_the_second_question(local_client):
    ws = await local_client.ws_connect("/ws")
    await recv(ws)
    for prompt in ("What is the capital of France?", "What is the capital of Italy?"):
        await ws.send_json({"type": "chat", "message": prompt, "params": {"temperature": 0, "max_tokens": 96}})
        frames = await until_done(ws)
    text = "".join(f["content"] for f in frames if f["type"] == "delta")
    assert "rome" in text.lower() and frames[-1]["finish_reason"] == "stop", text
    await ws.close()


async def test_ws_streams_a_short_reply_then_keeps_context(local_client):
    ws = await local_client.ws_connect("/ws")
    assert (await recv(ws))["model"] == LOCAL
    await ws.send_json({"type": "chat", "message": "The capital of France is", "params": {"max_tokens": 6}})
    frames = await until_done(ws)
    assert frames[0]["type"] == "start" and frames[0]["model"] == LOCAL
    text = "".join(f["content"] for f in frames if f["type"] == "delta")
    done = frames[-1]
    assert text.strip(), "the model produced no text"
    assert done["finish_reason"] in ("stop", "length")
    assert 1 <= done["usage"]["completion_tokens"] <= 6
    await ws.send_json({"type": "chat", "message": "And of Italy?", "params": {"max_tokens": 4}})
    done2 = (await until_done(ws))[-1]
    # The second prompt carries the first turn: more prompt tokens than the first.
    assert done2["usage"]["prompt_tokens"] > done["usage"]["prompt_tokens"]
    await ws.close()


async def test_sse_streams_a_short_reply(local_client):
    resp = await local_client.get("/sse", params={"message": "One, two, three,", "max_tokens": "5"})
    assert resp.status == 200
    async with asyncio.timeout(120):
        body = await resp.text()
    events = [b.split("\n") for b in body.split("\n\n") if b.startswith("event:")]
    kinds = [e[0].removeprefix("event: ") for e in events]
    assert kinds[0] == "session" and kinds[1] == "start" and kinds[-1] == "done"
    assert "delta" in kinds
    done = json.loads(events[-1][1].removeprefix("data: "))
    assert done["finish_reason"] in ("stop", "length") and done["usage"]["completion_tokens"] <= 5


async def test_stop_mid_generation_keeps_the_text(local_client):
    ws = await local_client.ws_connect("/ws")
    sid = (await recv(ws))["session"]
    await ws.send_json({"type": "chat", "message": "Write a long story about a dragon.",
                        "params": {"max_tokens": 400}})
    sent = ""
    while True:
        f = await recv(ws)
        if f["type"] == "delta":
            sent += f["content"]
            break
    await ws.send_json({"type": "stop"})
    while True:
        f = await recv(ws, timeout=10)
        if f["type"] == "delta":
            sent += f["content"]
        if f["type"] == "done":
            break
    assert f["finish_reason"] == "stopped"
    hist = (await (await local_client.get(f"/api/sessions/{sid}")).json())["history"]
    assert hist[-1]["content"] == sent and hist[-1]["finish_reason"] == "stopped"
    # far fewer than the 400 tokens asked for: the stop really ended generation
    await ws.send_json({"type": "chat", "message": "Hi", "params": {"max_tokens": 2}})
    assert (await until_done(ws))[-1]["finish_reason"] in ("stop", "length")
    await ws.close()


async def test_two_concurrent_chats_both_finish(local_client):
    async def one(prompt):
        ws = await local_client.ws_connect("/ws")
        await recv(ws)
        await ws.send_json({"type": "chat", "message": prompt, "params": {"max_tokens": 4}})
        frames = await until_done(ws)
        await ws.close()
        return frames[-1]

    a, b = await asyncio.gather(one("Red, green,"), one("Monday, Tuesday,"))
    assert a["finish_reason"] in ("stop", "length") and b["finish_reason"] in ("stop", "length")


async def first_delta(ws) -> list[dict]:
    frames = []
    while not frames or frames[-1]["type"] != "delta":
        frames.append(await recv(ws))
    return frames


LONG = {"type": "chat", "message": "Write a very long story about a lighthouse keeper and the sea.",
        "params": {"max_tokens": 500}}


async def test_a_waiting_reply_is_told_its_place_over_ws_and_sse(local_client):
    holder = await local_client.ws_connect("/ws")
    await recv(holder)
    await holder.send_json(LONG)
    await first_delta(holder)  # it holds the model's one slot now
    waiter = await local_client.ws_connect("/ws")
    await recv(waiter)
    await waiter.send_json({"type": "chat", "message": "Hi", "params": {"max_tokens": 3}})
    start, status = await recv(waiter), await recv(waiter)
    assert start["type"] == "start"
    assert status == {"type": "status", "reply": start["reply"], "state": "queued", "position": 1,
                      "seq": start["seq"] + 1}
    sse = await local_client.get("/sse", params={"message": "Hey", "max_tokens": "3"})
    await holder.send_json({"type": "stop"})
    frames = await until_done(waiter)
    assert frames[-1]["finish_reason"] in ("stop", "length") and any(f["type"] == "delta" for f in frames)
    async with asyncio.timeout(120):
        body = await sse.text()
    kinds = [b.split("\n")[0].removeprefix("event: ") for b in body.split("\n\n") if b.startswith("event:")]
    assert kinds[:3] == ["session", "start", "status"] and kinds[-1] == "done"
    assert kinds.index("status") < kinds.index("delta")
    await holder.close()
    await waiter.close()


async def test_an_abandoned_reply_gives_the_slot_to_a_waiting_one(aiohttp_client, tmp_path):
    """Its client left (the resume grace would keep it 30 s): the next user need not wait for it."""
    cfg = tmp_path / "n.toml"
    cfg.write_text("[chat]\nresume_grace_seconds = 30\n")
    client = await aiohttp_client(create_app(load_settings(str(cfg), env={})))
    gone = await client.ws_connect("/ws")
    sid = (await recv(gone))["session"]
    await gone.send_json(LONG)
    await first_delta(gone)
    await gone.close()  # no listener now: resumable for 30 s, unless someone needs the model
    ws = await client.ws_connect("/ws")
    await recv(ws)
    await ws.send_json({"type": "chat", "message": "Hi", "params": {"max_tokens": 3}})
    frames = await until_done(ws)
    assert any(f["type"] == "delta" for f in frames) and frames[-1]["finish_reason"] in ("stop", "length")
    abandoned = (await (await client.get(f"/api/sessions/{sid}")).json())["history"][-1]
    assert abandoned["role"] == "assistant" and abandoned["finish_reason"] == "interrupted"
    assert abandoned["content"], "the text it had streamed is kept"
    await ws.close()


async def test_a_reply_someone_listens_to_keeps_the_slot(local_client):
    holder = await local_client.ws_connect("/ws")
    await recv(holder)
    await holder.send_json({**LONG, "params": {"max_tokens": 24}})
    await first_delta(holder)
    waiter = await local_client.ws_connect("/ws")
    await recv(waiter)
    await waiter.send_json({"type": "chat", "message": "Hi", "params": {"max_tokens": 3}})
    assert (await until_done(holder))[-1]["finish_reason"] in ("stop", "length")
    assert (await until_done(waiter))[-1]["finish_reason"] in ("stop", "length")
    await holder.close()
    await waiter.close()


async def test_loop_answers_while_the_model_generates(local_client):
    """Requests are served *during* generation (the reply still running), not only between
    replies: a generation that held the event loop would leave no such answers."""
    ws = await local_client.ws_connect("/ws")
    await recv(ws)
    await ws.send_json({"type": "chat", "message": "Count to one hundred:", "params": {"max_tokens": 40}})
    assert (await recv(ws))["type"] == "start"
    done = asyncio.ensure_future(until_done(ws))
    answered_mid_reply = 0
    try:
        while not done.done():
            metrics = await (await local_client.get("/api/metrics")).json()
            answered_mid_reply += metrics["replies_running"] == 1 and not done.done()
            await asyncio.sleep(0.02)  # pacing, so the poll does not starve the generation thread
    finally:
        frames = await done
    assert frames[-1]["finish_reason"] in ("stop", "length")
    assert answered_mid_reply >= 5
    await ws.close()


async def test_v1_with_the_embedded_model(local_client):
    """/v1 on the embedded model: content parts and the developer role as it reads them (text),
    the same answer as the page's at temperature 0; tools refused with a clear 400."""
    page_text, _ = await answer(local_client, "What is the capital of France? Answer in one sentence.")
    body = {"model": "local", "temperature": 0, "max_tokens": 96, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France? "
                                                             "Answer in one sentence."}]}]}
    resp = await local_client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    r = await resp.json()
    assert r["model"] == LOCAL and r["choices"][0]["message"]["content"] == page_text
    assert r["usage"]["completion_tokens"] > 0
    resp = await local_client.post("/v1/chat/completions", json={**body, "stream": True, "messages": [
        {"role": "developer", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]})
    assert resp.status == 200 and "[DONE]" in await resp.text()
    tools = [{"type": "function", "function": {"name": "f"}}]
    resp = await local_client.post("/v1/chat/completions", json={**body, "tools": tools})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["param"] == "tools" and "cannot call tools" in err["message"]
