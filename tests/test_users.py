"""Who is who: named users ([auth.users.NAME]), anonymous tokens named token-N, the trusted groups
header, admin_groups, and the one ``clients.who(request)`` every feature asks."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from invariants import make_harness  # noqa: F401  (fixtures)

from nexlm.appkeys import GROUPS, GUARD, PRINCIPAL, SETTINGS
from nexlm.clients import Who, is_admin, principal_of, who
from nexlm.config import ConfigError, load_settings

USERS = ('[auth]\ntokens = ["anon-token-one-0001", "anon-token-two-0002"]\n'
         '[auth.users.alice]\ntoken = "alice-token-000000001"\ngroups = ["staff", "admins"]\n'
         '[auth.users.bob]\ntoken_env = "BOB_TOKEN"\n')
ENV = {"BOB_TOKEN": "bob-token-0000000002"}


def load(tmp_path, text: str, env: dict | None = None):
    path = tmp_path / "nexlm.toml"
    path.write_text(text)
    return load_settings(str(path), env=env or {})


def request_as(settings, principal, groups=()):
    app = web.Application()
    app[SETTINGS] = settings
    req = make_mocked_request("GET", "/api/usage", app=app)
    req[PRINCIPAL], req[GROUPS] = principal, groups
    return req


def test_users_are_loaded_with_tokens_from_the_environment(tmp_path):
    s = load(tmp_path, USERS, ENV)
    assert [(u.name, u.token, u.groups) for u in s.auth.users] == [
        ("alice", "alice-token-000000001", ("staff", "admins")), ("bob", "bob-token-0000000002", ())]
    assert s.auth.admin_groups == ("admins",)
    assert "alice-token" not in repr(s), "a token in the settings' repr would reach logs"


@pytest.mark.parametrize("text, env, where", [
    (USERS, {}, r"\[auth.users.bob\] token_env.*BOB_TOKEN is not set"),
    ('[auth]\ntokens = ["same-token-0000000"]\n[auth.users.x]\ntoken = "same-token-0000000"\n', {},
     r"\[auth.users.x\]: the same token as \[auth\] tokens \(token-1\)"),
    ('[auth.users.x]\ntoken = "t-00000000000000000"\n[auth.users.y]\ntoken = "t-00000000000000000"\n', {},
     r"\[auth.users.y\]: the same token as \[auth.users.x\]"),
    ('[auth.users.x]\ngroups = ["a"]\n', {}, r"exactly one of token, token_env"),
    ('[auth.users."token-3"]\ntoken = "t-00000000000000000"\n', {}, r"not token-N"),
    ('[auth.users."a b"]\ntoken = "t-00000000000000000"\n', {}, r"a user name is"),
    ('[auth.users.x]\ntoken = "t-00000000000000000"\ncolour = "red"\n', {}, r"\[auth.users.x\].colour: unknown key"),
    ('[auth]\ntrusted_groups_header = "X-Groups"\n', {}, r"trusted_groups_header.*needs \[auth\] trusted_user_header"),
])
def test_bad_user_config_stops_the_start(tmp_path, text, env, where):
    with pytest.raises(ConfigError, match=where):
        load(tmp_path, text, env)


def test_who_names_tokens_in_order_and_users_by_name(tmp_path):
    s = load(tmp_path, USERS, ENV)
    assert who(request_as(s, principal_of("anon-token-one-0001"))).name == "token-1"
    assert who(request_as(s, principal_of("anon-token-two-0002"))).name == "token-2"
    alice = who(request_as(s, "u:alice", ("staff", "admins")))
    assert alice == Who("alice", ("staff", "admins"), "u:alice")
    assert is_admin(request_as(s, "u:alice", ("admins",)))
    assert not is_admin(request_as(s, "u:bob", ("staff",)))
    nobody = who(request_as(s, None))
    assert nobody.name is None and nobody.groups == () and nobody.client  # the client address
    assert not is_admin(request_as(s, None, ("admins",)))


async def test_a_named_users_token_owns_sessions_as_that_user(make_harness, upstream):
    h = await make_harness(USERS, env=ENV)
    peer = await h.ws(headers={"Authorization": "Bearer alice-token-000000001"})
    await peer.sync()
    assert h.session(peer.sid).owner == "u:alice"
    assert h.client.app[GUARD].static_who("alice-token-000000001") == ("u:alice", ("staff", "admins"))
    assert h.client.app[GUARD].static_who("bob-token-0000000002") == ("u:bob", ())
    anon = await h.ws(headers={"Authorization": "Bearer anon-token-two-0002"})
    await anon.sync()
    assert h.session(anon.sid).owner == principal_of("anon-token-two-0002")  # sessions keep the hashed owner
    r = await h.client.get(f"/api/sessions/{peer.sid}", headers={"Authorization": "Bearer bob-token-0000000002"})
    assert r.status == 404
    await h.check()


async def test_the_login_form_takes_a_named_users_token(make_harness, upstream):
    h = await make_harness(USERS, env=ENV)
    r = await h.client.post("/login", data={"token": "alice-token-000000001"}, allow_redirects=False)
    assert r.status == 302
    peer = await h.ws()  # with the cookie jar's login cookie
    await peer.sync()
    assert h.session(peer.sid).owner == "u:alice"
    await h.check()


async def test_trusted_groups_header_comes_with_the_user_header_from_a_proxy(make_harness, upstream):
    from nexlm.security import Guard

    h = await make_harness('[auth]\ntrusted_user_header = "X-Forwarded-User"\ntrusted_groups_header = "X-Forwarded-Groups"\n'
                           '[server]\ntrusted_proxies = ["127.0.0.1"]')
    guard: Guard = h.client.app[GUARD]
    req = make_mocked_request("GET", "/api/models", headers={"X-Forwarded-User": "carol",
                                                             "X-Forwarded-Groups": "staff, admins,,"},
                              app=h.client.app, transport=_Peer("127.0.0.1"))
    assert await guard._authenticate(req, "/api/models") == ("u:carol", ("staff", "admins"))
    direct = make_mocked_request("GET", "/api/models", headers={"X-Forwarded-User": "carol",
                                                                "X-Forwarded-Groups": "admins"},
                                 app=h.client.app, transport=_Peer("10.9.9.9"))
    assert await guard._authenticate(direct, "/api/models") == (None, ())  # auth off; a stranger's headers ignored
    await h.check()


class _Peer:
    """A transport whose peer address make_mocked_request reports as request.remote."""

    def __init__(self, host: str) -> None:
        self.host = host

    def get_extra_info(self, name, default=None):
        return (self.host, 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False
