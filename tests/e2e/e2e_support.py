"""Fixtures and helpers for the browser tests: the real server (``python app.py``) in a
subprocess, a fake OpenAI-compatible upstream (browser_upstream.py) in a thread of the test
process, a page on a second origin that frames the chat, and Debian's Chromium driven by
Playwright. Everything listens on 127.0.0.1 only.

The fixtures live here rather than in a conftest.py (test modules import them), so that
``import conftest`` elsewhere in tests/ keeps meaning tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import tempfile
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("NEXLM_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
# The README's screenshots are refreshed only when asked (NEXLM_SCREENSHOTS=1), so a test run
# leaves the work tree clean; otherwise they go to a scratch folder and are still taken.
SCREENSHOTS = (ROOT / "docs" / "screenshots" if os.environ.get("NEXLM_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / "nexlm-screenshots")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

from browser_upstream import FakeUpstream  # noqa: E402




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, method: str = "GET", body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, None


class Server:
    """``python app.py`` on a fixed port, so it can be killed and started again."""

    def __init__(self, tmp: Path, upstream_port: int, parent_origin: str, extra: str = "",
                 base_path: str = "", local: bool = False, fake_aliases: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}{base_path}/"
        self.config = tmp / f"nexlm-{self.port}.toml"
        self.config.write_text(textwrap.dedent(f"""\
            [server]
            frame_ancestors = ["{parent_origin}"]
            allowed_origins = ["{parent_origin}"]
            shutdown_grace_seconds = 0.5
            base_path = "{base_path}"

            [chat]
            default_model = "fake/fake-model"
            resume_grace_seconds = 30

            [limits]
            messages_per_minute = 100000
            max_replies_per_client = 100
            max_sessions_per_client = 10000
            sessions_per_minute = 100000

            [providers.fake]
            kind = "openai"
            base_url = "http://127.0.0.1:{upstream_port}/v1"
            models = ["fake-model", "fake-reasoner"]
            aliases = {json.dumps(list(fake_aliases))}

            [providers.offline]
            kind = "openai"
            base_url = "http://127.0.0.1:{upstream_port}/v1"
            api_key_env = "NEXLM_TEST_UNSET_KEY"
            models = ["offline-model"]

            [providers.local]
            enabled = {"true" if local else "false"}
            """) + extra)
        self.log = tmp / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NEXLM_CONFIG", "NEXLM_TOKENS", "NEXLM_TEST_UNSET_KEY")}
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--config", str(self.config), "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the in-memory sessions are gone, as after a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def session(self, sid: str):
        return http_json(f"{self.url}api/sessions/{sid}")


class ParentSite:
    """A page on another origin (another port) that frames the chat page."""

    def __init__(self) -> None:
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.target = ""
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = (f"<!doctype html><title>Intranet portal</title><h1>Portal</h1>"
                        f"<iframe id=chat title=chat src=\"{site.target}\" width=420 height=640></iframe>").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def fake():
    f = FakeUpstream()
    f.start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def parent_site():
    p = ParentSite()
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, fake, parent_site):
    s = Server(tmp_path_factory.mktemp("nexlm"), fake.port, parent_site.origin)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def own_server(tmp_path, fake, parent_site):
    """A server of the test's own, for tests that kill and restart it."""
    s = Server(tmp_path, fake.port, parent_site.origin)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class PageErrors(list):
    def check(self):
        assert not self, "errors in the page:\n" + "\n".join(self)


@pytest.fixture
def make_page(browser):
    """A fresh browser context (empty localStorage) and page; page errors fail the test."""
    contexts = []

    def make(url: str, **ctx_args):
        ctx_args.setdefault("viewport", {"width": 1280, "height": 860})
        ctx = browser.new_context(**ctx_args)
        contexts.append(ctx)
        page = ctx.new_page()
        errors = PageErrors()
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: errors.append(f"console.error: {m.text}")
                if m.type == "error" and "WebSocket" not in m.text and "Failed to load resource" not in m.text
                else None)
        page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
        page.errors = errors
        page.set_default_timeout(15000)
        if url:
            page.goto(url)
        return page

    yield make
    for ctx in contexts:
        ctx.close()
