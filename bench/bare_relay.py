"""A bare aiohttp relay: the floor a Python gateway starts from on this machine.

    python bench/run.py --app bench/bare_relay.py     # the whole suite against it

Not part of NexLM. About a hundred lines of the obvious aiohttp code: upstream
SSE -> one WebSocket frame (or SSE event) per upstream read's tokens, no
sessions beyond a reset, no limits, no logging. It speaks just enough of
NexLM's protocol for the benchmark (``/ws`` session/chat/stop/reset,
``POST /sse``, ``POST /v1/chat/completions`` streaming and not, ``/healthz``,
``/api/metrics``, ``DELETE /api/sessions/{id}``), so the suite can put NexLM's
figures next to what plain aiohttp costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tomllib
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import use_uvloop  # noqa: E402

dumps = json.JSONEncoder(separators=(",", ":")).encode
CLIENT = web.AppKey("client", aiohttp.ClientSession)
URL = web.AppKey("url", str)


async def upstream_tokens(app, message: str):
    body = {"model": "fake-model", "messages": [{"role": "user", "content": message}], "stream": True,
            "stream_options": {"include_usage": True}}
    async with app[CLIENT].post(app[URL], json=body) as resp:
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            text = []
            for ev in events:
                if not ev.startswith(b"data: "):
                    continue
                data = ev[6:]
                if data == b"[DONE]":
                    break
                ch = json.loads(data).get("choices")
                if ch and ch[0].get("delta", {}).get("content"):
                    text.append(ch[0]["delta"]["content"])
            if text:
                yield "".join(text)


async def reply(app, message: str, send) -> None:
    rid = secrets.token_urlsafe(6)
    await send({"type": "start", "reply": rid, "model": "fake/fake-model"})
    finish = "stop"
    try:
        async for text in upstream_tokens(app, message):
            await send({"type": "delta", "reply": rid, "content": text})
    except asyncio.CancelledError:
        finish = "stopped"
    await send({"type": "done", "reply": rid, "finish_reason": finish, "usage": None})


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    sid = secrets.token_urlsafe(12)
    session = {"type": "session", "session": sid, "model": "fake/fake-model", "params": {}, "history": []}
    await ws.send_str(dumps(session))
    task: asyncio.Task | None = None

    async def send(ev):
        await ws.send_str(dumps(ev))

    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        frame = json.loads(msg.data)
        kind = frame.get("type")
        if kind == "chat":
            if task is not None and not task.done():
                await send({"type": "error", "code": "busy", "message": "busy"})
                continue
            task = asyncio.create_task(reply(request.app, frame.get("message", ""), send))
        elif kind in ("stop", "reset") and task is not None:
            task.cancel()
            await asyncio.wait([task])
        if kind == "reset":
            await send(session)
    if task is not None:
        task.cancel()
    return ws


async def sse_handler(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(ev):
        await resp.write(f"event: {ev['type']}\ndata: {dumps(ev)}\n\n".encode())

    await send({"type": "session", "session": secrets.token_urlsafe(12), "history": []})
    await reply(request.app, body.get("message", ""), send)
    return resp


def completion_chunk(cid: str, model: str, delta: dict, finish=None) -> bytes:
    return b"data: " + dumps({"id": cid, "object": "chat.completion.chunk", "created": 0, "model": model,
                              "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).encode() + b"\n\n"


async def v1_handler(request: web.Request) -> web.StreamResponse:
    """The OpenAI format back out: the obvious re-encoding of each upstream read's tokens."""
    body = await request.json()
    model, cid = body.get("model", "fake/fake-model"), "chatcmpl-" + secrets.token_urlsafe(9)
    message = body["messages"][-1]["content"]
    if not body.get("stream"):
        text = "".join([t async for t in upstream_tokens(request.app, message)])
        return web.json_response({"id": cid, "object": "chat.completion", "created": 0, "model": model,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                               "finish_reason": "stop"}]}, dumps=dumps)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(completion_chunk(cid, model, {"role": "assistant", "content": ""}))
    async for text in upstream_tokens(request.app, message):
        await resp.write(completion_chunk(cid, model, {"content": text}))
    await resp.write(completion_chunk(cid, model, {}, "stop") + b"data: [DONE]\n\n")
    return resp


async def ok(request):
    return web.json_response({"status": "ok"})


async def not_found(request):
    return web.json_response({"error": "not_found"}, status=404)


async def client_ctx(app):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        app[CLIENT] = s
        yield


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--port", type=int, default=8080)
    a = ap.parse_args()
    with open(a.config, "rb") as f:
        cfg = tomllib.load(f)
    base = next(iter(cfg["providers"].values()))["base_url"].rstrip("/")
    if cfg.get("server", {}).get("uvloop"):
        use_uvloop()
    app = web.Application()
    app[URL] = base + "/chat/completions"
    app.cleanup_ctx.append(client_ctx)
    app.router.add_get("/ws", ws_handler)
    app.router.add_post("/sse", sse_handler)
    app.router.add_post("/v1/chat/completions", v1_handler)
    app.router.add_get("/healthz", ok)
    app.router.add_get("/api/metrics", ok)
    app.router.add_delete("/api/sessions/{sid}", not_found)
    web.run_app(app, host="127.0.0.1", port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
