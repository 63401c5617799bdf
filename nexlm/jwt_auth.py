"""JWTs from an intranet identity service (``[auth.jwt]``), verified by PyJWT.

Why a module of its own: token verification is easy to get subtly wrong, so none of it
is written here; this module only decides which key and which algorithms PyJWT gets.
The algorithms come from the configured key, never from the token's header: an HMAC
secret allows HS*, an RSA key RS*/PS*, an EC key the ES* of its curve, an Ed25519/Ed448
key EdDSA. ``alg: none`` and an RS256 public key replayed as an HS256 secret therefore
cannot verify. Every refusal is a ``JwtRefused`` whose reason is for the server's log only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

if TYPE_CHECKING:
    from .config import JwtConfig

log = logging.getLogger(__name__)

MAX_JWT_CHARS = 8192  # longer bearer values are refused unparsed
HMAC_ALGORITHMS = (("HS256", 32), ("HS384", 48), ("HS512", 64))  # RFC 7518 3.2: a key at least the hash size
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",), "secp256k1": ("ES256K",)}


class JwtRefused(Exception):
    """A token that does not verify; the message is a reason for the log, never for the client."""


@dataclass(frozen=True)
class Key:
    key: object  # bytes (an HMAC secret) or a cryptography public key
    algorithms: tuple[str, ...]


@dataclass(frozen=True)
class Identity:
    user: str
    groups: tuple[str, ...]


# ---------------------------------------------------------------------------- keys

def hmac_key(secret: str) -> Key:
    raw = secret.encode()
    algorithms = tuple(alg for alg, size in HMAC_ALGORITHMS if len(raw) >= size)
    if not algorithms:
        raise ValueError("the shared secret is shorter than 32 bytes (RFC 7518): it could be guessed offline "
                         "from a single token")
    return Key(raw, algorithms)


def public_key(key: object) -> Key:
    """The algorithms a public key can verify, from its type (and curve)."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"an RSA key of {key.key_size} bits is too small (2048 at least)")
        return Key(key, RSA_ALGORITHMS)
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithms = EC_ALGORITHMS.get(key.curve.name)
        if not algorithms:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return Key(key, algorithms)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return Key(key, ("EdDSA",))
    raise ValueError(f"unsupported key type {type(key).__name__}")


def load_public_key_file(path: str) -> Key:
    try:
        with open(path, "rb") as fh:
            pem = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if b"BEGIN CERTIFICATE" in pem:
            loaded = x509.load_pem_x509_certificate(pem).public_key()
        else:
            loaded = load_pem_public_key(pem)
    except ValueError:
        raise ValueError(f"{path} is not a PEM public key or certificate") from None
    return public_key(loaded)


def keys_from_jwks(data: object, strict: bool) -> dict[str | None, Key]:
    """``{kid: Key}`` from a JWKS document. ``strict`` (a file): any unusable key is an error;
    otherwise (fetched) it is skipped with a warning. Symmetric ("oct") keys are never taken."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('not a JWKS document (a JSON object with a "keys" list)')
    keys: dict[str | None, Key] = {}
    for i, jwk in enumerate(data["keys"]):
        try:
            if not isinstance(jwk, dict):
                raise ValueError("not a JSON object")
            if jwk.get("use", "sig") != "sig":
                continue
            if jwk.get("kty") == "oct":
                raise ValueError("symmetric keys are not taken from a JWKS; use secret_env")
            key = public_key(jwt.PyJWK(jwk).key)
            if "alg" in jwk:
                if jwk["alg"] not in key.algorithms:
                    raise ValueError(f"alg {jwk['alg']!r} does not fit its key type")
                key = Key(key.key, (jwk["alg"],))
            keys[jwk.get("kid")] = key
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            if strict:
                raise ValueError(f"key {i}: {exc}") from None
            log.warning("JWKS key %d skipped: %s", i, exc)
    if not keys:
        raise ValueError("the JWKS has no usable signing key")
    return keys


def load_jwks_file(path: str) -> dict[str | None, Key]:
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ValueError(f"{path} is not valid JSON") from None
    return keys_from_jwks(data, strict=True)


def pick(keys: dict[str | None, Key], kid: object) -> Key | None:
    if kid is None and len(keys) == 1:
        return next(iter(keys.values()))
    return keys.get(kid) if isinstance(kid, str) else None


class JwksCache:
    """The keys at ``jwks_url``: fetched on first use, again when older than ``MAX_AGE`` or when a
    token names an unknown kid, but never twice within ``MIN_INTERVAL`` (unknown kids are free
    for anyone to make up). One fetch at a time; a failed fetch keeps the previous keys."""

    MIN_INTERVAL = 30.0
    MAX_AGE = 3600.0
    TIMEOUT = 10.0
    MAX_BYTES = 1 << 20

    def __init__(self, url: str, clock=time.monotonic) -> None:
        self.url = url
        self.clock = clock
        self.keys: dict[str | None, Key] = {}
        self.loaded_at: float | None = None
        self.tried_at: float | None = None
        self.fetches = 0
        self.session: aiohttp.ClientSession | None = None
        self._inflight: asyncio.Task | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.TIMEOUT))

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            await asyncio.wait([self._inflight])
        if self.session is not None:
            await self.session.close()

    async def key(self, kid: object) -> Key | None:
        now = self.clock()
        found = pick(self.keys, kid)
        stale = self.loaded_at is None or now - self.loaded_at > self.MAX_AGE
        if (found is None or stale) and (self.tried_at is None or now - self.tried_at >= self.MIN_INTERVAL
                                         or self._inflight is not None):
            if self._inflight is None:
                self.tried_at = now
                self._inflight = asyncio.create_task(self._fetch(), name="jwks fetch")
            await asyncio.shield(self._inflight)  # a client that leaves does not cancel it for the others
            found = pick(self.keys, kid)
        return found

    async def _fetch(self) -> None:
        try:
            self.fetches += 1
            assert self.session is not None, "JwksCache.start() was not called"
            async with self.session.get(self.url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(self.MAX_BYTES + 1)
            if len(body) > self.MAX_BYTES:
                raise ValueError("the document is larger than 1 MiB")
            self.keys = keys_from_jwks(json.loads(body), strict=False)
            self.loaded_at = self.clock()
            log.info("JWKS: %d keys from %s", len(self.keys), self.url)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("JWKS fetch from %s failed (%s); keeping %d known keys", self.url,
                        exc or type(exc).__name__, len(self.keys))
        finally:
            self._inflight = None


# ---------------------------------------------------------------------------- verification

class JwtVerifier:
    def __init__(self, cfg: "JwtConfig") -> None:
        self.cfg = cfg
        self.static: dict[str | None, Key] | None = None
        self.jwks: JwksCache | None = None
        if cfg.secret:
            self.static = {None: hmac_key(cfg.secret)}
        elif cfg.public_key_file:
            self.static = {None: load_public_key_file(cfg.public_key_file)}
        elif cfg.jwks_file:
            self.static = load_jwks_file(cfg.jwks_file)
        else:
            self.jwks = JwksCache(cfg.jwks_url)
        required = ["exp"] + (["iss"] if cfg.issuer else []) + (["aud"] if cfg.audience else [])
        self.options = {"require": required}

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.start()

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    async def _key(self, header: dict) -> Key | None:
        kid = header.get("kid")
        if self.jwks is not None:
            return await self.jwks.key(kid)
        assert self.static is not None
        if len(self.static) == 1 and None in self.static:
            return self.static[None]  # one configured key: the token's kid does not matter
        return pick(self.static, kid)

    async def verify(self, token: str) -> Identity:
        if len(token) > MAX_JWT_CHARS:
            raise JwtRefused("longer than %d characters" % MAX_JWT_CHARS)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise JwtRefused(f"malformed: {exc}") from None
        key = await self._key(header)
        if key is None:
            raise JwtRefused(f"no key for kid {str(header.get('kid'))[:40]!r}")
        cfg = self.cfg
        try:
            claims = jwt.decode(token, key.key, algorithms=list(key.algorithms), options=self.options,
                                issuer=cfg.issuer or None, audience=cfg.audience or None,
                                leeway=cfg.leeway_seconds)
        except jwt.PyJWTError as exc:
            raise JwtRefused(f"{type(exc).__name__}: {exc}") from None
        user = claims.get(cfg.user_claim)
        if isinstance(user, int) and not isinstance(user, bool):
            user = str(user)
        if not isinstance(user, str) or not user.strip():
            raise JwtRefused(f"no usable {cfg.user_claim!r} claim")
        groups = claims.get(cfg.groups_claim, ())
        if isinstance(groups, str):
            groups = (groups,)
        elif isinstance(groups, list):
            groups = tuple(g for g in groups if isinstance(g, str))
        else:
            groups = ()
        return Identity(user.strip()[:200], groups[:100])
