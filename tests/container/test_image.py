"""The Docker image (issue 9, item 7): it builds, answers /healthz, and its first chat with the
baked-in model works (the model's OpenMP runtime, libgomp, is in the image).

Built here from a local stand-in for python:3.11-slim (tests/container/build_base.sh slim),
with the registries reached through podman options only; the Dockerfile is the one users build.
"""

from __future__ import annotations

import json
import time

import pytest
from ctrutil import (  # noqa: F401  (build_mounts, podman_ready: fixtures)
    BUILD_OPTS,
    MARKS,
    ROOT,
    RUN_OPTS,
    assert_good_reply,
    base_image,
    build_mounts,
    container,
    free_port,
    get_json,
    is_running,
    logs,
    podman,
    podman_ready,
    sse_chat,
    wait_healthy,
)

pytestmark = MARKS

IMAGE = "localhost/nexlm-test:latest"
BUILD_TIMEOUT = 3600


@pytest.fixture(scope="module")
def image(podman_ready, build_mounts):  # noqa: F811 (fixtures)
    base = base_image("slim")
    t0 = time.monotonic()
    # --format docker keeps the HEALTHCHECK (the OCI format has none).
    proc = podman("build", "--format", "docker", *BUILD_OPTS, *build_mounts,
                  "--build-arg", f"BASE_IMAGE={base}", "-t", IMAGE, "-f", str(ROOT / "Dockerfile"),
                  str(ROOT), timeout=BUILD_TIMEOUT, check=False)
    assert proc.returncode == 0, f"podman build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    print(f"\npodman build: {time.monotonic() - t0:.0f} s (layers may be cached); image {size / 1e6:.0f} MB")
    return IMAGE


def test_image_config(image):
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    cfg = info["Config"]
    assert cfg["User"] == "nexlm"
    assert "8080/tcp" in cfg.get("ExposedPorts", {})
    health = info.get("Healthcheck") or cfg.get("Healthcheck") or {}  # podman: top level; docker: Config
    assert "/healthz" in " ".join(health.get("Test", [])), health
    # Conversations in SQLite on the data volume by default (README: -v nexlm-data:/var/lib/nexlm).
    assert "NEXLM_STORE=sqlite:/var/lib/nexlm/nexlm.db" in cfg.get("Env", []), cfg.get("Env")
    assert "/var/lib/nexlm" in (cfg.get("Volumes") or {}), cfg.get("Volumes")
    # The OpenMP runtime the llama.cpp build links, and no compiler in the final image.
    proc = podman("run", "--rm", *RUN_OPTS, "--network", "none", image, "sh", "-c",
                  "ldd /opt/nexlm/lib/python3*/site-packages/llama_cpp/lib/libllama.so; command -v gcc cc || true")
    assert "libgomp.so.1 =>" in proc.stdout and "not found" not in proc.stdout, proc.stdout
    assert "/gcc" not in proc.stdout and "/cc" not in proc.stdout, proc.stdout


def test_first_chat_in_the_container(image):
    port = free_port()
    t0 = time.monotonic()
    # The image's own command (0.0.0.0:8080 inside), published on this machine's loopback only.
    with container(image, run_opts=["-p", f"127.0.0.1:{port}:8080"]) as name:
        url = f"http://127.0.0.1:{port}"
        healthy = wait_healthy(url, 120, alive=lambda: is_running(name), logs=lambda: logs(name))
        models = get_json(f"{url}/api/models")
        default = next(m for m in models["models"] if m["id"] == models["default"])
        assert default["provider"] == "local" and default["available"] is True, models
        events = sse_chat(url, "What is the capital of France?", max_tokens="32", timeout=300)
        text = assert_good_reply(events)
        first_chat = time.monotonic() - t0
        assert "cannot load" not in logs(name)
        print(f"\npodman run -> /healthz {healthy:.1f} s, -> first chat done {first_chat:.1f} s; "
              f"reply: {text[:80]!r}")
