"""JWTs from an identity service (``[auth.jwt]``): minted here with keys made here, checked
over real HTTP on 127.0.0.1 (a JWKS is served by a local aiohttp server).

Accepted from ``Authorization: Bearer``, the ``AUTH-TOKEN`` cookie, and ``?token=`` on the
WebSocket upgrade only. Every refusal is the same 401 ``unauthorized`` body; the reason goes
to the server's log, the token never does. Sessions belong to the token's user.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time

import jwt
import pytest
from aiohttp import WSServerHandshakeError, web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import extra_config
from invariants import make_harness  # noqa: F401  (fixture)
from nexlm.config import ConfigError, load_settings
from nexlm.appkeys import GUARD
from nexlm.server import create_app
from nexlm.appkeys import GROUPS, PRINCIPAL

SECRET = "a-shared-secret-of-more-than-32-bytes-0123456789"
ENV = {"NEXLM_TEST_JWT_SECRET": SECRET}
ISS = "https://id.intranet.example"
AUD = "nexlm"
HS = f'[auth.jwt]\nsecret_env = "NEXLM_TEST_JWT_SECRET"\nissuer = "{ISS}"\naudience = "{AUD}"'
UNAUTHORIZED = {"type": "error", "code": "unauthorized", "message": "A valid access token is required."}


def claims(**over) -> dict:
    now = int(time.time())
    base = {"sub": "alice", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 600, "groups": ["staff", "ml"]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def hs(**over) -> str:
    return jwt.encode(claims(**over), SECRET, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, payload: dict, key: bytes | None = None) -> str:
    """A token built by hand: PyJWT refuses to make the malicious ones."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest() if key is not None else b""
    return signing_input + "." + b64(sig)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


def pem(private) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def jwk(private, kid: str, alg: str) -> dict:
    algo = {"RS256": jwt.algorithms.RSAAlgorithm, "ES256": jwt.algorithms.ECAlgorithm}[alg]
    return {**json.loads(algo.to_jwk(private.public_key())), "kid": kid, "alg": alg, "use": "sig"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ours(caplog) -> str:
    """Every log line but the test server's access log (app.py uses its own, tested below)."""
    return "\n".join(caplog.handler.format(r) for r in caplog.records if r.name != "aiohttp.access")


async def refused(h, path: str = "/api/models", **kw) -> None:
    r = await h.client.get(path, **kw)
    assert r.status == 401, (path, r.status)
    assert await h.json(r) == UNAUTHORIZED, "a refusal must not say why"


async def ws_refused(h, path: str = "/ws", **kw) -> int:
    before = h.chat.stats()["sessions"]
    with pytest.raises(WSServerHandshakeError) as exc:
        await h.client.ws_connect(path, **kw)
    assert h.chat.stats()["sessions"] == before, "a session was created before the refusal"
    return exc.value.status


# ---------------------------------------------------------------------------- accepted

async def test_hs256_bearer_and_sessions_belong_to_the_user(make_harness, upstream):
    h = await make_harness('[auth]\ntokens = ["a-static-token-0123456789"]\n' + HS, env=ENV)
    alice = await h.ws(headers=bearer(hs()))
    assert (await alice.chat("alice's private question"))["type"] == "start"
    await alice.until("done")
    assert h.session(alice.sid).owner == "u:alice"
    # Another token of the same user (a later one) is the same owner ...
    again = bearer(hs(iat=int(time.time()) - 5))
    r = await h.client.get(f"/api/sessions/{alice.sid}", headers=again)
    assert r.status == 200 and (await h.json(r))["session"] == alice.sid
    # ... another user is not: the session does not exist for bob, and he cannot attach to it.
    bob = bearer(hs(sub="bob"))
    for method, path in (("GET", f"/api/sessions/{alice.sid}"), ("POST", f"/api/sessions/{alice.sid}/stop"),
                         ("DELETE", f"/api/sessions/{alice.sid}")):
        r = await h.client.request(method, path, headers=bob)
        assert r.status == 404, (method, path)
    peer = await h.ws(f"/ws?session={alice.sid}&after=0", headers=bob)
    assert peer.sid != alice.sid and peer.frames[0]["history"] == []
    r = await h.client.get("/sse", params={"session": alice.sid}, headers={**bob, "Last-Event-ID": "0"})
    assert r.status == 204
    # SSE with a JWT, and the static token still works alongside.
    s = await h.sse("GET", params={"message": "over sse"}, headers=bearer(hs(sub="carol")))
    assert s.status == 200 and h.session(s.sid).owner == "u:carol"
    await s.rest()
    h.accept(s.sid, "over sse")
    assert (await h.client.get("/api/models", headers=bearer("a-static-token-0123456789"))).status == 200
    assert "alice's private question" not in "".join(c.raw[0] for c in h.conns if c.sid != alice.sid)
    await h.check()


@pytest.mark.parametrize("kind, alg", [("rsa", "RS256"), ("rsa", "PS384"), ("ec", "ES256"), ("ed", "EdDSA")])
async def test_public_key_file(make_harness, upstream, keys, tmp_path, kind, alg):
    (tmp_path / "id.pem").write_bytes(pem(keys[kind]))
    h = await make_harness(f'[auth.jwt]\npublic_key_file = "{tmp_path / "id.pem"}"\nissuer = "{ISS}"\n'
                           f'audience = "{AUD}"')
    token = jwt.encode(claims(sub="dave"), keys[kind], algorithm=alg)
    peer = await h.ws(headers=bearer(token))
    await peer.sync()
    assert h.session(peer.sid).owner == "u:dave"
    other = {"rsa": keys["rsa2"], "ec": ec.generate_private_key(ec.SECP256R1()),
             "ed": ed25519.Ed25519PrivateKey.generate()}[kind]
    await refused(h, headers=bearer(jwt.encode(claims(), other, algorithm=alg)))
    await h.check()


async def test_jwks_file_picks_the_key_by_kid(make_harness, upstream, keys, tmp_path):
    doc = {"keys": [jwk(keys["rsa"], "k-rsa", "RS256"), jwk(keys["ec"], "k-ec", "ES256")]}
    (tmp_path / "jwks.json").write_text(json.dumps(doc))
    h = await make_harness(f'[auth.jwt]\njwks_file = "{tmp_path / "jwks.json"}"\naudience = "{AUD}"')
    for kid, key, alg in (("k-rsa", keys["rsa"], "RS256"), ("k-ec", keys["ec"], "ES256")):
        token = jwt.encode(claims(), key, algorithm=alg, headers={"kid": kid})
        assert (await h.client.get("/api/models", headers=bearer(token))).status == 200, kid
    # The right kid with another key's signature, an unknown kid, no kid among two keys.
    await refused(h, headers=bearer(jwt.encode(claims(), keys["ec"], algorithm="ES256", headers={"kid": "k-rsa"})))
    await refused(h, headers=bearer(jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "k-9"})))
    await refused(h, headers=bearer(jwt.encode(claims(), keys["rsa"], algorithm="RS256")))
    await h.check()


async def test_auth_token_cookie(make_harness, upstream):
    h = await make_harness(HS, env=ENV)
    cookie = {"Cookie": f"AUTH-TOKEN={hs(sub='erin')}"}
    r = await h.client.get("/", headers=cookie, allow_redirects=False)
    assert r.status == 200
    assert (await h.client.get("/api/models", headers=cookie)).status == 200
    peer = await h.ws(headers=cookie)
    await peer.sync()
    assert h.session(peer.sid).owner == "u:erin"
    expired = {"Cookie": f"AUTH-TOKEN={hs(exp=int(time.time()) - 3600)}"}
    r = await h.client.get("/", headers=expired, allow_redirects=False)
    assert r.status == 302 and r.headers["Location"].endswith("/login")
    await refused(h, headers=expired)
    await h.check()


async def test_query_token_only_on_the_websocket_upgrade(make_harness, upstream, caplog):
    caplog.set_level(logging.DEBUG)
    h = await make_harness(HS, env=ENV)
    token = hs(sub="frank")
    for path in ("/ws", "/api/ai/chat/websocket"):
        peer = await h.ws(f"{path}?token={token}")
        assert (await peer.chat("hi"))["type"] == "start"
        await peer.until("done")
        assert h.session(peer.sid).owner == "u:frank"
    sid = peer.sid
    for path in (f"/sse?message=hi&token={token}", f"/api/models?token={token}",
                 f"/api/sessions/{sid}?token={token}", f"/api/metrics?token={token}"):
        await refused(h, path)
    r = await h.client.post(f"/sse?token={token}", json={"message": "hi"})
    assert r.status == 401
    r = await h.client.get(f"/?token={token}", allow_redirects=False)
    assert r.status == 302
    assert len(upstream.requests) == 2, "a refused request reached the upstream"
    assert token not in ours(caplog), "the token is in a log line"
    await h.check()


def test_the_access_log_never_shows_a_query_token():
    from invariants import access_log_line

    token = hs()
    line = access_log_line("GET", f"/ws?token={token}", 101)
    assert "/ws" in line and token not in line


async def test_groups_are_kept_on_the_request(aiohttp_client, upstream, tmp_path):
    path = tmp_path / "nexlm.toml"
    path.write_text(extra_config(upstream.url, HS))
    app = create_app(load_settings(str(path), env=ENV))

    async def whoami(request):
        return web.json_response({"principal": request[PRINCIPAL], "groups": list(request[GROUPS])})

    app.router.add_get("/whoami", whoami)
    client = await aiohttp_client(app)
    r = await client.get("/whoami", headers=bearer(hs(sub="gina", groups=["staff", "ml"])))
    assert await r.json() == {"principal": "u:gina", "groups": ["staff", "ml"]}
    r = await client.get("/whoami", headers=bearer(hs(sub="hal", groups=None)))
    assert await r.json() == {"principal": "u:hal", "groups": []}


# ---------------------------------------------------------------------------- refused

def _none(keys):
    return forge({"alg": "none", "typ": "JWT"}, claims())


def _confusion(keys):
    """The RS256 public key, as published, used as an HS256 secret."""
    return forge({"alg": "HS256", "typ": "JWT"}, claims(), pem(keys["rsa"]))


REFUSALS = {
    "alg none": ("rsa", _none),
    "alg none, HS server": ("hs", _none),
    "RS256 public key as an HS256 secret": ("rsa", _confusion),
    "RS256 token to an HS256 server": ("hs", lambda k: jwt.encode(claims(), k["rsa"], algorithm="RS256")),
    "expired": ("hs", lambda k: hs(exp=int(time.time()) - 3600)),
    "not yet valid": ("hs", lambda k: hs(nbf=int(time.time()) + 3600)),
    "no exp": ("hs", lambda k: jwt.encode(claims(exp=None), SECRET, algorithm="HS256")),
    "wrong issuer": ("hs", lambda k: hs(iss="https://evil.example")),
    "no issuer": ("hs", lambda k: hs(iss=None)),
    "wrong audience": ("hs", lambda k: hs(aud="another-service")),
    "no audience": ("hs", lambda k: hs(aud=None)),
    "wrong secret": ("hs", lambda k: jwt.encode(claims(), "another-secret-that-is-also-long-enough-0123",
                                                algorithm="HS256")),
    "no subject": ("hs", lambda k: hs(sub=None)),
    "unknown kid": ("jwks", lambda k: jwt.encode(claims(), k["rsa"], algorithm="RS256", headers={"kid": "nope"})),
    "tampered payload": ("hs", lambda k: hs().split(".")[0] + "." + b64(json.dumps(claims(sub="root")).encode())
                         + "." + hs().split(".")[2]),
    "garbage": ("hs", lambda k: "abc.def.ghi"),
    "garbage, base64 json": ("hs", lambda k: b64(b"[1]") + "." + b64(b"{}") + "."),
}


@pytest.mark.parametrize("name", list(REFUSALS))
async def test_refused_tokens(make_harness, upstream, keys, tmp_path, caplog, name):
    caplog.set_level(logging.DEBUG)
    server, make = REFUSALS[name]
    (tmp_path / "id.pem").write_bytes(pem(keys["rsa"]))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk(keys["rsa"], "k1", "RS256")]}))
    config = {"hs": HS,
              "rsa": f'[auth.jwt]\npublic_key_file = "{tmp_path / "id.pem"}"\nissuer = "{ISS}"\naudience = "{AUD}"',
              "jwks": f'[auth.jwt]\njwks_file = "{tmp_path / "jwks.json"}"\nissuer = "{ISS}"\naudience = "{AUD}"'}
    h = await make_harness(config[server], env=ENV)
    token = make(keys)
    await refused(h, headers=bearer(token))
    assert await ws_refused(h, headers=bearer(token)) == 401
    assert await ws_refused(h, f"/ws?token={token}") == 401
    await refused(h, headers={"Cookie": f"AUTH-TOKEN={token}"})
    assert upstream.requests == [] and h.chat.stats()["sessions"] == 0
    assert token not in ours(caplog), "the token is in a log line"
    assert any("JWT refused" in r.getMessage() for r in caplog.records), "the reason was not logged"
    await h.check()


async def test_failed_jwts_are_throttled(make_harness, upstream):
    h = await make_harness(HS, env=ENV)
    h.app[GUARD].throttle.clock = FakeClock()
    statuses = [(await h.client.get("/api/models", headers=bearer(hs(exp=1)))).status for _ in range(15)]
    assert statuses[0] == 401 and statuses[-1] == 429, statuses
    assert (await h.client.get("/api/models", headers=bearer(hs()))).status == 429
    # The cookie is not a guess: a browser with a good one is not locked out by its stale Bearer.
    assert (await h.client.get("/api/models", headers={"Cookie": f"AUTH-TOKEN={hs()}"})).status == 200
    await h.check()


# ---------------------------------------------------------------------------- jwks_url

@pytest.fixture
async def jwks_server(aiohttp_server):
    state = {"keys": [], "fetches": 0, "status": 200}

    async def serve(request):
        state["fetches"] += 1
        return web.json_response({"keys": state["keys"]}, status=state["status"])

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", serve)
    server = await aiohttp_server(app)
    state["url"] = str(server.make_url("/.well-known/jwks.json"))
    return state


async def test_jwks_url_fetched_cached_and_refreshed_on_an_unknown_kid(make_harness, upstream, keys, jwks_server):
    jwks_server["keys"] = [jwk(keys["rsa"], "k1", "RS256")]
    h = await make_harness(f'[auth.jwt]\njwks_url = "{jwks_server["url"]}"\naudience = "{AUD}"')
    cache = h.app[GUARD].jwt.jwks
    clock = cache.clock = FakeClock()

    def token(kid, key="rsa", alg="RS256", **over):
        return jwt.encode(claims(**over), keys[key], algorithm=alg, headers={"kid": kid})

    assert jwks_server["fetches"] == 0, "fetched before it was needed"
    peer = await h.ws(headers=bearer(token("k1")))
    await peer.sync()
    for _ in range(5):
        assert (await h.client.get("/api/models", headers=bearer(token("k1")))).status == 200
    assert jwks_server["fetches"] == 1, "the keys were not cached"
    # Unknown kids (anyone can make them up) do not make us fetch in a loop.
    jwks_server["keys"].append(jwk(keys["ec"], "k2", "ES256"))
    results = await asyncio.gather(*(h.client.get("/api/models", headers={"Cookie": f"AUTH-TOKEN={token(f'x{i}')}"})
                                     for i in range(20)))
    assert [r.status for r in results] == [401] * 20
    await refused(h, headers={"Cookie": f"AUTH-TOKEN={token('k2', 'ec', 'ES256')}"})
    assert jwks_server["fetches"] == 1
    # After the minimum interval, an unknown kid refreshes the keys: a rotated-in key works.
    clock.now += cache.MIN_INTERVAL + 1
    results = await asyncio.gather(*(h.client.get("/api/models", headers=bearer(token("k2", "ec", "ES256")))
                                     for _ in range(5)))
    assert [r.status for r in results] == [200] * 5
    assert jwks_server["fetches"] == 2, "concurrent requests fetched more than once"
    # A failing JWKS endpoint keeps the keys we have.
    jwks_server["status"] = 500
    clock.now += cache.MAX_AGE + 1
    assert (await h.client.get("/api/models", headers=bearer(token("k1")))).status == 200
    assert jwks_server["fetches"] == 3
    await h.check()


# ---------------------------------------------------------------------------- configuration

def _write(tmp_path, name: str, data) -> str:
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


CONFIG_ERRORS = {
    "two sources": ('secret_env = "NEXLM_TEST_JWT_SECRET"\njwks_url = "https://id.example/jwks"', "[auth.jwt]"),
    "no source": (f'issuer = "{ISS}"', "[auth.jwt]"),
    "secret_env unset": ('secret_env = "NEXLM_TEST_UNSET_VARIABLE"', "[auth.jwt] secret_env"),
    "short secret": ('secret_env = "SHORT"', "[auth.jwt] secret_env"),
    "no such key file": ('public_key_file = "{tmp}/missing.pem"', "[auth.jwt] public_key_file"),
    "garbage key file": ('public_key_file = "{garbage}"', "[auth.jwt] public_key_file"),
    "private key file": ('public_key_file = "{private}"', "[auth.jwt] public_key_file"),
    "small rsa key": ('public_key_file = "{small}"', "[auth.jwt] public_key_file"),
    "jwks not json": ('jwks_file = "{garbage}"', "[auth.jwt] jwks_file"),
    "jwks symmetric key": ('jwks_file = "{oct}"', "[auth.jwt] jwks_file"),
    "jwks_url not http": ('jwks_url = "file:///etc/jwks.json"', "[auth.jwt] jwks_url"),
    "unknown key": ('secret_env = "NEXLM_TEST_JWT_SECRET"\nalgorithms = ["none"]', "[auth.jwt].algorithms"),
    "bad leeway": ('secret_env = "NEXLM_TEST_JWT_SECRET"\nleeway_seconds = "lots"', "[auth.jwt].leeway_seconds"),
}


@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_config_errors_name_the_key(tmp_path, keys, name):
    body, key = CONFIG_ERRORS[name]
    private = keys["ec"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    files = {"tmp": str(tmp_path), "garbage": _write(tmp_path, "garbage.pem", "not a key at all\n"),
             "private": _write(tmp_path, "private.pem", private), "small": _write(tmp_path, "small.pem", pem(small)),
             "oct": _write(tmp_path, "oct.json", json.dumps({"keys": [{"kty": "oct", "k": b64(b"k" * 40)}]}))}
    path = _write(tmp_path, "nexlm.toml", "[auth.jwt]\n" + body.format(**files) + "\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(path, env={**ENV, "SHORT": "too-short"})
    message = str(exc.value)
    assert "\n" not in message and message.startswith(path) and key in message, message
    assert SECRET not in message and "too-short" not in message


def test_a_bad_jwt_config_exits_2(tmp_path, capsys):
    import app

    path = _write(tmp_path, "nexlm.toml", '[auth.jwt]\npublic_key_file = "/nonexistent/key.pem"\n')
    assert app.main(["--config", path]) == 2
    assert "[auth.jwt] public_key_file" in capsys.readouterr().err


def test_jwt_settings_load(tmp_path, keys):
    key = _write(tmp_path, "id.pem", pem(keys["ec"]))
    path = _write(tmp_path, "nexlm.toml", f'[auth.jwt]\npublic_key_file = "{key}"\nuser_claim = "preferred_username"\n'
                                          'groups_claim = "roles"\nleeway_seconds = 5\n')
    cfg = load_settings(path, env={}).auth.jwt
    assert cfg.enabled and cfg.user_claim == "preferred_username" and cfg.groups_claim == "roles"
    assert cfg.leeway_seconds == 5.0 and cfg.issuer == "" and cfg.audience == ""
    assert not load_settings(None, env={}).auth.jwt.enabled
    path = _write(tmp_path, "nexlm.toml", '[auth.jwt]\nsecret_env = "NEXLM_TEST_JWT_SECRET"\n')
    cfg = load_settings(path, env=ENV).auth.jwt
    assert cfg.secret == SECRET and SECRET not in repr(cfg)
