"""What users are told when an upstream fails: fixed words per HTTP status or network error,
never the upstream's own text (which can carry keys, internal URLs or the request itself)."""

from __future__ import annotations

import json
import os
import socket

import aiohttp

# What users are told about an HTTP error: fixed words per status, never the upstream's text.
_STATUS_REASONS = {
    400: "the request was refused",
    401: "the API key was refused",
    402: "payment required (check the account's balance)",
    403: "access was denied",
    404: "not found (check the model name)",
    408: "the request timed out",
    409: "conflict",
    413: "the request is too large",
    422: "the request was refused",
    429: "rate limited",
    500: "internal server error",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
    529: "overloaded",
}

# Error ``code`` / ``type`` values of OpenAI-compatible APIs that are safe and useful to show.
_KNOWN_TOKENS = frozenset({
    "authentication_error", "billing_hard_limit_reached", "content_filter", "content_policy_violation",
    "context_length_exceeded", "insufficient_quota", "invalid_api_key", "model_not_found", "not_found_error",
    "overloaded_error", "permission_error", "rate_limit_error", "rate_limit_exceeded", "server_error",
    "string_above_max_length", "tokens", "requests", "unsupported_parameter", "unsupported_value",
    "unsupported_country_region_territory",
})


def _status_reason(status: int) -> str:
    if status in _STATUS_REASONS:
        return _STATUS_REASONS[status]
    return "the request was refused" if status < 500 else "server error"


def _error_object(raw: bytes):
    """The ``error`` member of an error body, if it is JSON."""
    try:
        obj = json.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return None
    return obj.get("error") if isinstance(obj, dict) else None


def _known_token(err) -> str:
    """`` (insufficient_quota)`` when the upstream's error names a known ``code`` or ``type``, else ``""``."""
    if not isinstance(err, dict):
        return ""
    for field in ("code", "type"):
        value = err.get(field)
        if isinstance(value, str) and value in _KNOWN_TOKENS:
            return f" ({value})"
    return ""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from these APIs; fall back to our own backoff
    return seconds if 0 <= seconds < 3600 else None


def _reason(exc: BaseException) -> str:
    """A short fixed reason for a failed request: never ``str(exc)``, which names the host and port."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate was not accepted"
    if isinstance(exc, (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError)):
        return "the TLS handshake failed"
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return "the proxy cannot be reached"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    os_error = getattr(exc, "os_error", None) or (exc if isinstance(exc, OSError) else None)
    if isinstance(os_error, socket.gaierror):
        return "its host name does not resolve"
    if isinstance(os_error, OSError) and os_error.errno and os_error.errno > 0:
        return os.strerror(os_error.errno).lower()  # "connection refused", not asyncio's wording
    if isinstance(exc, aiohttp.InvalidURL):
        return "base_url is not a valid URL"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "the connection failed"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "the answer was not valid HTTP"
    return type(exc).__name__
