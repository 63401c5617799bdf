"""The seed article's page (``seed_page/``: the original NexLM's chat page) chatting with NexLM
through ``[compat] seed_frames``, served from another origin (its own 127.0.0.1 aiohttp server on
another port) and allowed by ``[server] allowed_origins``: the migration case, access control on.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("NEXLM_CHROMIUM", "/usr/bin/chromium")
assert os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK), \
    f"{CHROMIUM} not found: apt-get install chromium (or set NEXLM_CHROMIUM)"

from aiohttp import web  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

from browser_upstream import CODE_REPLY  # noqa: E402
from e2e_support import Server, browser, fake, make_page  # noqa: E402,F401  (fixtures are used by name)

pytestmark = pytest.mark.e2e

PAGE_DIR = Path(__file__).parent / "seed_page"
TOKEN = "seed-token-5b1e0c7d9a"


class SeedSite:
    """The seed page's own web server: static files on 127.0.0.1, in a thread with its loop."""

    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_static("/", PAGE_DIR)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="seed-site", daemon=True)
        self._thread.start()
        assert ready.wait(10), "the seed page's server did not start"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module")
def seed_site():
    s = SeedSite()
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def seed_server(tmp_path_factory, fake, seed_site):
    # The page's "deepseek" is this test's fake provider (the built-in DeepSeek is switched off).
    s = Server(tmp_path_factory.mktemp("seed"), fake.port, seed_site.origin, fake_aliases=("deepseek",), extra=(
        f'\n[compat]\nseed_frames = true\n\n[auth]\ntokens = ["{TOKEN}"]\n\n[providers.deepseek]\nenabled = false\n'))
    s.start()
    yield s
    s.stop()


def send(page, message: str, token: str) -> None:
    page.locator("#token").fill(token)
    page.locator("#message").fill(message)
    page.locator("#send").click()


def test_seed_page_chats_cross_origin_through_seed_frames(seed_site, seed_server, fake, make_page):
    ws_url = f"ws://127.0.0.1:{seed_server.port}/api/ai/chat/websocket"
    page = make_page(f"{seed_site.origin}/index.html?server={ws_url}")
    assert page.evaluate("location.origin") != seed_server.root  # another origin than NexLM's
    reply = page.locator("#reply")
    expect(page.locator("#state")).to_have_text("connected")

    # A wrong token: the page shows why, the server closes, nothing reached the model.
    before = len(fake.requests)
    send(page, "hello", "not-the-token-000")
    expect(reply).to_have_text("Error: A valid access token is required.")
    expect(page.locator("#state")).to_have_text("disconnected")
    assert len(fake.requests) == before

    # The right one: the page reconnects, and the reply streams in as plain text.
    send(page, "hello from the seed page", TOKEN)
    expect(reply).to_have_text("Echo: hello from the seed page")
    body = fake.requests[-1]
    assert body["model"] == "fake-model"
    assert body["messages"][-1] == {"role": "user", "content": "hello from the seed page"}

    # A multi-line reply with reasoning first: the box gets exactly the answer's text, no
    # reasoning and no JSON frames (the page appends whatever it is sent).
    send(page, "code please", TOKEN)
    page.wait_for_function("t => document.getElementById('reply').textContent === t", arg=CODE_REPLY + "\n",
                           timeout=20000)
    assert page.locator("#state").inner_text() == "connected"
    page.errors.check()
