"""Helpers and fixtures for the container tests (see README.md here).

These tests build images (each build compiles llama.cpp: 15-25 minutes on 2 shared cores), so
they run only when asked: NEXLM_CONTAINER_TESTS=1 python -m pytest tests/container -v -s
Asked for, they fail (never skip) when podman, runc or debootstrap is missing.

Machine-specific settings reach the builds only as podman options (nothing is written into an
image): --network host, the machine's CA bundle mounted over the container's, and a pip config
made from this machine's (its index and CA settings) mounted at /etc/pip.conf.

(No conftest.py here on purpose: tests/ modules do `from conftest import ...`, and a second
conftest module would shadow tests/conftest.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_BASE = Path(__file__).resolve().parent / "build_base.sh"
ENABLED = os.environ.get("NEXLM_CONTAINER_TESTS") == "1"
SKIP_REASON = (
    "container tests build images and compile llama.cpp (many minutes); "
    "run them with NEXLM_CONTAINER_TESTS=1 python -m pytest tests/container"
)
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's path, in the images too
# Podman here runs only with runc and ulimits below the hard limit (see /work/shared/NOTES.md).
RUN_OPTS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
BUILD_OPTS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

# Every test module here: pytestmark = MARKS
MARKS = [pytest.mark.container, pytest.mark.slow, pytest.mark.skipif(not ENABLED, reason=SKIP_REASON)]


def podman(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          check=check, stdin=subprocess.DEVNULL, **kw)


def base_image(flavor: str) -> str:
    """The local base image for a flavor (stock, slim), assembled once and cached by name."""
    name = f"localhost/nexlm-{'debian12-stock' if flavor == 'stock' else 'python311-slim'}"
    if podman("image", "exists", name, check=False).returncode != 0:
        t0 = time.monotonic()
        proc = subprocess.run(["bash", str(BUILD_BASE), flavor, name], capture_output=True, text=True, check=False,
                              timeout=1800, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"build_base.sh {flavor} failed:\n{proc.stderr[-3000:]}"
        print(f"\nbase image {name} assembled in {time.monotonic() - t0:.0f} s")
    return name


def host_pip_settings() -> dict[str, str]:
    try:
        out = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, check=False,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    settings = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.strip().split(".", 1)[-1]] = value.strip().strip("'\"")
    for key in ("index-url", "extra-index-url", "trusted-host", "default-timeout"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            settings[key] = env
    return settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        assert resp.status == 200, f"{url}: HTTP {resp.status}"
        return json.loads(resp.read())


def wait_healthy(url: str, timeout: float, alive=lambda: True, logs=lambda: "") -> float:
    """Poll GET url/healthz until it answers 200; return the seconds it took."""
    t0 = time.monotonic()
    last = ""
    pause = 0.1  # growing to 2 s: a long install is not polled with podman several times a second
    while time.monotonic() - t0 < timeout:
        try:
            if get_json(f"{url}/healthz", timeout=2).get("status") == "ok":
                return time.monotonic() - t0
        except (OSError, urllib.error.URLError, ValueError, AssertionError) as exc:
            last = repr(exc)
        if not alive():
            pytest.fail(f"the server exited before /healthz answered ({last}):\n{logs()[-4000:]}")
        time.sleep(pause)
        pause = min(2.0, pause * 1.5)
    pytest.fail(f"/healthz did not answer within {timeout:.0f} s ({last}):\n{logs()[-4000:]}")


def sse_chat(url: str, message: str, timeout: float = 300, **params: str) -> list[tuple[str, dict]]:
    """GET /sse?message=... and return its (event, data) pairs up to the terminal event."""
    query = urllib.parse.urlencode({"message": message, **params})
    events: list[tuple[str, dict]] = []
    with urllib.request.urlopen(f"{url}/sse?{query}", timeout=timeout) as resp:
        assert resp.status == 200
        event, data = "message", []
        for raw in resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith(":"):
                continue
            if line == "":
                if data:
                    events.append((event, json.loads("\n".join(data))))
                    if event in ("done", "error"):
                        break
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
    return events


def assert_good_reply(events: list[tuple[str, dict]]) -> str:
    kinds = [e for e, _ in events]
    errors = [d for e, d in events if e == "error"]
    assert not errors, f"error event: {errors}"
    assert kinds and kinds[-1] == "done", f"no done event: {events}"
    text = "".join(d.get("content", "") for e, d in events if e == "delta")
    assert text.strip(), f"empty reply: {events}"
    assert events[-1][1]["finish_reason"] in ("stop", "length"), events[-1]
    return text


@contextlib.contextmanager
def container(image: str, *args: str, run_opts: list[str] = (), name: str | None = None):
    """podman run -d ...; yields the container name; always stops and removes it."""
    name = name or f"nexlm-test-{uuid.uuid4().hex[:10]}"
    try:
        podman("run", "-d", "--name", name, *RUN_OPTS, *run_opts, image, *args, timeout=300)
        yield name
    finally:
        podman("rm", "-f", "-t", "5", name, check=False, timeout=120)


def is_running(name: str) -> bool:
    p = podman("inspect", "-f", "{{.State.Running}}", name, check=False)
    return p.stdout.strip() == "true"


def logs(name: str) -> str:
    p = podman("logs", name, check=False)
    return p.stdout + p.stderr


@pytest.fixture(scope="session")
def podman_ready():
    missing = [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"NEXLM_CONTAINER_TESTS=1 but {', '.join(missing)} not found "
                    f"(apt-get install -y podman runc debootstrap)")


@pytest.fixture(scope="session")
def build_mounts(tmp_path_factory) -> list[str]:
    """podman options that let a RUN step reach the registries the way this machine does."""
    settings = host_pip_settings()
    lines = ["[global]", f"cert = {CA_BUNDLE}"]
    for key in ("index-url", "extra-index-url", "trusted-host"):
        # Local file:// indexes of this machine do not exist in a container.
        urls = [u for u in settings.get(key, "").split() if not u.startswith("file:")]
        if urls:
            lines.append(f"{key} = {' '.join(urls)}")
    lines.append(f"default-timeout = {settings.get('default-timeout', settings.get('timeout', '120'))}")
    conf = tmp_path_factory.mktemp("pipconf") / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    ca = os.environ.get("PIP_CERT") or settings.get("cert") or CA_BUNDLE
    return ["--network", "host", "--volume", f"{ca}:{CA_BUNDLE}:ro", "--volume", f"{conf}:/etc/pip.conf:ro"]


