"""Every application and request key, in one place (typed, as aiohttp wants them).

Shared resources live on the app under these keys, opened and closed in
``server._resources``; nothing is a module-level singleton.
"""

from __future__ import annotations

import weakref

import aiohttp
from aiohttp import web

from .config import Settings
from .conversations import Conversations
from .gateway import Gateway
from .looplag import LoopLag
from .metrics import Metrics
from .providers.registry import Registry

SETTINGS = web.AppKey("settings", Settings)
CONVERSATIONS = web.AppKey("conversations", Conversations)
GATEWAY = web.AppKey("gateway", Gateway)  # stateless turns (/v1 and other doors that store nothing)
REGISTRY = web.AppKey("registry", Registry)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet)
STREAMS = web.AppKey("streams", set)  # transports of open /ws and /sse streams, cut at shutdown if they hang
SSE_STREAMS = web.AppKey("sse_streams", set)  # those of /sse alone (the connections gauge)
METRICS = web.AppKey("metrics", Metrics)
HTTP = web.AppKey("http", aiohttp.ClientSession)
LOOP_LAG = web.AppKey("loop_lag", LoopLag)
GUARD = web.AppKey("guard", object)
USAGE = web.AppKey("usage", object)  # usage.Recorder: the turns' usage observer and its log (query)

# Set by the auth middleware: the principal (token id or trusted user) or None when auth is off.
PRINCIPAL = web.RequestKey("principal", object)
# ... and the user's groups (from a JWT's groups claim; empty otherwise), for per-group rules.
GROUPS = web.RequestKey("groups", tuple)
# Set instead of PRINCIPAL when a route may take its credentials after the upgrade (the seed's
# WebSocket with ``[compat] seed_frames``: its page sends the token in its frames):
# ``await request[LATE_AUTH](token)`` checks it (throttled like any guess), sets PRINCIPAL and
# GROUPS, or raises ``validation.ChatError``. Nothing may be done for the client before it succeeds.
LATE_AUTH = web.RequestKey("late_auth", object)
# The response cache's answer for this request (hit, miss, bypass; None: off): server.py sends it
# as x-nexlm-cache on the gateway's doors.
CACHE_STATUS = web.RequestKey("cache_status", object)
