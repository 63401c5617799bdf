"""Failures in OpenAI's error envelope, with the status and headers its client libraries expect.

``{"error": {"message", "type", "param", "code"}}``: the ``openai`` package picks its
exception by status (400 ``BadRequestError``, 401 ``AuthenticationError``, 404
``NotFoundError``, 409 ``ConflictError``, 413/others ``APIStatusError``, 429
``RateLimitError``, 5xx ``InternalServerError``), retries 408/409/429/5xx twice unless
told ``x-should-retry: false``, and waits for ``Retry-After``. A retry of a failed
generation can generate (and bill) twice, so only the limits say "retry" (429/503, with
``Retry-After``); everything else says ``x-should-retry: false``. Shared by the /v1
front doors (chat completions, responses).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from aiohttp import web

from .providers.base import StreamError
from .validation import ChatError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error"}
# Our codes where OpenAI has its own name for the same thing.
CODES = {"unknown_model": "model_not_found", "rate_limited": "rate_limit_exceeded"}
RETRY_STATUSES = frozenset({429, 503})  # limits and restarts: a retry after Retry-After is the answer
# Configuration (a person must act), or a quota whose reset is hours away: Retry-After says when, but
# the openai package's automatic retries (seconds later) would only be refused again.
NOT_CURED_BY_WAITING = frozenset({"provider_unavailable", "quota_exceeded"})


@dataclass(frozen=True, slots=True)
class Failure:
    """An HTTP status, OpenAI's error envelope, and the headers that go with them."""

    status: int
    envelope: dict
    headers: dict = field(default_factory=dict)

    @property
    def error(self) -> dict:
        """The inner object, as a stream's in-band ``data: {"error": ...}`` carries it."""
        return self.envelope["error"]


def failure(status: int, message: str, code: str | None = None, param: str | None = None,
            retry_after: float | None = None, err_type: str | None = None) -> Failure:
    """One failure. ``Retry-After`` (at least 1 s) on 429 and 503; ``x-should-retry: false`` elsewhere,
    and on a 503 that waiting does not cure (a provider without its key, a model that failed to load)."""
    if err_type is None:
        err_type = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    headers = {}
    if status in RETRY_STATUSES:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1)))
    if status not in RETRY_STATUSES or code in NOT_CURED_BY_WAITING:
        headers["x-should-retry"] = "false"
    body = {"error": {"message": message, "type": err_type, "param": param, "code": CODES.get(code, code)}}
    return Failure(status, body, headers)


def from_chat_error(exc: ChatError) -> Failure:
    """A refusal (validation, admission, limits). ``busy`` (the client's running replies) is a
    limit a client can wait out: 429, as OpenAI answers concurrency limits."""
    status = exc.status
    if exc.code == "busy":
        status = 429
    param = getattr(exc, "param", None)
    if param is None and exc.code in ("unknown_model", "provider_unavailable", "tools_unsupported"):
        param = "model" if exc.code != "tools_unsupported" else "tools"
    return failure(status, exc.message, exc.code, param, exc.retry_after)


def from_stream_error(ev: StreamError) -> Failure:
    """An upstream failure: 504 for a timeout, 429 when the upstream limited us (and said when),
    503 for a provider that cannot answer, 400 when the upstream refused the request itself
    (a client's tools or response_format it does not take), else 502."""
    if ev.code == "upstream_timeout":
        return failure(504, ev.message, ev.code)
    if ev.code == "rate_limited":
        return failure(429, ev.message, ev.code, retry_after=ev.retry_after)
    if ev.code == "provider_unavailable":
        return failure(503, ev.message, ev.code, retry_after=ev.retry_after)
    if ev.status in (400, 422):
        return failure(400, ev.message, "upstream_refused")
    return failure(502, ev.message, ev.code or "upstream_error")


def response(f: Failure) -> web.Response:
    """The failure as a JSON response (before any byte of a stream was sent)."""
    return web.json_response(f.envelope, status=f.status, headers=f.headers)


def as_openai(resp: web.StreamResponse) -> web.StreamResponse:
    """A refusal in NexLM's own error shape (the access middleware's 401/403/421/429) in OpenAI's
    envelope, for the /v1 paths, keeping its status, ``WWW-Authenticate`` and ``Retry-After``.
    Anything else (a stream, an envelope already) is returned as it is."""
    if resp.status < 400 or resp.prepared or not isinstance(resp, web.Response) \
            or resp.content_type != "application/json" or not isinstance(resp.body, bytes):
        return resp
    try:
        body = json.loads(resp.body)
    except ValueError:
        return resp
    if not isinstance(body, dict) or body.get("type") != "error":
        return resp
    retry = resp.headers.get("Retry-After")
    f = failure(resp.status, str(body.get("message") or resp.reason), body.get("code"),
                retry_after=float(retry) if retry and retry.isdigit() else None)
    out = response(f)
    for key in ("WWW-Authenticate", "Retry-After"):
        if key in resp.headers:
            out.headers[key] = resp.headers[key]
    return out
