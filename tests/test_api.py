"""The JSON API, configuration loading, and the command line."""

from __future__ import annotations

import socket
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nexlm.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


async def test_models_listing_has_no_secrets(client):
    r = await client.get("/api/models")
    assert r.status == 200
    data = await r.json()
    ids = {m["id"]: m for m in data["models"]}
    assert data["default"] == "fake/fake-model"
    assert ids["fake/fake-model"]["available"] is True and ids["fake/fake-model"]["reason"] is None
    assert set(ids["fake/fake-model"]["aliases"]) == {"fake", "fakey"}
    assert ids["deepseek/deepseek-chat"]["available"] is False
    assert ids["deepseek/deepseek-chat"]["reason"] == "set DEEPSEEK_API_KEY"
    assert "deepseek/deepseek-reasoner" in ids and "openai/gpt-4o-mini" in ids
    assert set(ids["openai/gpt-4o-mini"]["aliases"]) == {"openai", "chatgpt"}
    text = await r.text()
    assert "sk-test-secret-key-123" not in text and "127.0.0.1" not in text


async def test_keys_from_env_make_providers_available(make_client):
    client = await make_client(env={"DEEPSEEK_API_KEY": "sk-deep"})
    data = await (await client.get("/api/models")).json()
    ids = {m["id"]: m for m in data["models"]}
    assert ids["deepseek/deepseek-chat"]["available"] is True
    assert "sk-deep" not in str(data)


async def test_session_get_and_delete(client, connect):
    ws = await connect()
    sid = (await ws.recv())["session"]
    await ws.send({"type": "chat", "message": "hi"})
    await ws.until("done")
    r = await client.get(f"/api/sessions/{sid}")
    data = await r.json()
    assert data["session"] == sid and data["model"] == "fake/fake-model"
    assert [h["role"] for h in data["history"]] == ["user", "assistant"]
    assert data["history"][1]["finish_reason"] == "stop"
    r = await client.delete(f"/api/sessions/{sid}")
    assert r.status == 200
    assert (await client.get(f"/api/sessions/{sid}")).status == 404
    assert (await client.delete(f"/api/sessions/{sid}")).status == 404
    assert (await client.post(f"/api/sessions/{sid}/stop")).status == 404


async def test_healthz_and_security_headers(client):
    r = await client.get("/healthz")
    assert r.status == 200
    for path in ("/healthz", "/api/models"):
        h = (await client.get(path)).headers
        assert "default-src 'self'" in h["Content-Security-Policy"]
        assert "img-src 'self' data:" in h["Content-Security-Policy"]
        assert h["X-Content-Type-Options"] == "nosniff"
        assert h["Referrer-Policy"] == "same-origin"


async def test_page_is_served(client):
    r = await client.get("/")
    assert r.status == 200 and "text/html" in r.headers["Content-Type"]
    html = await r.text()
    assert "http://" not in html and "https://" not in html  # no CDN, relative URLs only


async def test_aliases_resolve(connect, upstream):
    ws = await connect()
    await ws.recv()
    for name, expected in (("fake", "fake/fake-model"), ("fakey", "fake/fake-model"),
                           ("fake-reasoner", "fake/fake-reasoner"), ("fake/fake-reasoner", "fake/fake-reasoner")):
        await ws.send({"type": "set", "model": name})
        assert (await ws.recv())["model"] == expected


# ---------------------------------------------------------------- config


def test_builtins_without_a_file():
    s = load_settings(None, env={})
    assert set(s.providers) == {"deepseek", "openai", "local"}
    assert s.providers["deepseek"].base_url == "https://api.deepseek.com"
    assert s.providers["openai"].aliases == ("chatgpt",)
    assert s.providers["local"].kind == "llamacpp"


def test_local_server_from_env():
    s = load_settings(None, env={"LOCAL_LLM_BASE_URL": "http://127.0.0.1:11434/v1", "LOCAL_LLM_MODEL": "qwen3"})
    local = s.providers["local"]
    assert local.kind == "openai" and local.base_url == "http://127.0.0.1:11434/v1" and local.models == ("qwen3",)


def test_file_overrides_and_disables(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[providers.openai]\nenabled = false\n[providers.deepseek]\nmodels = ["deepseek-chat"]\n'
                 '[providers.mine]\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["m"]\n[chat]\nmax_history_turns = 3\n')
    s = load_settings(str(f), env={})
    assert "openai" not in s.providers
    assert s.providers["deepseek"].models == ("deepseek-chat",)
    assert s.providers["deepseek"].base_url == "https://api.deepseek.com"  # the rest stays built in
    assert s.providers["mine"].kind == "openai" and s.chat.max_history_turns == 3


@pytest.mark.parametrize("text, needle", [
    ("[chat]\nmax_history_turns = 'many'\n", "[chat].max_history_turns"),
    ("[chat]\ncolour = 1\n", "[chat].colour"),
    ("[servr]\n", "[servr]"),
    ("[providers.x]\nkind = 'magic'\nmodels=['a']\nbase_url='http://h'\n", "[providers.x] kind"),
    ("[providers.x]\nmodels = ['a']\n", "[providers.x] base_url"),
    ("[server]\nport = 70000\n", "[server] port"),
    ("[chat\n", "not valid TOML"),
    # Every value that names something is checked at start (a typo used to give 500s later).
    ("[chat]\ndefault_model = 'deepsek'\n", "[chat] default_model: unknown model 'deepsek'"),
    ("[providers.deepseek]\nfallback = 'openai/gpt-5'\n", "[providers.deepseek] fallback: unknown model"),
    ("[providers.mine]\nbase_url = 'http://127.0.0.1:9/v1'\nmodels = ['m']\nfallback = 'mine'\n",
     "[providers.mine] fallback: 'mine' is mine's only model"),
    ("[providers.mine]\nbase_url = 'http://127.0.0.1:9/v1'\nmodels = ['m']\naliases = ['chatgpt']\n",
     "[providers.mine] aliases: 'chatgpt' already names provider 'openai'"),
    ("[providers.mine]\nbase_url = 'http://127.0.0.1:9/v1'\nmodels = ['m']\naliases = ['local']\n",
     "[providers.mine] aliases: 'local' already names provider 'local'"),
    ("[providers.local]\nmodel_path = '/nonexistent/model.gguf'\n", "[providers.local] model_path: no such file"),
    ("[providers.local]\npackaged = 'gpt-7'\n", "[providers.local] packaged: unknown packaged model"),
    ("[providers.x]\nmodels = ['a']\nbase_url = 'http://'\n", "[providers.x] base_url"),
    ("[providers.x]\nmodels = ['a']\nbase_url = 'http://exa mple.com/v1'\n", "[providers.x] base_url"),
    ("[providers.x]\nmodels = ['a']\nbase_url = 'http://h:99999/v1'\n", "[providers.x] base_url"),
])
def test_bad_config_names_file_and_key(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(str(f), env={})
    assert str(f) in str(exc.value) and needle in str(exc.value)


# ---------------------------------------------------------------- command line


def _run_app(*args, env=None, timeout=20):
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_bad_config_file_is_one_line_not_a_traceback(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[chat]\nmax_history_turns = -1\n")
    p = _run_app("--config", str(f))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert str(f) in p.stderr and "max_history_turns" in p.stderr


def test_unknown_default_model_stops_the_server_at_start(tmp_path):
    f = tmp_path / "typo.toml"
    f.write_text('[chat]\ndefault_model = "deepsek"\n')
    p = _run_app("--config", str(f))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0, p.stderr  # one line
    assert str(f) in p.stderr and "default_model" in p.stderr and "deepsek" in p.stderr


def test_good_names_still_load(tmp_path):
    f = tmp_path / "ok.toml"
    f.write_text('[chat]\ndefault_model = "chatgpt"\n[providers.deepseek]\nfallback = "local"\n'
                 '[providers.mine]\nbase_url = "http://127.0.0.1:9/v1"\nmodels = ["m"]\naliases = ["mine-alias"]\n')
    s = load_settings(str(f), env={})
    assert s.chat.default_model == "chatgpt" and s.providers["deepseek"].fallback == "local"


def test_packaged_option_switches_model_id_and_label(tmp_path):
    f = tmp_path / "gemma.toml"
    f.write_text('[providers.local]\npackaged = "gemma-3-270m"\n')
    local = load_settings(str(f), env={}).providers["local"]
    assert local.models == ("gemma-3-270m",) and "base" in local.label


def test_startup_lines_say_who_answers_and_what_is_unavailable(tmp_path):
    """With no keys: the default model by its /api/models id and label, one line per unavailable provider."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPSEEK_API_KEY", "OPENAI_API_KEY", "NEXLM_CONFIG",
                                                           "LOCAL_LLM_BASE_URL", "LOCAL_MODEL_PATH")}
    env["NEXLM_CACHE"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if len([ln for ln in lines if ln.startswith("Unavailable: ")]) == 2:
                break
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    out = "\n".join(lines)
    assert f"open http://127.0.0.1:{port}/" in out
    default = next(ln for ln in lines if ln.startswith("Default model: "))
    assert default.startswith("Default model: local/smollm2-135m-instruct (SmolLM2 135M Instruct"), default
    assert "Unavailable: deepseek (DeepSeek): set DEEPSEEK_API_KEY" in out
    assert "Unavailable: openai (OpenAI): set OPENAI_API_KEY" in out


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = _run_app("--port", str(port))
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert f"port {port}" in p.stderr and "already in use" in p.stderr


async def test_loopback_server_refuses_foreign_host_names(make_client):
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 is 'same origin' by Host alone."""
    client = await make_client()
    r = await client.get("/api/models", headers={"Host": "evil.example:8080", "Origin": "http://evil.example:8080"})
    assert r.status == 421 and (await r.json())["code"] == "forbidden_host"
    assert (await client.get("/api/models", headers={"Host": "localhost"})).status == 200
    listed = await make_client('[server]\nallowed_hosts = ["chat.intranet"]')
    assert (await listed.get("/api/models", headers={"Host": "chat.intranet"})).status == 200
    assert (await listed.get("/api/models", headers={"Host": "127.0.0.1"})).status == 421
    anywhere = await make_client('[server]\nhost = "0.0.0.0"')
    assert (await anywhere.get("/api/models", headers={"Host": "chat.intranet"})).status == 200


async def test_rate_limit_counts_users_behind_a_trusted_proxy(make_client, upstream):
    """Behind nginx every request comes from 127.0.0.1: only a listed proxy's X-Forwarded-For
    separates the users, and a client cannot forge it."""
    client = await make_client('[server]\ntrusted_proxies = ["127.0.0.1"]\n[limits]\nmessages_per_minute = 1')

    async def chat(forwarded):
        r = await client.get("/sse", params={"message": "hi"}, headers={"X-Forwarded-For": forwarded})
        await r.read()
        return r.status

    assert await chat("10.0.0.1") == 200
    assert await chat("10.0.0.2") == 200  # another user: own budget
    assert await chat("10.0.0.1") == 429
    assert await chat("10.0.0.9, 10.0.0.1") == 429  # a forged left-most hop changes nothing

    untrusted = await make_client("[limits]\nmessages_per_minute = 1")
    r = await untrusted.get("/sse", params={"message": "a"}, headers={"X-Forwarded-For": "10.0.0.1"})
    await r.read()
    r = await untrusted.get("/sse", params={"message": "b"}, headers={"X-Forwarded-For": "10.0.0.2"})
    assert r.status == 429  # not a trusted proxy: the header is ignored
