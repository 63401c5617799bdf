"""``[store]``, ``NEXLM_STORE`` and ``[chat] background_replies``: chosen, checked, described safely."""

from __future__ import annotations

import pytest

from nexlm.config import ConfigError, load_settings
from nexlm.store_factory import describe, make_store


def settings(tmp_path, toml: str = "", env: dict | None = None):
    path = tmp_path / "nexlm.toml"
    path.write_text(toml)
    return load_settings(str(path), env=env or {})


def test_memory_is_the_default_and_keeps_replies_in_the_foreground(tmp_path):
    s = settings(tmp_path)
    assert (s.store.kind, s.store.path, s.store.url) == ("memory", "nexlm.db", "redis://127.0.0.1:6379/0")
    assert s.background_replies is False
    assert make_store(s, in_use=lambda cid: False).kind == "memory"


@pytest.mark.parametrize("toml, kind, background", [
    ('[store]\nkind = "sqlite"', "sqlite", True),
    ('[store]\nkind = "redis"', "redis", True),
    ('[store]\nkind = "sqlite"\n[chat]\nbackground_replies = false', "sqlite", False),
    ("[chat]\nbackground_replies = true", "memory", True),
])
def test_background_replies_follow_the_store_unless_set(tmp_path, toml, kind, background):
    s = settings(tmp_path, toml)
    assert (s.store.kind, s.background_replies) == (kind, background)


@pytest.mark.parametrize("value, kind, where", [
    ("memory", "memory", None),
    ("sqlite:/var/lib/nexlm/nexlm.db", "sqlite", "/var/lib/nexlm/nexlm.db"),
    ("redis://:pw@cache:6380/2", "redis", "redis://:pw@cache:6380/2"),
    ("rediss://cache/0", "redis", "rediss://cache/0"),
])
def test_nexlm_store_overrides_the_file(tmp_path, value, kind, where):
    s = settings(tmp_path, '[store]\nkind = "sqlite"\npath = "file.db"', env={"NEXLM_STORE": value})
    assert s.store.kind == kind
    if kind == "sqlite":
        assert s.store.path == where
    if kind == "redis":
        assert s.store.url == where


@pytest.mark.parametrize("toml, env, message", [
    ('[store]\nkind = "postgres"', {}, "[store] kind: must be one of memory, sqlite, redis, got 'postgres'"),
    ('[store]\nkind = "sqlite"\npath = ""', {}, "[store] path: must name the database file"),
    ('[store]\nkind = "redis"\nurl = "cache:6379"', {}, "[store] url: must start with redis:// or rediss://"),
    ('[store]\nfile = "x.db"', {}, "[store].file: unknown key"),
    ('[chat]\nbackground_replies = "yes"', {}, "[chat].background_replies: expected true or false"),
    ("", {"NEXLM_STORE": "mysql://root:hunter2@db/x"}, "NEXLM_STORE: expected memory, sqlite:PATH or a redis://"),
    ("", {"NEXLM_STORE": "sqlite:"}, "NEXLM_STORE: expected memory, sqlite:PATH"),
])
def test_a_bad_store_setting_is_one_line(tmp_path, toml, env, message):
    with pytest.raises(ConfigError) as exc:
        settings(tmp_path, toml, env)
    text = str(exc.value)
    assert message in text and "\n" not in text
    assert "hunter2" not in text


def test_the_store_is_described_without_a_password(tmp_path):
    s = settings(tmp_path, env={"NEXLM_STORE": "redis://user:s3cret@cache:6380/2"})
    assert describe(s) == "redis store redis://cache:6380/2"
    assert describe(settings(tmp_path, env={"NEXLM_STORE": "sqlite:/data/n.db"})) == "sqlite store /data/n.db"
    assert describe(settings(tmp_path)) == "memory store"
