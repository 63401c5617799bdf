"""The provider protocol: what every model backend gives the chat layer.

A provider turns (model, messages, params) into an async iterator of small typed
events. A stream is zero or more ``Queued`` notices (a single-slot backend only),
zero or more deltas, at most one ``Usage``, then exactly one ``Finish`` or
``StreamError``. Failures are events, not exceptions: only
cancellation propagates, so the chat layer has one place to turn a failure into
a message. Closing the iterator (``aclose()``, or cancelling the task that runs
it) must release the upstream request: for a remote server that means closing
its connection, which is what frees a vLLM or llama.cpp slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol, Union


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the upstream reported them (OpenAI's field names)."""

    data: dict


@dataclass(frozen=True, slots=True)
class Finish:
    """The upstream said it is done: ``stop``, ``length``, ``content_filter``..."""

    reason: str


@dataclass(frozen=True, slots=True)
class StreamError:
    """A failure, with a code from the public protocol and a human message.

    ``code`` is one of ``upstream_error``, ``rate_limited``, ``upstream_timeout``,
    ``provider_unavailable``. ``retryable`` marks failures worth another try
    (connect errors, 429, 5xx) and ``retry_after`` the upstream's hint in seconds.
    The message never contains an API key.
    """

    code: str
    message: str
    status: int | None = None
    retryable: bool = False
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Queued:
    """The request waits for a single-slot backend: ``ahead`` requests are before it.

    Sent before any delta, again whenever ``ahead`` changes."""

    ahead: int


ProviderEvent = Union[TextDelta, ReasoningDelta, Usage, Finish, StreamError, Queued]


@dataclass(frozen=True, slots=True)
class Params:
    """Generation parameters a client may set. ``None`` means the upstream default."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k in ("temperature", "top_p", "max_tokens") if (v := getattr(self, k)) is not None}


class UpstreamTiming:
    """When a remote provider sent its request and when the first token came back (monotonic s).

    Filled by the provider, read once when the turn ends: the upstream's own time to first
    token, subtracted from ours, is the latency NexLM itself adds. A provider with no
    upstream (the embedded model) leaves it empty."""

    __slots__ = ("sent", "first_token")

    def __init__(self) -> None:
        self.sent: float | None = None  # the last attempt's POST (retries count as upstream time)
        self.first_token: float | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str  # the provider's own model name (no "provider/" prefix)
    messages: list[dict] = field(default_factory=list)  # [{"role", "content"}]
    params: Params = Params()
    timing: UpstreamTiming | None = field(default=None, compare=False, repr=False)  # set by the turn engine


class Provider(Protocol):
    """A configured backend. One instance per ``[providers.NAME]`` section."""

    name: str
    models: tuple[str, ...]
    label: str  # what the page shows, e.g. "DeepSeek" or "SmolLM2 135M Instruct, offline demo"
    # True for a backend that answers one request at a time (the embedded model): a reply
    # nobody is listening to gives the slot up as soon as another one waits (``waiting()``).
    single_slot: bool = False

    def unavailable_reason(self) -> str | None:
        """``None`` when usable; otherwise what the user must do ("set DEEPSEEK_API_KEY")."""

    def stream(self, request: ChatRequest) -> AsyncIterator[ProviderEvent]:
        """Start a completion; iterate for events; ``aclose()`` cancels it upstream."""

    async def close(self) -> None:
        """Free what the provider holds (threads, models). Called once at shutdown."""
