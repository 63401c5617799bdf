"""Several real ``python app.py`` processes sharing one redis-server, and a real nginx in front.

``Instances`` starts N NexLM processes with ``[store] kind = "redis"`` against the test's fake
upstream (which runs in the test process, so its gates pace every reply). ``Nginx`` starts
Debian's nginx on a free loopback port with ``nginx_conf`` (round robin over the instances,
WebSocket upgrade headers, ``proxy_buffering off`` for SSE: the config README shows).
``Sock`` is a WebSocket client that keeps every frame it got.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp
from conftest import extra_config
from invariants import free_port, spawn_app
from redis_servers import stop_process, wait_until


class Instances:
    def __init__(self, tmp_path: Path, upstream_url: str, redis_url: str, n: int = 2, extra: str = "") -> None:
        self.cfg = tmp_path / "nexlm.toml"
        self.cfg.write_text(extra_config(upstream_url, f'[store]\nkind = "redis"\nurl = "{redis_url}"\n'
                                                       f"[chat]\nresume_grace_seconds = 30\n{extra}"))
        self.n = n
        self.ports = [free_port() for _ in range(n)]
        self.procs: list[asyncio.subprocess.Process] = []

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    async def __aenter__(self) -> "Instances":
        for port in self.ports:
            self.procs.append(await spawn_app(self.cfg, port))
        for proc in self.procs:
            async with asyncio.timeout(30):
                line = await proc.stdout.readline()
            assert b"NexLM is running" in line, (line, (await proc.stderr.read())[-2000:])
        return self

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)  # (exits with -9: not checked for a clean stop)

    async def __aexit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if exc[0] is None:  # a clean run: every instance not killed by the test stopped cleanly
            for i, proc in enumerate(self.procs):
                if proc.returncode != -9:
                    err = await self.stderr(i)
                    assert proc.returncode == 0 and "Traceback" not in err, (i, proc.returncode, err[-3000:])

    async def stderr(self, i: int) -> str:
        return (await self.procs[i].stderr.read()).decode(errors="replace")


def nginx_conf(listen: int, backends: list[int], prefix: Path) -> str:
    """The README's nginx config (round robin, no sticky sessions), with test paths."""
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    temp = "\n".join(f"    {kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
{temp}
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    upstream nexlm {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://nexlm;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, prefix: Path, backends: list[int]) -> None:
        self.prefix = prefix
        prefix.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(self.port, backends, prefix))
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen([binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def listening() -> bool:
            import socket

            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        try:
            wait_until(listening, f"nginx on {self.port}", self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)


class Sock:
    """A /ws client keeping every frame it got, in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict] = []

    @classmethod
    async def open(cls, cs: aiohttp.ClientSession, url: str) -> "Sock":
        return cls(await cs.ws_connect(url))

    async def next(self, timeout: float = 10.0) -> dict:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"socket ended: {msg.type} {self.ws.close_code}")
        frame = json.loads(msg.data)
        self.frames.append(frame)
        return frame

    async def until(self, pred, timeout: float = 10.0) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next(timeout)
                if pred(frame):
                    return frame

    async def send(self, obj: dict) -> None:
        await self.ws.send_str(json.dumps(obj))

    def events(self, rid: str) -> list[dict]:
        """This reply's numbered events, as received."""
        return [f for f in self.frames if f.get("reply") == rid and "seq" in f]

    def text(self, rid: str) -> str:
        return "".join(f["content"] for f in self.events(rid) if f["type"] == "delta")


def is_delta(text: str):
    return lambda f: f["type"] == "delta" and f["content"].endswith(text)
