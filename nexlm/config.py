"""Settings: built-in defaults, then a TOML file, then the environment, frozen.

Everything configurable lives here, validated once at start so a typo is a
one-line message naming the file and the key instead of a traceback later.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .config_checks import (  # noqa: F401  (ConfigError, MAX_TOKEN_CHARS, model_names: imported from here)
    MAX_TOKEN_CHARS, ConfigError, _check_auth, _check_jwt, _check_names, _check_provider, _fail, model_names,
)
from .config_quotas import QuotaRule, QuotasConfig, parse_quotas  # noqa: F401  (QuotaRule: imported from here)
from .providers.gguf import DEFAULT_PACKAGED, PACKAGED

USER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
ANON_NAME = re.compile(r"token-[0-9]+")


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    kind: str = "openai"  # "openai" (any OpenAI-compatible API) or "llamacpp" (embedded)
    enabled: bool = True
    label: str = ""
    models: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    # kind = "openai"
    base_url: str = ""
    api_key_env: str = ""
    api_key: str = field(default="", repr=False)
    headers: dict = field(default_factory=dict, repr=False)  # fixed extra headers, config only
    connect_timeout: float = 10.0
    first_token_timeout: float = 120.0  # keep-alive comments do not count as progress
    idle_timeout: float = 60.0  # longest silence between two chunks once streaming
    max_retries: int = 2  # before the first token only: connect errors, 429, 5xx
    retry_max_seconds: float = 20.0  # total time budget for those retries
    fallback: str = ""  # a model id to try when retries are exhausted
    # kind = "llamacpp"
    model_path: str = ""
    packaged: str = ""  # with no model_path: a model shipped in a PyPI package ("": the default one)
    n_ctx: int = 2048
    n_threads: int = 0  # 0: one per core
    chat_format: str = ""  # "" : the GGUF's own template

    def resolved_key(self) -> str:
        """The API key (``api_key``, or read from ``api_key_env`` at load time); never logged."""
        return self.api_key


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    base_path: str = ""  # e.g. "/web" behind a reverse proxy that does not strip it
    allowed_origins: tuple[str, ...] = ()  # cross-origin pages allowed on /ws and /sse
    allowed_hosts: tuple[str, ...] = ()  # Host names to answer to; empty: any, or only loopback names when bound to loopback
    frame_ancestors: tuple[str, ...] = ()  # who may embed the page in an iframe
    trusted_proxies: tuple[str, ...] = ()  # peers (IPs or CIDR ranges) whose X-Forwarded-* and user header are believed
    shutdown_grace_seconds: float = 5.0  # how long running replies get on SIGTERM
    heartbeat_seconds: float = 30.0  # WebSocket ping interval; a peer that misses one is dropped
    header_timeout_seconds: float = 10.0  # a connection that sends no complete request headers in this long is closed
    max_connections_per_address: int = 100  # open connections per client address (trusted_proxies exempt); 0: no cap
    uvloop: bool = True  # use uvloop's event loop when it is installed
    log_level: str = "info"  # debug, info, warning, error (--debug: debug); one line per reply at info
    log_format: str = "text"  # "text": key=value reply lines; "json": every log line one JSON object


@dataclass(frozen=True)
class ChatConfig:
    default_model: str = ""  # "": the first available of deepseek, openai, local
    system_prompt: str = ""
    max_history_turns: int = 20  # a turn is one user message and its reply
    resume_grace_seconds: float = 30.0  # 0: a reply whose client leaves is cancelled at once
    session_ttl_seconds: float = 3600.0  # idle sessions are forgotten after this
    max_sessions: int = 1000  # least recently used sessions are evicted past this
    # A reply whose clients all left runs to its end and is stored (whatever resume_grace_seconds
    # says). None: by store kind (true for sqlite and redis, false for memory); see Settings.
    background_replies: bool | None = None


@dataclass(frozen=True)
class LimitsConfig:
    max_frame_bytes: int = 1048576  # WebSocket frame (close 1009) / HTTP body (413); holds a restore
    max_message_chars: int = 32000
    max_history_messages: int = 200  # per session; the oldest turns are dropped past this
    max_tokens_cap: int = 8192
    messages_per_minute: int = 30  # per client
    max_replies_per_client: int = 2  # concurrent
    max_replies_total: int = 256  # concurrent, whole server
    max_sessions_per_client: int = 50
    sessions_per_minute: int = 30  # new sessions per client (token bucket); 0: no limit
    max_queued_bytes: int = 4194304  # per connection, not yet written; past it the connection is closed


@dataclass(frozen=True)
class JwtConfig:
    """``[auth.jwt]``: tokens issued by an identity service. Exactly one key source."""
    secret_env: str = ""  # HS256/384/512: the shared secret is in this environment variable
    public_key_file: str = ""  # RS*/PS*/ES*/EdDSA: a PEM public key (or certificate)
    jwks_file: str = ""  # a JWKS document on disk
    jwks_url: str = ""  # a JWKS document fetched (and refetched on an unknown kid, rate limited)
    issuer: str = ""  # when set, the token's iss must equal it
    audience: str = ""  # when set, the token's aud must contain it
    user_claim: str = "sub"  # owns the sessions: "u:" + its value
    groups_claim: str = "groups"  # kept on the request for per-group rules
    leeway_seconds: float = 30.0  # clock skew allowed on exp/nbf/iat
    secret: str = field(default="", repr=False, metadata={"config": False})  # read from secret_env at load

    @property
    def enabled(self) -> bool:
        return bool(self.secret_env or self.public_key_file or self.jwks_file or self.jwks_url)


@dataclass(frozen=True)
class UserConfig:
    """``[auth.users.NAME]``: a named user with its own token; sessions and usage go under NAME."""
    name: str
    token_env: str = ""  # the token is in this environment variable (checked at start: unset is an error)
    token: str = field(default="", repr=False)  # or the token itself
    groups: tuple[str, ...] = ()  # for admin_groups and per-group rules


@dataclass(frozen=True)
class AuthConfig:
    tokens: tuple[str, ...] = field(default=(), repr=False)  # anonymous owners "token-1", "token-2", ... in order
    trusted_user_header: str = ""  # e.g. "X-Forwarded-User", set by a proxy in [server] trusted_proxies
    trusted_groups_header: str = ""  # e.g. "X-Forwarded-Groups" (comma-separated), with the user header
    admin_groups: tuple[str, ...] = ("admins",)  # members see everyone's usage
    login_ttl_seconds: float = 7 * 24 * 3600.0  # a login cookie (a server-side session id) lasts this long
    max_logins: int = 10000  # login sessions kept in memory; the oldest is dropped past this
    jwt: JwtConfig = field(default=JwtConfig(), metadata={"config": False})  # the [auth.jwt] table
    users: tuple[UserConfig, ...] = field(default=(), repr=False, metadata={"config": False})  # [auth.users.*]


STORE_KINDS = ("memory", "sqlite", "redis")


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: where conversation records live (``NEXLM_STORE`` overrides it)."""
    kind: str = "memory"  # "memory" | "sqlite" | "redis"
    path: str = "nexlm.db"  # sqlite: the database file (WAL mode), relative to the working directory
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)  # redis: may carry a password
    lease_seconds: float = 10.0  # redis: a running reply's lease; a dead instance's reply is interrupted after it


@dataclass(frozen=True)
class CompatConfig:
    """``[compat]``: for pages written for the original NexLM (the seed article's)."""
    seed_frames: bool = False  # /api/ai/chat/websocket speaks the seed's frames (plain text), not NexLM's JSON


@dataclass(frozen=True)
class MetricsConfig:
    public: bool = False  # GET /metrics without a token even when access control is on


@dataclass(frozen=True)
class CacheConfig:
    """``[cache]``: the exact-match response cache (opt-in; see nexlm/cache.py). Same backend as ``[store]``."""
    enabled: bool = False
    ttl_seconds: float = 86400.0  # an entry's lifetime
    max_entries: int = 10000  # memory and sqlite: least recently used evicted past it (redis: by TTL)
    shared: bool = False  # false: entries are per owner, so no user can probe what another asked
    any_temperature: bool = False  # false: only requests with temperature 0 or a seed are cached


@dataclass(frozen=True)
class Settings:
    server: ServerConfig = ServerConfig()
    chat: ChatConfig = ChatConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    compat: CompatConfig = CompatConfig()
    store: StoreConfig = StoreConfig()
    metrics: MetricsConfig = MetricsConfig()
    quotas: QuotasConfig = QuotasConfig()  # [quotas.default], [quotas.group.NAME], [quotas.user.NAME]
    cache: CacheConfig = CacheConfig()
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    source: str = "<built-in defaults>"

    @property
    def background_replies(self) -> bool:
        """``[chat] background_replies``, or by store kind when unset: a store that outlives
        the process keeps what a reply nobody watches goes on to say."""
        chosen = self.chat.background_replies
        return self.store.kind != "memory" if chosen is None else chosen


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
EMBEDDED_MODEL = DEFAULT_PACKAGED
EMBEDDED_LABEL = PACKAGED[DEFAULT_PACKAGED].label


def builtin_providers(env: dict[str, str] | None = None) -> dict[str, ProviderConfig]:
    """The providers that exist with no config file at all."""
    env = os.environ if env is None else env
    local_base = env.get("LOCAL_LLM_BASE_URL", "")
    if local_base:
        local = ProviderConfig(
            name="local", kind="openai", label="Local server", base_url=local_base,
            models=(env.get("LOCAL_LLM_MODEL", "") or "local-model",), aliases=("local",),
            first_token_timeout=300.0,
        )
    else:
        own = env.get("LOCAL_MODEL_PATH", "")
        local = ProviderConfig(
            name="local", kind="llamacpp",
            label=Path(own).stem if own else EMBEDDED_LABEL,
            models=(Path(own).stem if own else EMBEDDED_MODEL,), aliases=("local",),
            model_path=own,
        )
    return {
        "deepseek": ProviderConfig(
            name="deepseek", label="DeepSeek", base_url="https://api.deepseek.com",
            api_key_env="DEEPSEEK_API_KEY", models=("deepseek-chat", "deepseek-reasoner"),
            aliases=("deepseek",),
        ),
        "openai": ProviderConfig(
            name="openai", label="OpenAI", base_url="https://api.openai.com/v1",
            api_key_env="OPENAI_API_KEY", models=("gpt-4o-mini", "gpt-4o"), aliases=("chatgpt",),
        ),
        "local": local,
    }


# ---------------------------------------------------------------- validation

def _coerce(source: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of ``default`` (the field's default; None: an optional bool)."""
    if isinstance(default, bool) or default is None:
        if not isinstance(value, bool):
            raise _fail(source, key, f"expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, f"expected an integer, got {value!r}")
        if value < 0:
            raise _fail(source, key, f"must not be negative, got {value}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(source, key, f"expected a number, got {value!r}")
        if value < 0:
            raise _fail(source, key, f"must not be negative, got {value}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise _fail(source, key, f"expected a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _fail(source, key, f"expected a list of strings, got {value!r}")
        return tuple(value)
    if isinstance(default, dict):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _fail(source, key, f"expected a table of strings, got {value!r}")
        return dict(value)
    raise _fail(source, key, "unsupported setting")  # pragma: no cover


def _apply(obj: Any, table: Any, source: str, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise _fail(source, prefix, "expected a table")
    known = {f.name: f for f in fields(obj) if f.name != "name" and f.metadata.get("config", True)}
    changes = {}
    for key, value in table.items():
        if key not in known:
            raise _fail(source, f"{prefix}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
        changes[key] = _coerce(source, f"{prefix}.{key}", value, getattr(obj, key))
    return replace(obj, **changes)


def load_settings(path: str | None = None, env: dict[str, str] | None = None) -> Settings:
    """Built-ins, overridden by the TOML file at ``path`` (if any), then by the environment."""
    env = os.environ if env is None else env
    providers = builtin_providers(env)
    settings = Settings(providers=providers)
    data: dict[str, Any] = {}
    source = "<built-in defaults>"
    if path:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None

    sections = {"server": "server", "chat": "chat", "limits": "limits", "auth": "auth", "compat": "compat",
                "store": "store", "metrics": "metrics", "cache": "cache"}
    unknown = set(data) - set(sections) - {"providers", "quotas"}
    if unknown:
        raise _fail(source, f"[{sorted(unknown)[0]}]",
                    "unknown section (known: server, chat, limits, auth, compat, store, metrics, cache, providers, quotas)")
    changes = {}
    jwt_table = users_table = None
    if isinstance(data.get("auth"), dict) and ("jwt" in data["auth"] or "users" in data["auth"]):
        data["auth"] = dict(data["auth"])
        jwt_table = data["auth"].pop("jwt", None)
        users_table = data["auth"].pop("users", None)
    for key, attr in sections.items():
        if key in data:
            changes[attr] = _apply(getattr(settings, attr), data[key], source, f"[{key}]")
    settings = replace(settings, **changes)
    if jwt_table is not None:
        jwt = _check_jwt(_apply(JwtConfig(), jwt_table, source, "[auth.jwt]"), source, env)
        settings = replace(settings, auth=replace(settings.auth, jwt=jwt))
    if users_table is not None:
        settings = replace(settings, auth=replace(settings.auth, users=_users(users_table, source, env)))

    table = data.get("providers", {})
    if not isinstance(table, dict):
        raise _fail(source, "[providers]", "expected a table of providers")
    merged = dict(providers)
    for name, ptable in table.items():
        if not name or "/" in name:
            raise _fail(source, f"[providers.{name}]", "a provider name must be non-empty and contain no '/'")
        base = merged.get(name, ProviderConfig(name=name, label=name))
        p = _apply(base, ptable, source, f"[providers.{name}]")
        if isinstance(ptable, dict) and ptable.get("packaged") in PACKAGED and not p.model_path:
            chosen = PACKAGED[ptable["packaged"]]  # another packaged model: its own id and label
            p = replace(p, models=p.models if "models" in ptable else (chosen.name,),
                        label=p.label if "label" in ptable else chosen.label)
        merged[name] = p
    for name, p in merged.items():
        _check_provider(p, source)
        if not p.api_key and p.api_key_env:
            merged[name] = replace(p, api_key=env.get(p.api_key_env, ""))
    settings = replace(settings, providers={n: p for n, p in merged.items() if p.enabled}, source=source)
    if "quotas" in data:
        ids = [f"{n}/{m}" for n, p in settings.providers.items() for m in p.models]
        settings = replace(settings, quotas=parse_quotas(data["quotas"], source, ids))

    if env.get("NEXLM_TOKENS"):
        tokens = tuple(t.strip() for t in env["NEXLM_TOKENS"].split(",") if t.strip())
        settings = replace(settings, auth=replace(settings.auth, tokens=tokens))
    settings = replace(settings, store=_store(settings.store, env.get("NEXLM_STORE", ""), source))
    base_path = settings.server.base_path.rstrip("/")
    if base_path and not base_path.startswith("/"):
        raise _fail(source, "[server] base_path", f"must start with '/', got {settings.server.base_path!r}")
    settings = replace(settings, server=replace(settings.server, base_path=base_path))
    if settings.server.log_level not in LOG_LEVELS:
        raise _fail(source, "[server] log_level", f"must be one of {', '.join(LOG_LEVELS)}, "
                                                  f"got {settings.server.log_level!r}")
    if settings.server.log_format not in LOG_FORMATS:
        raise _fail(source, "[server] log_format", f"must be \"text\" or \"json\", got {settings.server.log_format!r}")
    if not 1 <= settings.server.port <= 65535:
        raise _fail(source, "[server] port", f"must be 1-65535, got {settings.server.port}")
    _check_names(settings, source)
    _check_auth(settings, source)
    if settings.cache.ttl_seconds <= 0:
        raise _fail(source, "[cache] ttl_seconds", f"must be > 0, got {settings.cache.ttl_seconds}")
    if settings.cache.max_entries < 1:
        raise _fail(source, "[cache] max_entries", f"must be >= 1, got {settings.cache.max_entries}")
    return settings


def _users(table: Any, source: str, env) -> tuple[UserConfig, ...]:
    """``[auth.users.NAME]`` tables; a token_env that is unset stops the start (a user who cannot sign in
    would otherwise look like a wrong token)."""
    if not isinstance(table, dict):
        raise _fail(source, "[auth.users]", "expected a table of users")
    users = []
    for name, utable in table.items():
        where = f"[auth.users.{name}]"
        if not USER_NAME.fullmatch(name) or ANON_NAME.fullmatch(name):
            raise _fail(source, where, "a user name is 1-64 letters, digits or . _ @ - and not token-N "
                        "(the names of [auth] tokens)")
        user = _apply(UserConfig(name=name), utable, source, where)
        if bool(user.token) == bool(user.token_env):
            raise _fail(source, where, "set exactly one of token, token_env")
        if user.token_env:
            token = env.get(user.token_env, "").strip()
            if not token:
                raise _fail(source, f"{where} token_env", f"the environment variable {user.token_env} is not set")
            user = replace(user, token=token)
        users.append(user)
    return tuple(users)


def _store(store: StoreConfig, override: str, source: str) -> StoreConfig:
    """``[store]``, with ``NEXLM_STORE`` (``memory``, ``sqlite:PATH``, ``redis://...``) on top."""
    if override:
        if override == "memory":
            store = replace(store, kind="memory")
        elif override.startswith("sqlite:") and len(override) > len("sqlite:"):
            store = replace(store, kind="sqlite", path=override[len("sqlite:"):])
        elif override.startswith(("redis://", "rediss://")):
            store = replace(store, kind="redis", url=override)
        else:
            raise ConfigError(f"NEXLM_STORE: expected memory, sqlite:PATH or a redis:// or rediss:// URL, "
                              f"got {override.split(':', 1)[0]!r}...")
    if store.kind not in STORE_KINDS:
        raise _fail(source, "[store] kind", f"must be one of {', '.join(STORE_KINDS)}, got {store.kind!r}")
    if store.kind == "sqlite" and not store.path:
        raise _fail(source, "[store] path", "must name the database file")
    if store.kind == "redis" and not store.url.startswith(("redis://", "rediss://")):
        raise _fail(source, "[store] url", "must start with redis:// or rediss://")
    return store
