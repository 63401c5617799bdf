"""Access control and secrets: the Origin check, tokens (Bearer and the login cookie), sessions
owned by their token, security headers, and API keys that never reach a client or a log line.

Refusals happen before any WebSocket upgrade or generation: no session is created and the
upstream sees nothing. Every test ends with ``await h.check()`` (see ``invariants.py``).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import WSServerHandshakeError

from fake_upstream import DONE, FakeUpstream, Script, chunk, error, from_fixture, reply
from invariants import h, make_harness  # noqa: F401  (fixtures)

ROLE = chunk("", role=True)
TOKENS = '[auth]\ntokens = ["tok-A-7f3c9e", "tok-B-21d8aa"]'
A = {"Authorization": "Bearer tok-A-7f3c9e"}
B = {"Authorization": "Bearer tok-B-21d8aa"}


async def ws_refused(h, path: str = "/ws", **kw) -> int:
    before = h.chat.stats()["sessions"]
    with pytest.raises(WSServerHandshakeError) as exc:
        await h.client.ws_connect(path, **kw)
    assert h.chat.stats()["sessions"] == before, "a session was created before the refusal"
    return exc.value.status


# ---------------------------------------------------------------------------- Origin

def origins(port: int):
    same = f"http://127.0.0.1:{port}"
    allowed = [None, same, f"HTTP://127.0.0.1:{port}", "https://chat.example.com"]
    refused = ["https://evil.example", f"http://127.0.0.1.evil.com:{port}", f"http://127.0.0.1:{port + 1}",
               f"https://127.0.0.1:{port}", f"ws://127.0.0.1:{port}",  # same host and port, not the same scheme
               "null", f"http://127.0.0.1:{port}@evil.com", f"127.0.0.1:{port}", "http://127.0.0.1",
               "https://chat.example.com.evil.com", "http://chat.example.com", "https://chat.example.com:444",
               "file://", ""]
    return allowed, refused


async def test_origin_check_on_ws_and_sse(make_harness, upstream):
    h = await make_harness('[server]\nallowed_origins = ["https://chat.example.com/"]')
    allowed, refused = origins(h.client.port)
    for origin in refused:
        headers = {"Origin": origin}
        assert await ws_refused(h, headers=headers) == 403, origin
        assert await ws_refused(h, "/api/ai/chat/websocket", headers=headers) == 403, origin
        r = await h.client.get("/sse", params={"message": "hi"}, headers=headers)
        assert r.status == 403 and (await h.json(r))["code"] == "forbidden_origin", origin
        r = await h.client.post("/sse", json={"message": "hi"}, headers=headers)
        assert r.status == 403, origin
    assert upstream.requests == [] and h.chat.stats()["sessions"] == 0
    for origin in allowed:
        headers = {} if origin is None else {"Origin": origin}
        try:
            peer = await h.ws(headers=headers)
        except WSServerHandshakeError as exc:
            raise AssertionError(f"Origin {origin!r} was refused ({exc.status})") from None
        await peer.sync()
        await peer.close()
        r = await h.client.get("/sse", params={"session": peer.sid}, headers={**headers, "Last-Event-ID": "0"})
        assert r.status == 204, origin
    await h.check()


async def test_origin_check_on_state_changing_api_calls(h, upstream):
    upstream.push(Script([ROLE, chunk("x"), "hang"]))
    peer = await h.start("ws")
    await peer.until("delta")
    evil = {"Origin": "https://evil.example"}
    for method, path in (("POST", f"/api/sessions/{peer.sid}/stop"), ("DELETE", f"/api/sessions/{peer.sid}"),
                         ("POST", "/login")):
        r = await h.client.request(method, path, headers=evil)
        assert r.status == 403, (method, path)
    assert h.session(peer.sid).reply is not None, "a cross-site request stopped the reply"
    await peer.stop()
    await peer.until("done")
    await h.check()


async def test_cross_site_get_without_origin_cannot_start_a_generation(h, upstream):
    """Browsers send no Origin with a cross-site ``<img>``/``<iframe>``/``<script>`` GET, but they
    do send Fetch Metadata (``Sec-Fetch-Site``). With auth off (the default), any web page an
    intranet user visits could otherwise make GET /sse?message=... spend the operator's credits."""
    for dest, mode in (("image", "no-cors"), ("iframe", "navigate"), ("script", "no-cors")):
        r = await h.client.get("/sse", params={"message": "spend the credits"}, headers={
            "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": dest})
        await r.read()
        assert upstream.requests == [], f"a cross-site <{dest}> GET started a generation (HTTP {r.status})"
    # A same-origin page and a program (no Fetch Metadata) still work.
    for headers in ({"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}, {}):
        s = await h.sse("GET", params={"message": "mine"}, headers=headers)
        assert s.status == 200
        await s.rest()
        h.accept(s.sid, "mine")
    await h.check()


# ---------------------------------------------------------------------------- tokens

PROTECTED = [("GET", "/api/models"), ("GET", "/api/sessions/whatever"), ("DELETE", "/api/sessions/whatever"),
             ("POST", "/api/sessions/whatever/stop"), ("GET", "/api/metrics"), ("GET", "/sse?message=hi"),
             ("POST", "/sse")]


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Bearer tok-A-7f3c9", "Bearer tok-A-7f3c9ex", "tok-A-7f3c9e",
                                  "Basic tok-A-7f3c9e", "Bearer ", "Bearer tok-a-7f3c9e"])
async def test_missing_or_wrong_token_is_401_before_anything(make_harness, upstream, auth):
    h = await make_harness(TOKENS)
    headers = {} if auth is None else {"Authorization": auth}
    assert await ws_refused(h, headers=headers) == 401
    assert await ws_refused(h, "/api/ai/chat/websocket", headers=headers) == 401
    for method, path in PROTECTED:
        r = await h.client.request(method, path, headers=headers, json={"message": "hi"} if method == "POST" else None)
        assert r.status == 401, (method, path, r.status)
        assert (await h.json(r))["code"] == "unauthorized"
        assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    r = await h.client.get("/", headers=headers, allow_redirects=False)
    assert r.status in (302, 303, 401) and (r.status == 401 or r.headers["Location"].endswith("/login"))
    r = await h.client.get("/healthz", headers=headers)
    assert r.status == 200
    r = await h.client.get("/static/app.js", headers=headers)
    assert r.status == 200
    r = await h.client.get("/login", headers=headers)
    assert r.status == 200
    assert upstream.requests == [] and h.chat.stats()["sessions"] == 0
    await h.check()


async def test_bearer_works_on_every_route_and_the_ws_upgrade(make_harness, upstream):
    h = await make_harness(TOKENS)
    for headers in (A, {"Authorization": "bearer tok-A-7f3c9e"}, {"Authorization": "Bearer  tok-A-7f3c9e "}):
        peer = await h.ws(headers=headers)
        assert (await peer.chat("hi"))["type"] == "start"
        await peer.until("done")
        r = await h.client.get(f"/api/sessions/{peer.sid}", headers=headers)
        assert r.status == 200 and (await h.json(r))["session"] == peer.sid
        assert (await h.client.get("/api/models", headers=headers)).status == 200
    s = await h.sse("GET", params={"message": "over sse"}, headers=A)
    assert s.status == 200
    await s.rest()
    h.accept(s.sid, "over sse")
    await h.check()


async def test_tokens_from_the_environment(make_harness, upstream):
    h = await make_harness(env={"NEXLM_TOKENS": "env-tok-1, env-tok-2"})
    assert await ws_refused(h) == 401
    peer = await h.ws(headers={"Authorization": "Bearer env-tok-2"})
    await peer.sync()
    await h.check()


async def test_login_form_sets_a_cookie_that_works(make_harness, upstream):
    h = await make_harness(TOKENS)
    r = await h.client.post("/login", data={"token": "wrong"}, allow_redirects=False)
    assert r.status == 401 and "Set-Cookie" not in r.headers
    assert (await h.client.get("/api/models")).status == 401
    r = await h.client.post("/login", data={"token": "tok-B-21d8aa"}, allow_redirects=False)
    assert r.status in (302, 303)
    cookie = r.headers["Set-Cookie"]
    assert "nexlm_token=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # The test client's cookie jar now carries it, as a browser would.
    assert (await h.client.get("/api/models")).status == 200
    assert (await h.client.get("/")).status == 200
    peer = await h.ws()
    assert (await peer.chat("via the cookie"))["type"] == "start"
    await peer.until("done")
    # The cookie and the Bearer token name the same owner.
    r = await h.client.get(f"/api/sessions/{peer.sid}", headers=B)
    assert r.status == 200
    h.client.session.cookie_jar.clear()
    assert (await h.client.get(f"/api/sessions/{peer.sid}")).status == 401
    await h.check()


async def test_trusted_user_header_is_off_by_default(make_harness, upstream):
    h = await make_harness(TOKENS)
    assert await ws_refused(h, headers={"X-Forwarded-User": "alice"}) == 401
    r = await h.client.get("/api/models", headers={"X-Forwarded-User": "alice", "X-Remote-User": "alice"})
    assert r.status == 401
    await h.check()


async def test_trusted_user_header_when_configured(make_harness, upstream):
    h = await make_harness(TOKENS + '\ntrusted_user_header = "X-Forwarded-User"\n[server]\ntrusted_proxies = ["127.0.0.1"]')
    alice = await h.ws(headers={"X-Forwarded-User": "alice"})
    assert (await alice.chat("alice's question"))["type"] == "start"
    await alice.until("done")
    r = await h.client.get(f"/api/sessions/{alice.sid}", headers={"X-Forwarded-User": "bob"})
    assert r.status == 404
    r = await h.client.get(f"/api/sessions/{alice.sid}", headers={"X-Forwarded-User": "alice"})
    assert r.status == 200
    await h.check()


# ---------------------------------------------------------------------------- sessions belong to their token

async def test_another_token_cannot_read_stop_or_attach(make_harness, upstream):
    h = await make_harness(TOKENS)
    gate = asyncio.Event()
    upstream.push(Script([ROLE, chunk("secret answer "), gate, chunk("continues"), chunk(finish="stop"), DONE]))
    a = await h.ws(headers=A)
    assert (await a.chat("a private question"))["type"] == "start"
    await a.until("delta")
    sid = a.sid
    for method, path in (("GET", f"/api/sessions/{sid}"), ("POST", f"/api/sessions/{sid}/stop"),
                         ("DELETE", f"/api/sessions/{sid}")):
        r = await h.client.request(method, path, headers=B)
        assert r.status == 404, (method, path)
    assert h.session(sid) is not None and h.session(sid).reply is not None, "B stopped or deleted A's reply"
    for path in (f"/ws?session={sid}", f"/ws?session={sid}&after=0"):
        b = await h.ws(path, headers=B)
        assert b.sid != sid and b.frames[0]["history"] == []
        assert [f["type"] for f in await b.sync()] == ["pong"], "B received A's events"
        await b.close()
    r = await h.client.get("/sse", params={"session": sid}, headers={**B, "Last-Event-ID": "0"})
    assert r.status == 204
    r = await h.client.get("/sse", params={"session": sid}, headers=B)
    assert r.status == 400, "B could watch A's running reply"
    gate.set()
    assert (await a.until("done"))[-1]["finish_reason"] == "stop"
    s = await h.sse("POST", json={"message": "b's question", "session": sid}, headers=B)
    assert s.status == 200 and s.sid != sid
    await s.rest()
    h.accept(s.sid, "b's question")
    assert [t["content"] for t in h.history(sid)] == ["a private question", "secret answer continues"]
    assert "secret answer" not in "".join(b.raw[0] for b in h.conns if b.sid != sid)
    await h.check()


# ---------------------------------------------------------------------------- headers

async def test_security_headers_on_every_response(make_harness, upstream):
    h = await make_harness(TOKENS + '\n[server]\nframe_ancestors = ["https://intranet.example"]')
    responses = []
    for path, headers in (("/login", {}), ("/healthz", {}), ("/static/app.js", {}), ("/api/models", {}),
                          ("/api/models", A), ("/api/sessions/nope", A), ("/", A)):
        responses.append((path, await h.client.get(path, headers=headers, allow_redirects=False)))
    r = await h.client.get("/sse", params={"message": "x"}, headers={"Origin": "https://evil.example"})
    responses.append(("403", r))
    s = await h.sse("GET", params={"message": "hi"}, headers=A)
    responses.append(("/sse stream", s.resp))
    await s.rest()
    h.accept(s.sid, "hi")
    peer = await h.ws(headers=A)
    responses.append(("/ws upgrade", peer.ws._response))
    for name, r in responses:
        csp = r.headers.get("Content-Security-Policy", "")
        assert "default-src 'self'" in csp and "img-src 'self' data:" in csp, (name, csp)
        assert "frame-ancestors 'self' https://intranet.example" in csp, (name, csp)
        assert r.headers.get("X-Content-Type-Options") == "nosniff", name
        assert r.headers.get("Referrer-Policy"), name
    await h.check()


# ---------------------------------------------------------------------------- secrets

CANARY = "sk-CANARY-5e1f0c7d9b3a4f28"
HEADER_CANARY = "hdr-CANARY-88c2e6f4a1"


async def test_api_key_never_reaches_a_client_or_a_log(make_harness, upstream, caplog):
    caplog.set_level(logging.DEBUG)
    h = await make_harness(f'[providers.fake]\napi_key = "{CANARY}"')
    upstream.push(
        error(401, f"Incorrect API key provided: {CANARY}. You can find your API key at ..."),
        error(500, f"upstream crashed while using key {CANARY}"),
        error(429, f"key {CANARY} is rate limited", headers={"Retry-After": "1"}),
        Script([ROLE, chunk("some text "), f'data: {{"error": {{"message": "bad key {CANARY}"}}}}\n\n'.encode()]),
        reply("fine"),
    )
    for transport in ("ws", "sse", "ws", "sse", "ws"):
        conn = await h.start(transport)
        await conn.until("done")
    peer = next(c for c in h.conns if c.transport == "ws")
    for path in ("/api/models", f"/api/sessions/{peer.sid}", "/api/metrics", "/", "/login"):
        r = await h.get(path)
        assert r.status == 200, path
    assert upstream.requests[0]["headers"]["Authorization"] == f"Bearer {CANARY}"  # it is really used
    everything = h.received()
    assert "Incorrect API key provided" not in everything  # clients get fixed words ...
    assert "Incorrect API key provided" in caplog.text  # ... the log gets the upstream's ...
    assert CANARY not in everything  # ... without the key
    for rec in caplog.records:
        text = rec.getMessage() + (caplog.handler.format(rec) if rec.exc_info else "")
        assert CANARY not in text, f"the API key is in a log line: {rec.name}: {text[:200]}"
    await h.check()


LONG_CANARY = "sk-proj-CANARY" + "".join(f"{i:03d}Xq" for i in range(40))[:150]


def key_runs(secret: str, text: str) -> list[str]:
    """Every run of 8 characters of ``secret`` (any case, also base64-encoded) found in ``text``."""
    import base64
    low = text.lower()
    forms = [secret] + [base64.b64encode(secret[i:].encode()).decode()[:-4] for i in range(3)]
    return [f[i:i + 8] for f in forms for i in range(len(f) - 7) if f[i:i + 8].lower() in low]


async def test_a_long_key_leaks_no_prefix_to_clients_or_logs(make_harness, upstream, caplog):
    """Was: the upstream's text was cut to 200 characters before redaction, so a 164-character key
    straddling the cut reached users as a 116-character prefix."""
    import base64
    caplog.set_level(logging.DEBUG)
    assert len(LONG_CANARY) == 164
    h = await make_harness(f'[providers.fake]\napi_key = "{LONG_CANARY}"')
    upstream.push(
        Script(status=401, body=("x" * 84 + " Incorrect API key provided: " + LONG_CANARY).encode()),
        error(401, "bad credentials " + base64.b64encode(LONG_CANARY.encode()).decode()),
        error(429, "key " + " ".join(LONG_CANARY)),
        Script([ROLE, chunk("some text "), f'data: {{"error": {{"message": "bad key {LONG_CANARY[:50]}"}}}}\n\n'.encode()]),
    )
    for transport in ("ws", "sse", "ws", "sse"):
        conn = await h.start(transport)
        await conn.until("done")
    errors = [f["message"] for c in h.conns for f in c.frames if f["type"] == "error"]
    assert errors == ["fake answered 401: the API key was refused", "fake answered 401: the API key was refused",
                      "fake answered 429: rate limited", "fake reported an error mid-reply"], errors
    assert key_runs(LONG_CANARY, h.received()) == []
    assert "Incorrect API key provided" in caplog.text  # the upstream's words are in the log, without the key
    assert key_runs(LONG_CANARY, caplog.text) == [], caplog.text
    await h.check()


async def test_key_in_configured_headers_is_redacted_too(make_harness, upstream, caplog):
    """``headers = {"api-key" = ...}`` is how Azure-style keys are configured: also a secret."""
    caplog.set_level(logging.DEBUG)
    h = await make_harness(f'[providers.fake]\nheaders = {{"api-key" = "{HEADER_CANARY}"}}')
    upstream.push(error(401, f"Access denied due to invalid subscription key {HEADER_CANARY}"))
    conn = await h.start("ws")
    frames = await conn.until("done")
    assert upstream.requests[0]["headers"]["api-key"] == HEADER_CANARY
    assert any(f["type"] == "error" for f in frames)
    assert HEADER_CANARY not in h.received(), "a key from the provider's headers reached a client"
    assert HEADER_CANARY not in caplog.text
    await h.check()


async def test_message_text_never_in_logs_at_info(make_harness, upstream, caplog):
    caplog.set_level(logging.INFO)
    h = await make_harness("[providers.fake]\nmax_retries = 1")
    secret = "MY-PRIVATE-QUESTION-3141"
    upstream.push(reply("a"), error(503, "busy"), reply("b"), from_fixture("in-stream-error.txt"))
    for transport, msg in (("ws", secret + " one"), ("sse", secret + " two"), ("ws", secret + " three")):
        conn = await h.start(transport, msg)
        await conn.until("done")
    s = await h.sse("GET", params={"message": secret + " four"})
    await s.rest()
    h.accept(s.sid, secret + " four")
    for rec in caplog.records:
        if rec.name == "aiohttp.access":
            continue  # the test server's access log; app.py uses its own (see the next test)
        text = rec.getMessage() + (caplog.handler.format(rec) if rec.exc_info else "")
        assert secret not in text, f"message text in a log line at INFO: {rec.name}: {text[:200]}"
    await h.check()


def test_access_log_of_app_py_omits_the_query():
    line = access_log_line("GET", "/sse?message=MY-PRIVATE-QUESTION&session=abc")
    assert "/sse" in line and "MY-PRIVATE-QUESTION" not in line


async def test_an_upstream_redirect_never_carries_a_key_elsewhere(make_harness, upstream):
    """LLM APIs do not redirect a POST; if one does, no key may follow it to another origin."""
    elsewhere = FakeUpstream()
    await elsewhere.start()
    try:
        h = await make_harness(f'[providers.fake]\napi_key = "{CANARY}"\nheaders = {{"api-key" = "{HEADER_CANARY}"}}')
        upstream.push(Script([], status=307, headers={"Location": elsewhere.url + "/chat/completions"}))
        conn = await h.start("ws")
        await conn.until("done")
        for req in elsewhere.requests:
            sent = " ".join(f"{k}: {v}" for k, v in req["headers"].items())
            assert CANARY not in sent and HEADER_CANARY not in sent, f"a key followed a redirect: {sent}"
        await h.check()
    finally:
        await elsewhere.close()


# ---------------------------------------------------------------------------- proxies: whose headers are believed

DIRECT = '\n[server]\ntrusted_proxies = ["10.9.9.9"]'  # the test client connects from 127.0.0.1: not a proxy
VIA_PROXY = '\n[server]\ntrusted_proxies = ["127.0.0.1"]'
USER_HEADER = '\ntrusted_user_header = "X-Forwarded-User"'


def test_trusted_user_header_without_trusted_proxies_refuses_to_start(tmp_path, capsys):
    import app
    from nexlm.config import ConfigError, load_settings

    path = tmp_path / "nexlm.toml"
    path.write_text('[auth]\ntokens = ["a-long-enough-token-123"]\ntrusted_user_header = "X-Forwarded-User"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(str(path), env={})
    message = str(exc.value)
    assert "\n" not in message and str(path) in message and "[auth] trusted_user_header" in message
    assert "trusted_proxies" in message
    assert app.main(["--config", str(path)]) == 2
    assert "trusted_user_header" in capsys.readouterr().err
    path.write_text('[server]\ntrusted_proxies = ["not-an-address"]\n')
    with pytest.raises(ConfigError, match=r"\[server\] trusted_proxies"):
        load_settings(str(path), env={})


async def test_user_header_from_a_direct_client_is_not_believed(make_harness, upstream):
    """With tokens on, ``X-Forwarded-User: anyone`` from a client that is not a listed proxy
    got through every route and could claim another user's sessions."""
    h = await make_harness(TOKENS + USER_HEADER + DIRECT)
    anyone = {"X-Forwarded-User": "anyone"}
    assert await ws_refused(h, headers=anyone) == 401
    assert await ws_refused(h, "/api/ai/chat/websocket", headers=anyone) == 401
    for method, path in PROTECTED:
        r = await h.client.request(method, path, headers=anyone, json={"message": "hi"} if method == "POST" else None)
        assert r.status == 401, (method, path, r.status)
    r = await h.client.get("/", headers=anyone, allow_redirects=False)
    assert r.status == 302
    assert upstream.requests == [] and h.chat.stats()["sessions"] == 0
    await h.check()


async def test_user_header_from_a_direct_client_is_not_a_new_client_for_limits(make_harness, upstream):
    """Auth off: each made-up user name counted as another client, so the per-client rate never bit."""
    h = await make_harness(USER_HEADER.replace("\n", "[auth]\n", 1) + DIRECT + "\n[limits]\nmessages_per_minute = 2")
    statuses = []
    for name in ("u1", "u2", "u3", "u4"):
        s = await h.sse("GET", params={"message": f"from {name}"}, headers={"X-Forwarded-User": name})
        statuses.append(s.status)
        if s.status == 200:
            await s.rest()
            h.accept(s.sid, f"from {name}")
    assert statuses == [200, 200, 429, 429]
    owners = {s.owner for s in h.chat.views()}
    assert owners == {None}, f"a direct client named the owner: {owners}"
    await h.check()


async def test_user_header_from_a_listed_proxy_names_the_owner(make_harness, upstream):
    h = await make_harness(TOKENS + USER_HEADER + VIA_PROXY)
    alice = await h.ws(headers={"X-Forwarded-User": "alice"})
    await alice.sync()
    assert h.session(alice.sid).owner == "u:alice"
    r = await h.client.get(f"/api/sessions/{alice.sid}", headers={"X-Forwarded-User": "bob"})
    assert r.status == 404
    # Without the header, a proxied request still needs a token.
    assert (await h.client.get("/api/models")).status == 401
    await h.check()


async def test_forwarded_proto_is_believed_only_from_a_listed_proxy(make_harness, upstream):
    for config, believed in ((DIRECT, False), (VIA_PROXY, True)):
        h = await make_harness(TOKENS + config)
        port = h.client.port
        tls = {"X-Forwarded-Proto": "https"}
        r = await h.client.get("/sse", params={"session": "x"},
                               headers={**A, **tls, "Origin": f"https://127.0.0.1:{port}", "Last-Event-ID": "0"})
        assert r.status == (204 if believed else 403), config
        r = await h.client.get("/sse", params={"session": "x"},
                               headers={**A, **tls, "Origin": f"http://127.0.0.1:{port}", "Last-Event-ID": "0"})
        assert r.status == (403 if believed else 204), config
        r = await h.client.post("/login", data={"token": "tok-A-7f3c9e"}, headers=tls, allow_redirects=False)
        assert r.status == 302
        assert ("Secure" in r.headers["Set-Cookie"]) == believed, (config, r.headers["Set-Cookie"])
        await h.check()


# ---------------------------------------------------------------------------- failed sign-ins are throttled

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def freeze(h, what: str = "throttle") -> FakeClock:
    """Stop time for the guard's throttle (or login sessions), so no test depends on its speed.
    (Before this existed, there was nothing to freeze: the test then fails on its assertions.)"""

    clock = FakeClock()
    key = getattr(__import__("nexlm.appkeys").appkeys, "GUARD", None)
    if key is not None:
        setattr(getattr(h.app[key], what), "clock", clock)
    return clock


async def test_wrong_bearer_tokens_are_throttled_per_client(make_harness, upstream):
    h = await make_harness(TOKENS + VIA_PROXY)
    clock = freeze(h)
    attacker = {"X-Forwarded-For": "192.0.2.7"}
    statuses = []
    for i in range(30):
        r = await h.client.get("/api/models", headers={**attacker, "Authorization": f"Bearer guess-{i}"})
        statuses.append(r.status)
    assert 429 in statuses, "30 wrong tokens in a row were all checked"
    first = statuses.index(429)
    assert 3 <= first <= 10 and set(statuses[first:]) == {429}, statuses
    r = await h.client.get("/api/models", headers={**attacker, **A})
    assert r.status == 429, "a throttled client's correct guess must not be told apart"
    assert (await h.json(r))["code"] == "rate_limited"
    wait = int(r.headers["Retry-After"])
    assert wait >= 1
    # On the WebSocket upgrade too, before anything else happens.
    assert await ws_refused(h, headers={**attacker, "Authorization": "Bearer guess"}) == 429
    # Another client is not affected.
    assert (await h.client.get("/api/models", headers={"X-Forwarded-For": "192.0.2.8", **A})).status == 200
    clock.now += wait
    assert (await h.client.get("/api/models", headers={**attacker, **A})).status == 200
    r = await h.client.get("/api/models", headers={**attacker, "Authorization": "Bearer guess-again"})
    assert r.status == 401
    assert (await h.client.get("/api/models", headers={**attacker, "Authorization": "Bearer x"})).status == 429
    await h.check()


async def test_wrong_login_tokens_are_throttled(make_harness, upstream):
    h = await make_harness(TOKENS)
    clock = freeze(h)
    statuses = []
    for i in range(30):
        r = await h.client.post("/login", data={"token": f"guess-{i}"}, allow_redirects=False)
        statuses.append(r.status)
    assert 429 in statuses, "30 wrong tokens in a row were all checked"
    first = statuses.index(429)
    assert 3 <= first <= 10 and set(statuses[first:]) == {429}, statuses
    r = await h.client.post("/login", data={"token": "tok-A-7f3c9e"}, allow_redirects=False)
    assert r.status == 429 and "Set-Cookie" not in r.headers
    assert 'data-reason="throttled"' in await r.text(), "the page should say why, not 'wrong token'"
    wait = int(r.headers["Retry-After"])
    assert (await h.client.get("/api/models", headers={"Authorization": "Bearer tok-A-7f3c9e"})).status == 429
    clock.now += wait
    r = await h.client.post("/login", data={"token": "tok-A-7f3c9e"}, allow_redirects=False)
    assert r.status == 302 and "nexlm_token=" in r.headers["Set-Cookie"]
    await h.check()


def test_configured_tokens_have_a_length_cap(tmp_path):
    from nexlm.config import ConfigError, load_settings

    path = tmp_path / "nexlm.toml"
    path.write_text(f'[auth]\ntokens = ["{"x" * 5000}"]\n')
    with pytest.raises(ConfigError, match=r"\[auth\] tokens"):
        load_settings(str(path), env={})


async def test_an_overlong_bearer_is_refused(make_harness, upstream):
    h = await make_harness(TOKENS)
    r = await h.client.get("/api/models", headers={"Authorization": "Bearer " + "tok-A-7f3c9e" * 400})
    assert r.status == 401
    await h.check()


async def test_short_tokens_are_warned_about_at_start(make_client, caplog):
    caplog.set_level(logging.WARNING)
    await make_client('[auth]\ntokens = ["a-long-random-token-0123456789"]')
    assert not [r for r in caplog.records if "shorter than" in r.getMessage()]
    await make_client(TOKENS)
    warned = [r for r in caplog.records if "shorter than 16" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "tok-A-7f3c9e" not in caplog.text and "tok-B-21d8aa" not in caplog.text


# ---------------------------------------------------------------------------- the login cookie is a session id

async def login(h, token: str = "tok-A-7f3c9e", **kw) -> str:
    r = await h.client.post("/login", data={"token": token}, allow_redirects=False, **kw)
    assert r.status == 302, r.status
    return r.cookies["nexlm_token"].value


async def test_login_cookie_is_a_random_session_id(make_harness, upstream):
    h = await make_harness(TOKENS)
    r = await h.client.post("/login", data={"token": "tok-A-7f3c9e"}, allow_redirects=False)
    morsel = r.cookies["nexlm_token"]
    sid = morsel.value
    assert "tok-A-7f3c9e" not in sid and len(sid) >= 32
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    assert not morsel["secure"], "plain http, no proxy: a Secure cookie would never come back"
    assert 0 < int(morsel["max-age"]) <= 7 * 24 * 3600
    assert (await h.client.get("/api/models")).status == 200
    h.client.session.cookie_jar.clear()
    other = await login(h)
    assert other != sid
    # The raw token is no longer a cookie.
    h.client.session.cookie_jar.clear()
    assert (await h.client.get("/api/models", cookies={"nexlm_token": other})).status == 200
    assert (await h.client.get("/api/models", cookies={"nexlm_token": "tok-A-7f3c9e"})).status == 401
    assert (await h.client.get("/api/models", cookies={"nexlm_token": sid})).status == 200
    await h.check()


async def test_logout_revokes_the_session_id(make_harness, upstream):
    h = await make_harness(TOKENS)
    sid = await login(h)
    peer = await h.ws()
    await peer.sync()
    r = await h.client.post("/logout", allow_redirects=False)
    assert r.status == 303 and r.headers["Location"].endswith("/login")
    cleared = r.cookies["nexlm_token"]
    assert cleared.value == "" and cleared["max-age"] == "0"
    assert (await h.client.get("/api/models")).status == 401
    # A copy of the cookie kept elsewhere is dead too.
    h.client.session.cookie_jar.clear()
    assert (await h.client.get("/api/models", cookies={"nexlm_token": sid})).status == 401
    assert await ws_refused(h, headers={"Cookie": f"nexlm_token={sid}"}) == 401
    # Logging out from another site is refused (it is a POST: the Origin check applies).
    sid = await login(h)
    r = await h.client.post("/logout", headers={"Origin": "https://evil.example"}, allow_redirects=False)
    assert r.status == 403 and (await h.client.get("/api/models")).status == 200
    await h.check()


async def test_login_sessions_expire_and_are_capped(make_harness, upstream):
    h = await make_harness(TOKENS + "\nlogin_ttl_seconds = 60\nmax_logins = 2")
    clock = freeze(h, "logins")
    first = await login(h)
    h.client.session.cookie_jar.clear()
    r = await h.client.post("/login", data={"token": "tok-A-7f3c9e"}, allow_redirects=False)
    assert int(r.cookies["nexlm_token"]["max-age"]) == 60
    h.client.session.cookie_jar.clear()
    third = await login(h, "tok-B-21d8aa")
    h.client.session.cookie_jar.clear()
    assert (await h.client.get("/api/models", cookies={"nexlm_token": first})).status == 401, "over the cap"
    assert (await h.client.get("/api/models", cookies={"nexlm_token": third})).status == 200
    clock.now += 61
    assert (await h.client.get("/api/models", cookies={"nexlm_token": third})).status == 401, "expired"
    assert len(h.app[__import__("nexlm.appkeys").appkeys.GUARD].logins) <= 2
    await h.check()


# ---------------------------------------------------------------------------- log forging

def access_log_line(method: str, path: str, **kw) -> str:
    from invariants import access_log_line as line

    return line(method, path, 404, **kw)


@pytest.mark.parametrize("path", [
    "/x%0a1999-12-31 23:59:59,000 INFO nexlm.chat: FORGED", "/x%0d%0aFORGED", "/%1b[2J%1b[31mFORGED",
    "/x%e2%80%a8FORGED", "/x%c2%85FORGED", "/x%e2%80%aeFORGED", "/%00FORGED",
])
def test_access_log_escapes_control_characters(path):
    line = access_log_line("GET", path)
    assert "FORGED" in line
    assert line.isprintable() and "\u2028" not in line and "\u202e" not in line, repr(line)


def test_access_log_shortens_session_ids_in_paths():
    sid = "Zk3vQ9xLr2mWp8tYb4nCj6"
    for method, path in (("GET", f"/api/sessions/{sid}"), ("DELETE", f"/api/sessions/{sid}"),
                         ("POST", f"/api/sessions/{sid}/stop"), ("GET", f"/web/api/sessions/{sid}")):
        line = access_log_line(method, path)
        assert sid not in line and sid[:7] not in line, line
        assert f"/api/sessions/{sid[:6]}…" in line, line


async def test_real_server_log_has_no_forged_lines_session_ids_or_queries(upstream, tmp_path):
    """``python app.py``'s own stderr, with its access logger and aiohttp's request-error logging."""

    import aiohttp

    from conftest import extra_config
    from invariants import free_port, spawn_app
    cfg = tmp_path / "nexlm.toml"
    cfg.write_text(extra_config(upstream.url, ""))
    port = free_port()
    proc = await spawn_app(cfg, port)
    secret = "MY-PRIVATE-QUESTION-2718"
    try:
        async with asyncio.timeout(15):
            assert b"NexLM is running" in await proc.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as cs:
            async with cs.post(base + "/api/sessions", json={}) as r:
                assert r.status == 201
                sid = (await r.json())["session"]
            for path in (f"/api/sessions/{sid}", f"/api/sessions/{sid}/stop"):
                async with cs.request("POST" if path.endswith("stop") else "GET", base + path) as r:
                    assert r.status == 200
            ws = await cs.ws_connect(f"{base}/ws?session={sid}")
            assert (await ws.receive_json(timeout=5))["session"] == sid
            await ws.close()
            for raw_path in ("/nope%0a1999-12-31%2023:59:59,000%20INFO%20nexlm.chat:%20FORGED-LINE",
                             "/nope%1b[2J%1b]0;FORGED-TITLE%07", "/nope%e2%80%a8FORGED-LS"):
                async with cs.get(yarl_url(base + raw_path)) as r:
                    assert r.status == 404
            async with cs.get(f"{base}/sse", params={"message": secret, "session": sid}) as r:
                await r.read()
        # An over-long request line: the HTTP parser refuses it, and aiohttp logs the refusal.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /sse?session={sid}&message={secret}{'x' * 9000} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
        assert b" 400 " in status_line, status_line
        writer.close()
        # Raw control bytes in the request line itself.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /nope\x1b[31mRAW-ESC HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            await reader.readline()
        writer.close()
        await asyncio.sleep(0.2)
    finally:
        proc.terminate()
        async with asyncio.timeout(10):
            await proc.wait()
    log = (await proc.stderr.read()).decode("utf-8", "replace")
    lines = log.splitlines()
    assert any("/api/sessions/" in line for line in lines), log  # the access log is on
    assert not any(line.lstrip().startswith(("1999-12-31", "FORGED", "0;")) for line in lines), log
    assert "\x1b" not in log and "\u2028" not in log and "\x07" not in log, repr(log[-2000:])
    assert sid not in log and sid[:7] not in log, f"a full session id in the log:\n{log}"
    assert secret not in log, f"message text (a query string) in the log:\n{log}"
    assert "Traceback" not in log, log


def yarl_url(text: str):
    from yarl import URL
    return URL(text, encoded=True)


def test_trusted_proxy_ranges_are_exempt_from_the_connection_cap():
    """``trusted_proxies`` may name CIDR ranges: every address in one is exempt, others are capped."""
    from nexlm.listen import AddressCap

    cap = AddressCap(1, ("10.1.0.0/16", "127.0.0.1"))
    assert all(cap.admit("10.1.2.3") for _ in range(5)) and all(cap.admit("127.0.0.1") for _ in range(5))
    assert cap.admit("10.2.0.1") and not cap.admit("10.2.0.1")
