"""One client for every OpenAI-compatible ``/chat/completions`` API.

OpenAI, DeepSeek, Ollama, vLLM and llama.cpp's server differ only in data
(base URL, key, model names), so a provider is a ``ProviderConfig`` plus the
app's one shared ``aiohttp.ClientSession``. Each quirk of the wire format is
handled here once: keep-alive comments, ``reasoning_content`` / ``reasoning``,
``tool_calls`` fragments (relayed as they come), usage in its own ``choices: []`` chunk or on the last choice, errors as HTTP
status + JSON or in-band after a 200, and streams that are cut short.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import urllib.request
from typing import AsyncIterator

import aiohttp
import orjson
from yarl import URL

from ..config import ProviderConfig
from ..logsafe import printable
from .base import (
    ChatRequest,
    Finish,
    ProviderEvent,
    ReasoningDelta,
    StreamError,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from .chunks import SurrogateJoiner, _add_calls, _loads
from .redact import Redactor
from .sse import SSEDecoder
from .upstream_errors import _error_object, _known_token, _reason, _retry_after, _status_reason
from .watchdog import Watchdog

log = logging.getLogger(__name__)

_TOKENS = (TextDelta, ReasoningDelta, ToolCallDelta)  # what counts as the first token (UpstreamTiming)
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
MAX_ERROR_BODY = 16384
MAX_LOGGED_BODY = 1000  # characters of an upstream's error body in the log, after redaction


class OpenAIProvider:
    """A provider for any OpenAI-compatible streaming chat API."""

    single_slot = False  # the server behind it queues (or scales) on its own
    supports_tools = True  # tools go upstream as given; tool_calls come back as ToolCallDelta

    def __init__(self, config: ProviderConfig, http: aiohttp.ClientSession) -> None:
        self.config = config
        self.name = config.name
        self.models = config.models
        self.label = config.label or config.name
        self._http = http
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        # The key and any configured header values (e.g. an Azure "api-key") are secrets. What an
        # upstream says goes to the log only, through the redactor; users get the label, the
        # status and a fixed reason, never the upstream's text or the base_url.
        self._redact = Redactor(v for v in (config.resolved_key(), *config.headers.values()) if len(v) >= 6)
        # Only the connect bound is aiohttp's; first-token and idle are the Watchdog's.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout or None)
        self._proxy = env_proxy(config.base_url)

    def unavailable_reason(self) -> str | None:
        if self.config.api_key_env and not self.config.resolved_key():
            return f"set {self.config.api_key_env}"
        return None

    async def close(self) -> None:  # the shared ClientSession is the app's to close
        return None

    # ------------------------------------------------------------------ request

    def _body(self, request: ChatRequest) -> bytes:
        body = {
            "model": request.model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **request.params.as_dict(),
            **request.extra,  # validated by the front door (base.EXTRA_KEYS)
        }
        try:
            return orjson.dumps(body)
        except TypeError:  # a lone surrogate in a message: escape it rather than fail
            return json.dumps(body).encode()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **self.config.headers}
        key = self.config.resolved_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _log_body(self, what: str, raw: bytes | str) -> None:
        """An upstream's own words, for the operator: redacted whole, then escaped and cut.

        The body goes to the debug log only: upstreams quote the request back (llama.cpp's
        500 echoes the input), and logs carry no message text unless ``--debug``."""
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        log.warning("%s: %s (%d bytes; the body is logged with --debug)", self.name, what, len(text))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s: %s", self.name, what, printable(self._redact(text.strip()), MAX_LOGGED_BODY) or "(empty)")

    async def _http_error(self, resp: aiohttp.ClientResponse) -> StreamError:
        try:
            raw = await resp.content.read(MAX_ERROR_BODY)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            raw = b""
        status = resp.status
        self._log_body(f"HTTP {status}", raw)
        msg = f"{self.label} answered {status}: {_status_reason(status)}{_known_token(_error_object(raw))}"
        if status in (401, 403) and self.config.api_key_env:
            msg += f"; check {self.config.api_key_env}"
        retry_after = _retry_after(resp.headers.get("Retry-After"))
        return StreamError(
            code="rate_limited" if status == 429 else "upstream_error",
            message=msg,
            status=status,
            retryable=status in RETRYABLE_STATUS,
            retry_after=retry_after,
        )

    async def _open(self, request: ChatRequest, watch: Watchdog) -> aiohttp.ClientResponse | StreamError:
        """POST the request; retry connect errors, 429 and 5xx within the configured budget."""
        body, headers = self._body(request), self._headers()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.retry_max_seconds
        attempt = 0
        while True:
            failure: StreamError
            if request.timing is not None and request.timing.sent is None:
                request.timing.sent = time.monotonic()  # the upstream's time to first token starts here (retries count)
            try:
                # No redirects: a 3xx must not carry the key to another host.
                resp = await self._http.post(self._url, data=body, headers=headers, timeout=self._timeout,
                                             proxy=self._proxy, allow_redirects=False)
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError) as exc:
                failure = StreamError("upstream_error", f"Cannot reach {self.label}: {_reason(exc)}", retryable=True)
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                failure = StreamError("upstream_timeout", f"{self.label} did not respond in time", retryable=True)
            except aiohttp.ClientError as exc:
                failure = StreamError("upstream_error", f"The request to {self.label} failed: {_reason(exc)}")
            else:
                if resp.status < 300:
                    return resp
                if resp.status < 400:
                    resp.close()
                    return StreamError("upstream_error", f"{self.label} answered with a redirect (HTTP {resp.status}); "
                                                         "set base_url to the final address", status=resp.status)
                try:
                    failure = await self._http_error(resp)
                finally:
                    resp.close()
            attempt += 1
            if not failure.retryable or attempt > self.config.max_retries:
                return failure
            delay = failure.retry_after if failure.retry_after is not None else 0.5 * 2 ** (attempt - 1)
            delay = delay * (1 + 0.25 * random.random())  # jitter, so clients don't retry in lockstep
            if loop.time() + delay > deadline:
                return failure
            log.info("%s: retrying after %s (attempt %d)", self.name, failure.code, attempt)
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ stream

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderEvent]:
        watch = Watchdog(self.config.first_token_timeout, self.config.idle_timeout)
        resp: aiohttp.ClientResponse | None = None
        clean = False
        try:
            try:
                opened = await self._open(request, watch)
                watch.reading = False
                if isinstance(opened, StreamError):
                    yield opened
                    return
                resp = opened
                watch.reading = True
                watch.start_idle()
                timing = request.timing  # cleared once the first token is stamped: one test per event after it
                async for event in self.parse(resp.content.iter_any(), watch):
                    if timing is not None and type(event) in _TOKENS:
                        timing.first_token = time.monotonic()
                        timing = None
                    if isinstance(event, (Finish, StreamError)):
                        clean = isinstance(event, Finish)
                        yield event
                        return
                    yield event
            except asyncio.CancelledError:
                if watch.fired is None:
                    raise  # a stop: not ours to handle
                asyncio.current_task().uncancel()
                if watch.fired == "first_token":
                    yield StreamError("upstream_timeout", f"{self.label} did not start answering within "
                                                          f"{self.config.first_token_timeout:g} s")
                else:
                    yield StreamError("upstream_timeout", f"{self.label} sent nothing for "
                                                          f"{self.config.idle_timeout:g} s")
        finally:
            watch.close()
            if resp is not None:
                if clean:
                    resp.release()
                else:
                    resp.close()  # a stop or a failure: close the connection, freeing the upstream slot

    async def parse(self, chunks: AsyncIterator[bytes], watch: Watchdog | None = None) -> AsyncIterator[ProviderEvent]:
        """Turn the body of a streaming response, in reads of any size, into events.

        One TCP read often carries several chunks: their text is handed on as one
        delta. Text that arrived before a failure is always yielded before it.
        """
        decoder = SSEDecoder()
        fix_t, fix_r = SurrogateJoiner(), SurrogateJoiner()
        finish: str | None = None
        usage: dict | None = None
        done = False
        try:
            async for raw in chunks:
                if watch is not None:
                    watch.reading = False
                    watch.last = watch._loop.time()
                text: list[str] = []
                reasoning: list[str] = []
                tools: list[ToolCallDelta] = []  # fragments of this read, neighbours of one call merged
                failure: StreamError | None = None
                for data in decoder.feed_data(raw):
                    if data == b"[DONE]":
                        done = True
                        break
                    obj = _loads(data)
                    if not isinstance(obj, dict):
                        failure = StreamError("upstream_error", f"{self.label} sent a malformed chunk")
                        break
                    if obj.get("error") is not None:
                        self._log_body("error mid-reply", data.decode("utf-8", errors="replace"))
                        failure = StreamError("upstream_error", f"{self.label} reported an error mid-reply"
                                                                f"{_known_token(obj['error'])}")
                        break
                    if obj.get("usage"):
                        usage = obj["usage"]
                    choices = obj.get("choices")
                    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
                        continue
                    choice = choices[0]
                    delta = choice.get("delta") or {}
                    if not isinstance(delta, dict):
                        failure = StreamError("upstream_error", f"{self.label} sent a malformed chunk")
                        break
                    calls = delta.get("tool_calls")
                    if calls and isinstance(calls, list):
                        if reasoning:  # keep the order: what came before the call goes first
                            r = fix_r("".join(reasoning))
                            if r:
                                yield ReasoningDelta(r)
                            reasoning = []
                        if text:
                            t = fix_t("".join(text))
                            if t:
                                yield TextDelta(t)
                            text = []
                        _add_calls(tools, calls)
                    r = delta.get("reasoning_content") or delta.get("reasoning")
                    if r and isinstance(r, str):
                        if tools:
                            for tc in tools:
                                yield tc
                            tools = []
                        if text:  # keep the order of the two kinds
                            t = fix_t("".join(text))
                            if t:
                                yield TextDelta(t)
                            text = []
                        reasoning.append(r)
                    c = delta.get("content")
                    if c and isinstance(c, str):
                        if tools:
                            for tc in tools:
                                yield tc
                            tools = []
                        if reasoning:
                            r = fix_r("".join(reasoning))
                            if r:
                                yield ReasoningDelta(r)
                            reasoning = []
                        text.append(c)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                if watch is not None and (text or reasoning or tools):
                    watch.got_token = True
                for tc in tools:
                    yield tc
                if reasoning:
                    r = fix_r("".join(reasoning))
                    if r:
                        yield ReasoningDelta(r)
                if text:
                    t = fix_t("".join(text))
                    if t:
                        yield TextDelta(t)
                if failure is not None:
                    yield failure
                    return
                if done:
                    break
                if watch is not None:
                    watch.reading = True
        except aiohttp.ClientPayloadError:
            yield StreamError("upstream_error", f"The connection to {self.label} was cut mid-reply")
            return
        except (aiohttp.ClientConnectionError, ConnectionError):
            yield StreamError("upstream_error", f"The connection to {self.label} was lost mid-reply")
            return
        if finish is None:
            # EOF or [DONE] without a finish_reason: a truncated reply is an error, not a success.
            yield StreamError("upstream_error", f"The reply from {self.label} ended before it was complete")
            return
        if usage is not None:
            yield Usage(usage)
        yield Finish(finish)


# ---------------------------------------------------------------------- helpers
def env_proxy(url: str) -> str | None:
    """HTTP(S)_PROXY / NO_PROXY for ``url``, read once: aiohttp's trust_env looks them up
    (and ~/.netrc) in a worker thread on every request, which showed in time to first token."""
    u = URL(url)
    if u.host and urllib.request.proxy_bypass(u.host):
        return None
    return urllib.request.getproxies().get(u.scheme)
