"""A fake OpenAI-compatible upstream: a real aiohttp server on 127.0.0.1, scripted per request.

Each request to ``POST /v1/chat/completions`` takes the next script from the
queue (or the default) and plays it: status and headers, ``data:`` chunks in the
exact wire format, ``: keep-alive`` comments, pauses, a connection reset, a
hang. The server records every request body and header, and counts open and
closed upstream connections, which is how tests prove a stop really closed
the upstream request.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures"


def chunk(content: str | None = None, *, reasoning: str | None = None, finish: str | None = None,
          usage: dict | None = None, role: bool = False, model: str = "fake-model") -> bytes:
    delta: dict = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    obj = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1760000000, "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def usage_chunk(prompt: int = 5, completion: int = 3) -> bytes:
    obj = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1760000000, "model": "fake-model",
           "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                    "total_tokens": prompt + completion}}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


@dataclass
class Script:
    """What one request gets. ``steps`` are bytes to write, floats to pause (seconds),
    ``"reset"`` to abort the connection, ``"hang"`` to wait until the client leaves,
    or an ``asyncio.Event`` to wait for (a test's gate)."""

    steps: list = field(default_factory=list)
    status: int = 200
    headers: dict = field(default_factory=dict)
    body: bytes | None = None  # for an error status: the whole body
    head_delay: float = 0.0  # pause before sending status and headers


def reply(*pieces: str, finish: str = "stop", usage: bool = True, pause: float = 0.0,
          reasoning: tuple[str, ...] = ()) -> Script:
    steps: list = [chunk("", role=True)]
    for r in reasoning:
        steps += [chunk(reasoning=r)] + ([pause] if pause else [])
    for p in pieces:
        steps += [chunk(p)] + ([pause] if pause else [])
    steps.append(chunk(finish=finish))
    if usage:
        steps.append(usage_chunk(completion=len(pieces)))
    steps.append(DONE)
    return Script(steps)


def error(status: int, message: str, headers: dict | None = None, err_type: str = "error") -> Script:
    body = json.dumps({"error": {"message": message, "type": err_type, "param": None, "code": None}}).encode()
    return Script(status=status, body=body, headers=headers or {})


def from_fixture(name: str) -> Script:
    """A recorded or documented response, byte for byte: with its HTTP head if the file has one."""
    raw = (FIXTURES / name).read_bytes()
    if raw.startswith(b"HTTP/1.1 "):
        head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
        lines = head.decode().split("\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.lower() in ("content-type", "retry-after", "x-accel-buffering", "cache-control"):
                headers[k] = v.strip()
        if status >= 400:
            return Script(status=status, body=body, headers=headers)
        return Script([body], status=status, headers=headers)
    return Script([raw])


class FakeUpstream:
    def __init__(self) -> None:
        self.scripts: deque[Script] = deque()
        self.default: Script = reply("Hello", " world")
        self.requests: list[dict] = []  # {"body": ..., "headers": ...}
        self.open = 0  # requests whose connection is still open
        self.closed = 0  # requests that ended (finished or cut by the client)
        self.cut_by_client = 0  # requests the client went away from before the end
        self._waiters: list[tuple[object, asyncio.Future]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def push(self, *scripts: Script) -> None:
        self.scripts.extend(scripts)

    async def _wait(self, predicate, timeout: float) -> None:
        if predicate():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, fut))
        try:
            async with asyncio.timeout(timeout):
                await fut
        finally:
            self._waiters = [(p, f) for p, f in self._waiters if f is not fut]

    def _changed(self) -> None:
        for predicate, fut in self._waiters:
            if not fut.done() and predicate():
                fut.set_result(None)

    async def wait_closed(self, n: int, timeout: float = 5.0) -> None:
        """Until ``n`` requests have ended on the upstream side."""
        await self._wait(lambda: self.closed >= n, timeout)

    async def wait_requests(self, n: int, timeout: float = 5.0) -> None:
        await self._wait(lambda: len(self.requests) >= n, timeout)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        self.requests.append({"body": parsed, "headers": dict(request.headers)})
        script = self.scripts.popleft() if self.scripts else self.default
        self.open += 1
        self._changed()
        try:
            if script.head_delay:
                await asyncio.sleep(script.head_delay)
            if script.status >= 400:
                return web.Response(status=script.status, body=script.body or b"",
                                    headers={"Content-Type": "application/json", **script.headers})
            resp = web.StreamResponse(status=script.status, headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **script.headers})
            await resp.prepare(request)
            for step in script.steps:
                if isinstance(step, bytes):
                    await resp.write(step)
                elif isinstance(step, (int, float)):
                    await asyncio.sleep(step)
                elif isinstance(step, asyncio.Event):
                    await step.wait()
                elif step == "reset":
                    request.transport.abort()
                    return resp
                elif step == "hang":
                    await asyncio.Event().wait()
            await resp.write_eof()
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.cut_by_client += 1
            raise
        finally:
            self.open -= 1
            self.closed += 1
            self._changed()
