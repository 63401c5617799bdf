"""A scriptable fake OpenAI-compatible upstream for the browser tests.

It speaks the real streaming format (``data: {chunk}`` lines, ``[DONE]``) and picks
what to say from the last user message, so a test chooses the reply by what it types:

- ``slow ...``      a long reply, one word every 60 ms (for stop / reconnect tests)
- ``long N``        N numbered words as fast as possible
- ``longcode N``    one Python code block of N lines, fast
- ``code ...``      reasoning first (``reasoning_content``), then markdown with a table,
                    a Python code block and a formula
- ``xss ...``       a reply that carries ``<img src=x onerror=...>`` and ``<script>``
- ``fail ...``      HTTP 500 with a JSON error body
- anything else     ``Echo: <message>`` streamed in small pieces

Every request body is recorded (``GET /_requests`` returns them, ``DELETE /_requests``
clears them). Run by itself for manual checks: ``python tests/e2e/browser_upstream.py 9100``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading

from aiohttp import web

CODE_REPLY = """Here is a quick comparison and an example.

| Language | Typing | Speed |
|---|---|---|
| Python | dynamic | moderate |
| Rust | static | fast |

```python
def merge(a: list[int], b: list[int]) -> list[int]:
    \"\"\"Merge two sorted lists.\"\"\"
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]
```

The roots of $x^2 - 5x + 6 = 0$ are given by

$$x = \\frac{5 \\pm \\sqrt{25 - 24}}{2}$$

so **x = 2** or **x = 3**. See [the docs](https://docs.python.org/3/) for more.
"""

CODE_REASONING = ("The user wants a comparison table and a merge function. "
                  "I should show a table, then a typed Python function, then solve the quadratic "
                  "with the formula and keep it short.")

XSS_REPLY = ("Careful: <img src=x onerror=\"window.__xss=1\"> and <script>window.__xss=2</script> "
             "and a [link](javascript:window.__xss=3) and ![pic](http://127.0.0.1:1/leak.png)\n\n"
             "<iframe src=\"javascript:window.__xss=4\"></iframe>\n\n"
             "<svg onload=\"window.__xss=5\"></svg> done.")


def chunk(model: str, delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    body = {"id": "fake-1", "object": "chat.completion.chunk", "created": 1760000000, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def pieces(text: str, size: int = 3) -> list[str]:
    words = text.split(" ")
    out = []
    for i in range(0, len(words), size):
        out.append(" ".join(words[i:i + size]) + (" " if i + size < len(words) else ""))
    return out


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/_requests", self.get_requests)
        self.app.router.add_delete("/_requests", self.clear_requests)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.open_streams = 0

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def get_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests)

    async def clear_requests(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.json_response({"ok": True})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        model = body.get("model", "fake-model")
        last = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        word = last.split(" ", 1)[0].lower()
        if word == "fail":
            return web.json_response({"error": {"message": "The fake upstream was told to fail.",
                                                "type": "server_error", "code": "fake"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.open_streams += 1
        try:
            reasoning: list[str] = []
            delay = 0.015
            if word == "slow":
                text = " ".join(f"word{i}" for i in range(1, 400))
                parts = [w + " " for w in text.split(" ")]
                delay = 0.06
            elif word == "long":
                try:
                    n = int(last.split()[1])
                except (IndexError, ValueError):
                    n = 2000
                parts = [f"w{i} " if i % 40 else f"w{i}\n\n" for i in range(1, n + 1)]
                delay = 0
            elif word == "longcode":
                try:
                    n = int(last.split()[1])
                except (IndexError, ValueError):
                    n = 2000
                parts = ["```python\n"] + [f"value_{i} = compute({i}, 'text', [1, 2, 3])  # line {i}\n"
                                           for i in range(1, n + 1)] + ["```\n"]
                delay = 0
            elif word == "code":
                reasoning = pieces(CODE_REASONING, 2)
                parts = [line + "\n" for line in CODE_REPLY.split("\n")]
                delay = 0.02
            elif word == "xss":
                parts = pieces(XSS_REPLY, 4)
            else:
                parts = pieces(f"Echo: {last}", 2)
            await resp.write(chunk(model, {"role": "assistant", "content": ""}))
            for r in reasoning:
                await resp.write(chunk(model, {"content": None, "reasoning_content": r}))
                await asyncio.sleep(delay)
            for i, p in enumerate(parts):
                await resp.write(chunk(model, {"content": p}))
                if delay:
                    await asyncio.sleep(delay)
                elif i % 20 == 0:
                    await asyncio.sleep(0.002)  # fast, but spread over many frames
            n_tokens = len(parts) + len(reasoning)
            await resp.write(chunk(model, {}, "stop",
                                   {"prompt_tokens": 10, "completion_tokens": n_tokens, "total_tokens": 10 + n_tokens}))
            await resp.write(b"data: [DONE]\n\n")
        finally:
            self.open_streams -= 1
        return resp

    # -- running in a background thread (tests) ---------------------------------------

    def start(self, port: int = 0) -> int:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self.runner = web.AppRunner(self.app)
            loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", port)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self.port

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


if __name__ == "__main__":
    fake = FakeUpstream()
    port = fake.start(int(sys.argv[1]) if len(sys.argv) > 1 else 9100)
    print(f"fake upstream on http://127.0.0.1:{port}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()
