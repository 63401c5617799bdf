"""Hooks and fixtures for the container tests: opt-in gating, podman checks, build options.

These tests build images (each build compiles llama.cpp: 15-25 minutes on 2 shared cores), so they
run only when asked: NEXLM_CONTAINER_TESTS=1 python -m pytest tests/container -v
Asked for, they fail (never skip) when podman or debootstrap is missing.

Machine-specific settings reach the builds only as podman options (nothing is written into
an image): --network host, the machine's CA bundle mounted over the container's, and a pip
config made from this machine's (its index and CA settings) mounted at /etc/pip.conf.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ctrutil import CA_BUNDLE, ENABLED, SKIP_REASON, host_pip_settings


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.container)
            item.add_marker(pytest.mark.slow)
            if not ENABLED:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def pytest_configure(config):
    config.addinivalue_line("markers", "container: builds and runs podman images (NEXLM_CONTAINER_TESTS=1)")


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


