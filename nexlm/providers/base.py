"""The provider protocol: what every model backend gives the chat layer.

A provider turns (model, messages, params) into an async iterator of small typed
events. A stream is zero or more ``Queued`` notices (a single-slot backend only),
zero or more deltas (text, reasoning, tool-call fragments, in the upstream's order),
at most one ``Usage``, then exactly one ``Finish`` or ``StreamError``. Failures are events, not exceptions: only
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
class ToolCallDelta:
    """One fragment of a tool call, as the upstream streamed it (OpenAI's ``delta.tool_calls[i]``).

    The first fragment of call ``index`` carries its ``id`` and function ``name``; later ones
    only ``index`` and a piece of ``arguments`` (JSON text, concatenated by the client). Relayed
    as is, so /v1 can pass them on without reassembling them; the reply then ends with
    ``Finish("tool_calls")``.
    """

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the upstream reported them (OpenAI's field names)."""

    data: dict


@dataclass(frozen=True, slots=True)
class Finish:
    """The upstream said it is done: ``stop``, ``length``, ``content_filter``, ``tool_calls``..."""

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


ProviderEvent = Union[TextDelta, ReasoningDelta, ToolCallDelta, Usage, Finish, StreamError, Queued]


@dataclass(frozen=True, slots=True)
class Params:
    """Generation parameters a client may set. ``None`` means the upstream default."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k in ("temperature", "top_p", "max_tokens") if (v := getattr(self, k)) is not None}


# OpenAI chat parameters beyond ``Params`` that /v1 accepts (checked there) and an
# OpenAI-compatible provider merges into the upstream body as they are.
EXTRA_KEYS = ("stop", "seed", "presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice",
              "parallel_tool_calls", "user", "max_completion_tokens", "reasoning_effort", "logit_bias", "verbosity")


class UpstreamTiming:
    """When a remote provider sent its request and when the first token came back (monotonic s).

    Filled by the provider, read once when the turn ends: the upstream's own time to first
    token, subtracted from ours, is the latency NexLM itself adds. One per turn: ``sent`` is
    the turn's first POST, so the provider's retries and a fallback's wait count as the
    upstream's time, not ours. A provider with no upstream (the embedded model) leaves
    ``first_token`` empty, and nothing is observed."""

    __slots__ = ("first_token", "sent")

    def __init__(self) -> None:
        self.sent: float | None = None  # the turn's first request sent upstream
        self.first_token: float | None = None  # its first token out of the response's parser


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One completion to run. ``messages`` are OpenAI chat messages: roles system, developer,
    user, assistant (possibly with ``tool_calls``) and tool; ``content`` a string, ``None`` or
    an array of parts. The page sends only string contents; a provider that speaks no
    OpenAI wire (the embedded model) flattens the rest (``plain_messages``). ``extra`` holds
    validated ``EXTRA_KEYS`` pass-through parameters."""

    model: str  # the provider's own model name (no "provider/" prefix)
    messages: list[dict] = field(default_factory=list)
    params: Params = Params()
    extra: dict = field(default_factory=dict)
    timing: UpstreamTiming | None = field(default=None, compare=False, repr=False)  # set by the turn engine


class Provider(Protocol):
    """A configured backend. One instance per ``[providers.NAME]`` section."""

    name: str
    models: tuple[str, ...]
    label: str  # what the page shows, e.g. "DeepSeek" or "SmolLM2 135M Instruct, offline demo"
    # True for a backend that answers one request at a time (the embedded model): a reply
    # nobody is listening to gives the slot up as soon as another one waits (``waiting()``).
    single_slot: bool = False
    # True when the backend relays OpenAI ``tools`` / ``tool_calls``; /v1 refuses ``tools`` otherwise.
    supports_tools: bool = False

    def unavailable_reason(self) -> str | None:
        """``None`` when usable; otherwise what the user must do ("set DEEPSEEK_API_KEY")."""

    def stream(self, request: ChatRequest) -> AsyncIterator[ProviderEvent]:
        """Start a completion; iterate for events; ``aclose()`` cancels it upstream."""

    async def close(self) -> None:
        """Free what the provider holds (threads, models). Called once at shutdown."""


def plain_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as ``{"role", "content": str}`` for a backend that reads only those
    (the embedded model's chat template): text parts joined, other parts named, ``developer``
    as ``system``, tool calls and results written out as text."""
    out = []
    for m in messages:
        role = m.get("role")
        content = _text_of(m.get("content"))
        if role == "developer":
            role = "system"
        elif role == "tool":
            role, content = "user", f"[tool result {m.get('tool_call_id') or ''}]\n{content}".strip()
        elif role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(f"[tool call {c.get('function', {}).get('name')}({c.get('function', {}).get('arguments')})]"
                              for c in m["tool_calls"] if isinstance(c, dict))
            content = f"{content}\n{calls}".strip()
        out.append({"role": role, "content": content})
    return out


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif isinstance(part.get("refusal"), str):
            parts.append(part["refusal"])
        else:
            parts.append(f"[{part.get('type', 'part')} omitted: this model reads text only]")
    return "\n".join(parts)
