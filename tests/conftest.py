"""Shared fixtures: a fake upstream on 127.0.0.1 and a NexLM app configured to use it."""

from __future__ import annotations

import asyncio
import json

import pytest

from fake_upstream import FakeUpstream
from nexlm.config import load_settings
from nexlm.server import create_app



@pytest.fixture
async def upstream():
    up = FakeUpstream()
    await up.start()
    yield up
    await up.close()


@pytest.fixture
def make_client(aiohttp_client, upstream, tmp_path):
    """``await make_client(extra_toml)`` -> a test client for an app talking to ``upstream``."""

    async def make(extra: str = "", env: dict | None = None, **kw):
        path = tmp_path / "nexlm.toml"
        path.write_text(extra_config(upstream.url, extra))
        settings = load_settings(str(path), env=env or {})
        return await aiohttp_client(create_app(settings), **kw)

    return make


def extra_config(upstream_url: str, extra: str) -> str:
    """The test config, with ``extra`` TOML sections merged in (a section given twice is merged)."""
    sections: dict[str, list[str]] = {
        "chat": ['default_model = "fake/fake-model"', "resume_grace_seconds = 0"],
        "providers.fake": ['kind = "openai"', f'base_url = "{upstream_url}"', 'api_key = "sk-test-secret-key-123"',
                           'models = ["fake-model", "fake-reasoner"]', 'aliases = ["fakey"]', "max_retries = 0"],
    }
    current = None
    for line in extra.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key = line.split("=", 1)[0].strip()
        sections[current] = [l for l in sections[current] if l.split("=", 1)[0].strip() != key] + [line]
    return "\n".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items())


@pytest.fixture
async def client(make_client):
    return await make_client()


class WS:
    """A WebSocket test peer that reads frames as dicts, with a timeout on every read."""

    def __init__(self, ws) -> None:
        self.ws = ws

    async def send(self, obj) -> None:
        await self.ws.send_str(obj if isinstance(obj, str) else json.dumps(obj))

    async def recv(self, timeout: float = 5.0) -> dict:
        async with asyncio.timeout(timeout):
            msg = await self.ws.receive()
        assert msg.type.name == "TEXT", f"expected a text frame, got {msg.type.name} {msg.data!r}"
        return json.loads(msg.data)

    async def until(self, kind: str, timeout: float = 5.0) -> list[dict]:
        """Frames up to and including the first of type ``kind``."""
        frames = []
        async with asyncio.timeout(timeout):
            while True:
                f = await self.recv(timeout)
                frames.append(f)
                if f["type"] == kind:
                    return frames

    async def close(self) -> None:
        await self.ws.close()


@pytest.fixture
def connect(client):
    async def open_ws(path: str = "/ws", **kw) -> WS:
        return WS(await client.ws_connect(path, **kw))

    return open_ws


# ------------------------------------------------------------ real Redis (tests/redis_servers.py)

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the whole session; tests keep apart by their own ids or ``flushall``."""
    from redis_servers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A three-node Redis Cluster (no replicas) for the cluster run of the store suite."""
    from redis_servers import RedisCluster

    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()
