"""nexlm.redis_conn against a real redis-server and a real three-node cluster."""

from __future__ import annotations

import pytest

from nexlm.redis_conn import StoreError, connect, key, redact, tagged, valid_sid


def test_keys_carry_one_hash_tag():
    assert key("abc_DEF-1", "rec") == "nexlm:{abc_DEF-1}:rec"
    assert key("s1") == "nexlm:{s1}"
    assert tagged("owner", "alice@example.com", "sessions") == "nexlm:owner:{alice@example.com}:sessions"
    weird = tagged("owner", "a}b{c")
    assert weird.count("{") == 1 and weird.count("}") == 1 and "a}b" not in weird
    for bad in ("", "a}b", "x" * 65, None, 5, "a:b"):
        assert not valid_sid(bad)
        with pytest.raises(ValueError):
            key(bad)


def test_redact_hides_the_password():
    assert redact("redis://u:s3cret@h:6380/1") == "redis://u:***@h:6380/1"
    assert redact("rediss://:s3cret@h/0") == "rediss://:***@h/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"


async def test_connect_plain(redis_server):
    conn = await connect(redis_server.url)
    try:
        assert conn.cluster is False
        await conn.client.set(key("t1", "x"), b"v")
        assert await conn.client.get(key("t1", "x")) == b"v"
    finally:
        await conn.close()


async def test_cluster_is_detected(redis_cluster):
    conn = await connect(redis_cluster.url)
    try:
        assert conn.cluster is True
        # Keys of one session share a slot: a multi-key command over them works on the cluster.
        await conn.client.mset({key("s9", "a"): b"1", key("s9", "b"): b"2"})
        assert await conn.client.mget([key("s9", "a"), key("s9", "b")]) == [b"1", b"2"]
    finally:
        await conn.close()


async def test_cluster_switch_in_url(redis_server):
    conn = await connect(redis_server.url + "?cluster=no")
    try:
        assert conn.cluster is False and await conn.client.ping()
    finally:
        await conn.close()


async def test_bad_password_is_one_line_without_it(redis_server):
    admin = await connect(redis_server.url)
    try:
        await admin.client.execute_command("ACL", "SETUSER", "conn-test", "on", ">right-pass", "~*", "+@all")
    finally:
        await admin.close()
    url = redis_server.url.replace("redis://", "redis://conn-test:wrong-pass-42@")
    with pytest.raises(StoreError) as info:
        await connect(url)
    text = str(info.value)
    assert "\n" not in text and "wrong-pass-42" not in text and "authentication" in text
    ok = await connect(redis_server.url.replace("redis://", "redis://conn-test:right-pass@"))
    await ok.close()


async def test_nothing_listening_is_one_line():
    from redis_servers import free_port

    with pytest.raises(StoreError) as info:
        await connect(f"redis://127.0.0.1:{free_port()}/0", timeout=2)
    assert "\n" not in str(info.value) and "cannot connect" in str(info.value)


async def test_bad_scheme_is_one_line():
    with pytest.raises(StoreError) as info:
        await connect("http://127.0.0.1:1/0")
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """A redis-server speaking TLS only, with a password (a self-signed certificate from openssl)."""
    from redis_servers import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), tls=True, password="tls-pass-77")
    yield server
    server.stop()


async def test_rediss_with_a_password_in_the_url(tls_server):
    url = tls_server.url.replace("rediss://", "rediss://:tls-pass-77@") + f"?ssl_ca_certs={tls_server.cert}"
    conn = await connect(url)
    try:
        await conn.client.set(key("tls1", "x"), b"v")
        assert await conn.client.get(key("tls1", "x")) == b"v"
    finally:
        await conn.close()
    with pytest.raises(StoreError) as info:  # the same server, not trusted: one line
        await connect(tls_server.url.replace("rediss://", "rediss://:tls-pass-77@"), timeout=3)
    assert "\n" not in str(info.value) and "tls-pass-77" not in str(info.value)
    with pytest.raises(StoreError) as info:  # trusted, wrong password
        await connect(url.replace("tls-pass-77", "nope-nope"), timeout=3)
    assert "authentication refused" in str(info.value) and "nope-nope" not in str(info.value)
