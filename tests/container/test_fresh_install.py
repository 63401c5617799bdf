"""README's first command on a fresh Debian 12 (issue 9, item 6).

A stock Debian 12 (debootstrap minbase + README's prerequisites), a fresh venv with the pip
Debian ships (23.0.1, older than the 23.1 that understands --config-settings in
requirements.txt), then README's first command exactly as README.md has it. The server must
answer /healthz, list the embedded model as usable and chat with it.
"""

from __future__ import annotations

import re
import shlex
import time

from ctrutil import (  # noqa: F401  (build_mounts, podman_ready: fixtures)
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

INSTALL_TIMEOUT = 3600  # the llama.cpp compile: about 4 minutes on 2 idle cores, far more when shared


def readme_first_command() -> str:
    """The first shell block of README.md (its install-and-run command)."""
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert block, "README.md has no ```sh block"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, f"README's first block should be one command: {lines}"
    assert lines[0].rstrip().endswith("python app.py"), lines[0]
    return lines[0].strip()


def test_debians_own_pip_cannot_read_requirements(podman_ready, build_mounts):  # noqa: F811 (fixtures)
    """Why README's command updates pip first: Debian 12's venv pip stops at once."""
    image = base_image("stock")
    proc = podman("run", "--rm", *RUN_OPTS, "--network", "none", "-v", f"{ROOT}:/src:ro", image,
                  "bash", "-c", "python3 -m venv /venv && /venv/bin/pip --version && "
                  "cd /src && /venv/bin/pip install -r requirements.txt", check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert "pip 23.0.1" in out, out
    assert proc.returncode != 0 and "no such option: --config-settings" in out, out


def test_readme_first_command_on_fresh_debian12(podman_ready, build_mounts, tmp_path):  # noqa: F811 (fixtures)
    image = base_image("stock")
    command = readme_first_command()
    port = free_port()
    cfg = tmp_path / "nexlm.toml"
    cfg.write_text(f"[server]\nport = {port}\n")  # the command as written; only the port is ours
    script = (
        "set -e; python3 -m venv /venv; . /venv/bin/activate; "
        "echo \"venv pip before: $(python -m pip --version)\"; cd /src; "
        f"echo '$ '{shlex.quote(command)}; {command}"
    )
    t0 = time.monotonic()
    # The checkout, read-only: the command needs to write nothing there.
    with container(image, "bash", "-c", script,
                   run_opts=[*build_mounts, "-v", f"{ROOT}:/src:ro", "-v", f"{cfg}:/etc/nexlm.toml:ro",
                             "-e", "NEXLM_CONFIG=/etc/nexlm.toml"]) as name:
        url = f"http://127.0.0.1:{port}"
        took = wait_healthy(url, INSTALL_TIMEOUT, alive=lambda: is_running(name), logs=lambda: logs(name))
        out = logs(name)
        assert "venv pip before: pip 23.0.1" in out, out[-3000:]
        models = get_json(f"{url}/api/models")
        local = next(m for m in models["models"] if m["id"] == models["default"])
        assert local["provider"] == "local" and local["available"] is True, models
        text = assert_good_reply(sse_chat(url, "What is the capital of France?", max_tokens="24"))
        print(f"\nREADME's first command: healthy after {took:.0f} s, first chat after "
              f"{time.monotonic() - t0:.0f} s; reply: {text[:80]!r}")
