"""The checks a loaded configuration must pass before the server starts.

Each failure is one ``ConfigError`` line naming the file and the key, so a typo
stops the start (exit 2) instead of answering 500s later.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .providers.gguf import PACKAGED

if TYPE_CHECKING:
    from .config import JwtConfig, ProviderConfig, Settings


class ConfigError(Exception):
    """A bad setting; the message names the file and the key."""


def _fail(source: str, key: str, why: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {why}")


def _check_provider(p: ProviderConfig, source: str) -> None:
    where = f"[providers.{p.name}]"
    if p.kind not in ("openai", "llamacpp"):
        raise _fail(source, f"{where} kind", f"must be \"openai\" or \"llamacpp\", got {p.kind!r}")
    if p.kind == "openai" and p.enabled:
        _check_url(p.base_url, source, f"{where} base_url")
    if p.kind == "llamacpp" and p.enabled:
        if p.model_path and not Path(p.model_path).expanduser().is_file():
            raise _fail(source, f"{where} model_path", f"no such file: {p.model_path}")
        if p.packaged and p.packaged not in PACKAGED:
            raise _fail(source, f"{where} packaged", f"unknown packaged model {p.packaged!r} "
                        f"(known: {', '.join(PACKAGED)})")
    if p.enabled and not p.models:
        raise _fail(source, f"{where} models", "needs at least one model")
    for m in p.models:
        if not m or "/" in m and p.kind == "llamacpp":
            raise _fail(source, f"{where} models", f"bad model name {m!r}")
    for a in p.aliases:
        if not a or "/" in a:
            raise _fail(source, f"{where} aliases", f"an alias must be non-empty and contain no '/', got {a!r}")


def _check_url(url: str, source: str, key: str) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        host, parts = None, None
    if parts is None or parts.scheme not in ("http", "https") or not host or any(c.isspace() for c in url):
        raise _fail(source, key, f"must be an http(s) URL such as https://api.example.com/v1, got {url!r}")
    if parts.username or parts.password:
        raise _fail(source, key, "must not contain credentials; put the key in api_key or api_key_env")


def model_names(providers: dict[str, ProviderConfig]) -> dict[str, str]:
    """Every name a client may use for a model -> its ``provider/model`` id.

    A provider's name and aliases mean its first model; ``provider/model`` means
    itself; a bare model name works when exactly one provider serves it.
    """
    names: dict[str, str] = {}
    for name, p in providers.items():
        first = f"{name}/{p.models[0]}"
        names[name] = first
        for alias in p.aliases:
            names.setdefault(alias, first)
        for m in p.models:
            names[f"{name}/{m}"] = f"{name}/{m}"
    bare: dict[str, list[str]] = {}
    for name, p in providers.items():
        for m in p.models:
            bare.setdefault(m, []).append(f"{name}/{m}")
    for m, ids in bare.items():
        if len(ids) == 1:
            names.setdefault(m, ids[0])
    return names


def _check_names(settings: Settings, source: str) -> None:
    """Every setting that names a model or provider must name one that exists: found at start,
    a typo is one line and exit 2, never a 500 on the first request."""
    owner: dict[str, str] = {}
    for name in settings.providers:
        owner[name] = name
    for name, p in settings.providers.items():
        for alias in p.aliases:
            if owner.get(alias, name) != name:
                raise _fail(source, f"[providers.{name}] aliases",
                            f"{alias!r} already names provider {owner[alias]!r}")
            owner[alias] = name
    names = model_names(settings.providers)
    known = ", ".join(sorted(names))

    def resolve(key: str, value: str) -> str:
        if value not in names:
            raise _fail(source, key, f"unknown model {value!r} (known: {known or 'none'})")
        return names[value]

    if settings.chat.default_model:
        resolve("[chat] default_model", settings.chat.default_model)
    for name, p in settings.providers.items():
        if p.fallback:
            target = resolve(f"[providers.{name}] fallback", p.fallback)
            if p.models == (target.partition("/")[2],) and target.partition("/")[0] == name:
                raise _fail(source, f"[providers.{name}] fallback",
                            f"{p.fallback!r} is {name}'s only model; name another one")


MAX_TOKEN_CHARS = 1024  # longer supplied tokens are refused unread


def _check_auth(settings: Settings, source: str) -> None:
    for entry in settings.server.trusted_proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise _fail(source, "[server] trusted_proxies", f"not an IP address or CIDR range: {entry!r}") from None
    auth = settings.auth
    if auth.trusted_user_header and not settings.server.trusted_proxies:
        raise _fail(source, "[auth] trusted_user_header",
                    "needs [server] trusted_proxies (the proxies that set it); otherwise any client could name itself")
    if auth.trusted_groups_header and not auth.trusted_user_header:
        raise _fail(source, "[auth] trusted_groups_header", "needs [auth] trusted_user_header (groups belong to a user)")
    seen: dict[str, str] = {}
    owners = [(t, f"[auth] tokens (token-{i})") for i, t in enumerate(auth.tokens, 1)]
    owners += [(u.token, f"[auth.users.{u.name}]") for u in auth.users]
    for token, where in owners:
        if len(token) > MAX_TOKEN_CHARS:
            raise _fail(source, where, f"a token is longer than {MAX_TOKEN_CHARS} characters")
        if token in seen:  # which owner would it be? Refused rather than guessed.
            raise _fail(source, where, f"the same token as {seen[token]}; each owner needs its own")
        seen[token] = where
    if auth.login_ttl_seconds <= 0 or auth.max_logins < 1:
        raise _fail(source, "[auth] login_ttl_seconds" if auth.login_ttl_seconds <= 0 else "[auth] max_logins",
                    "must be positive")


def _check_jwt(cfg: JwtConfig, source: str, env: dict[str, str]) -> JwtConfig:
    """Exactly one key source, and that source loads: a missing or unparsable key stops the start."""
    where = "[auth.jwt]"
    given = [k for k in ("secret_env", "public_key_file", "jwks_file", "jwks_url") if getattr(cfg, k)]
    if len(given) != 1:
        raise _fail(source, where, "set exactly one of secret_env, public_key_file, jwks_file, jwks_url"
                    + (f" (got {', '.join(given)})" if given else ""))
    if not cfg.user_claim:
        raise _fail(source, f"{where} user_claim", "must not be empty")
    from . import jwt_auth  # PyJWT is needed only when JWTs are configured

    key = given[0]
    try:
        if key == "secret_env":
            secret = env.get(cfg.secret_env, "")
            if not secret:
                raise ValueError(f"the environment variable {cfg.secret_env} is not set")
            jwt_auth.hmac_key(secret)
            cfg = replace(cfg, secret=secret)
        elif key == "public_key_file":
            jwt_auth.load_public_key_file(cfg.public_key_file)
        elif key == "jwks_file":
            jwt_auth.load_jwks_file(cfg.jwks_file)
        elif not cfg.jwks_url.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {cfg.jwks_url!r}")
    except ValueError as exc:
        raise _fail(source, f"{where} {key}", str(exc)) from None
    return cfg
