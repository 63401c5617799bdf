"""One chat turn, independent of the transport: history -> provider -> events -> history.

Every reply is a task owned by ``Chat``: a stop, a vanished client, an evicted
session or shutdown cancels it, and a done-callback guarantees its assistant
turn is recorded exactly once, with exactly the text that was sent. Replies
never wait for clients: events go into per-connection outboxes, so one slow
reader cannot stall the upstream read or another listener.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from functools import partial

from .config import Settings
from .events import Outbox, error_event
from .limits import LimitError, Limiter
from .providers.base import ChatRequest, Finish, Params, ReasoningDelta, StreamError, TextDelta, Usage
from .providers.registry import ModelError, Registry, Resolved
from .sessions import RECENT_REPLIES, Session, SessionLimit, SessionStore

log = logging.getLogger(__name__)

PARAM_KEYS = ("temperature", "top_p", "max_tokens", "system")
_SURROGATES = re.compile("[\ud800-\udfff]")


class ChatError(Exception):
    """A refused request: ``code`` is the protocol's error code, ``message`` is for people."""

    def __init__(self, code: str, message: str, status: int = 400, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after  # seconds; a Retry-After header on HTTP


class Reply:
    __slots__ = ("id", "model", "client", "task", "content", "reasoning", "usage", "finish_reason",
                 "stop_reason", "log", "started", "first_token", "fallback", "finished")

    def __init__(self, model: str, client: str) -> None:
        self.id = secrets.token_urlsafe(9)
        self.model = model
        self.client = client
        self.task: asyncio.Task | None = None
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.usage: dict | None = None
        self.finish_reason: str | None = None  # set once, when the turn is recorded
        self.stop_reason: str | None = None  # why we cancelled it: "stopped" or "interrupted"
        self.log: list[dict] = []  # every event of this reply, for resume
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.fallback: dict | None = None
        self.finished: float | None = None  # monotonic time of its done

    @property
    def text(self) -> str:
        return "".join(self.content)


def clean_text(value: str) -> str:
    """Text safe to store and send upstream: no NULs, no lone surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    if _SURROGATES.search(value):
        value = _SURROGATES.sub("\ufffd", value)
    return value


class Chat:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.limiter = Limiter(settings.limits)
        self.sessions = SessionStore(
            settings.chat.session_ttl_seconds, settings.chat.max_sessions,
            settings.limits.max_sessions_per_client, on_evict=self._evicted,
        )
        self._tasks: set[asyncio.Task] = set()
        self.closing = False

    # ------------------------------------------------------------ sessions

    def open_session(self, sid: str | None, owner: str | None, client: str) -> tuple[Session, bool]:
        """The session ``sid`` if it exists and belongs to ``owner``, else a new one.

        A new one counts against the client's ``sessions_per_minute`` (``rate_limited``, 429) and
        needs room in the store (``overloaded``/``busy``, 503, when every session is in use)."""
        if sid:
            s = self.sessions.get(sid)
            if s is not None and s.owner == owner:
                return s, True
        try:
            self.limiter.take_session(client)
        except LimitError as exc:
            raise ChatError(exc.code, exc.message, 429, exc.retry_after) from None
        s = Session(owner, client, self.registry.default_model(), {})
        try:
            return self.sessions.add(s), False
        except SessionLimit as exc:
            raise ChatError(exc.code, exc.message, 503, 5) from None

    def find(self, sid: str | None, owner: str | None) -> Session | None:
        """A session by id, as its owner sees it: another owner's session does not exist."""
        s = self.sessions.get(sid)
        return s if s is not None and s.owner == owner else None

    def _evicted(self, session: Session, why: str) -> None:
        """The store dropped ``session``: end its reply, then tell its listeners and let them go."""
        log.info("session %s.. removed: %s", session.id[:6], why)
        session.closed = why
        if session.reply is None or not self._cancel(session.reply, "interrupted"):
            self._release_listeners(session)
        # else: _finish sends the reply's done first, then releases the listeners.

    def _release_listeners(self, session: Session) -> None:
        if session.closed != "deleted":
            session.broadcast(error_event(
                "session_expired", f"This conversation was closed on the server ({session.closed})."))
        for outbox in list(session.listeners):
            outbox.close()
        session.listeners.clear()

    # ------------------------------------------------------------ validation

    def check_message(self, message) -> str:
        if not isinstance(message, str):
            raise ChatError("bad_request", "message must be a string")
        message = clean_text(message)
        if not message.strip():
            raise ChatError("bad_request", "message is empty")
        limit = self.settings.limits.max_message_chars
        if len(message) > limit:
            raise ChatError("bad_request", f"message is too long ({len(message)} characters, the limit is {limit})", 413)
        return message

    def check_params(self, params) -> dict:
        """Validate client parameters; ``None`` for a key resets it to the default."""
        if not isinstance(params, dict):
            raise ChatError("bad_request", "params must be an object")
        out = {}
        for key, value in params.items():
            if key not in PARAM_KEYS:
                raise ChatError("bad_request", f"unknown parameter {str(key)[:40]!r} (allowed: {', '.join(PARAM_KEYS)})")
            if value is None:
                out[key] = None
                continue
            if key == "system":
                if not isinstance(value, str):
                    raise ChatError("bad_request", "system must be a string")
                value = clean_text(value)
                if len(value) > self.settings.limits.max_message_chars:
                    raise ChatError("bad_request", "system prompt is too long")
            elif key == "max_tokens":
                cap = self.settings.limits.max_tokens_cap
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
                    raise ChatError("bad_request", f"max_tokens must be an integer from 1 to {cap}")
            else:
                hi = 2.0 if key == "temperature" else 1.0
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or not 0 <= value <= hi:
                    raise ChatError("bad_request", f"{key} must be a number from 0 to {hi:g}")
                value = float(value)
            out[key] = value
        return out

    def _resolve(self, model: str) -> Resolved:
        try:
            return self.registry.resolve(model)
        except ModelError as exc:
            raise ChatError(exc.code, exc.message, 404 if exc.code == "unknown_model" else 503) from None

    def _choice(self, session: Session, model=None, params=None) -> tuple[str, dict]:
        """The model and params a ``set`` would give the session; raises, changes nothing."""
        new_model = session.model
        if model is not None:
            if not isinstance(model, str):
                raise ChatError("bad_request", "model must be a string")
            new_model = self._resolve(model).id
        new_params = session.params
        if params is not None:
            checked = self.check_params(params)
            new_params = {k: v for k, v in {**session.params, **checked}.items() if v is not None}
        return new_model, new_params

    def configure(self, session: Session, model=None, params=None) -> None:
        """Apply a ``set``: all of it or, on any error, none of it."""
        session.model, session.params = self._choice(session, model, params)

    def check_history(self, history) -> list[dict]:
        """A client's copy of a conversation (``restore``): alternating user/assistant turns."""
        if not isinstance(history, list):
            raise ChatError("bad_request", "history must be a list")
        out: list[dict] = []
        for i, turn in enumerate(history):
            if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant") \
                    or not isinstance(turn.get("content"), str):
                raise ChatError("bad_request", f"history[{i}] must be {{\"role\": \"user\"|\"assistant\", \"content\": string}}")
            content = clean_text(turn["content"])
            if len(content) > self.settings.limits.max_message_chars * 4:
                raise ChatError("bad_request", f"history[{i}] is too long", 413)
            want = "user" if not out or out[-1]["role"] == "assistant" else "assistant"
            if turn["role"] != want:
                raise ChatError("bad_request", f"history[{i}]: roles must alternate, starting with user")
            entry = {"role": turn["role"], "content": content}
            if turn["role"] == "assistant":
                fr = turn.get("finish_reason")
                entry["finish_reason"] = fr if fr in ("stop", "length", "stopped", "error", "interrupted") else "stop"
                if isinstance(turn.get("model"), str):
                    entry["model"] = clean_text(turn["model"][:200])
            out.append(entry)
        if out and out[-1]["role"] == "user":
            out.pop()  # a question without its answer cannot be continued: the client resends it
        cap = self.settings.limits.max_history_messages
        if len(out) > cap:
            drop = len(out) - cap
            del out[:drop + drop % 2]  # whole turns: the history still starts with a question
        return out

    # ------------------------------------------------------------ context

    def context(self, session: Session, history: list[dict]) -> list[dict]:
        """System prompt, then the last ``max_history_turns`` complete turns, then the question.

        ``history`` ends with the user message being answered. A turn whose reply
        has no text (failed or stopped before the first token) is left out with
        its question, so roles still alternate.
        """
        *earlier, question = history
        turns: list[tuple[dict, dict]] = []
        pending: dict | None = None
        for entry in earlier:
            if entry["role"] == "user":
                pending = entry
            elif pending is not None:
                if entry["content"]:
                    turns.append((pending, entry))
                pending = None
        keep = self.settings.chat.max_history_turns
        turns = turns[-keep:] if keep > 0 else []
        messages = []
        system = session.params.get("system", self.settings.chat.system_prompt)
        if system:
            messages.append({"role": "system", "content": system})
        for user, assistant in turns:
            messages.append({"role": "user", "content": user["content"]})
            messages.append({"role": "assistant", "content": assistant["content"]})
        messages.append({"role": "user", "content": question["content"]})
        return messages

    # ------------------------------------------------------------ turns

    def _admit(self, session: Session, model=None, params=None) -> Resolved:
        """Check everything a new reply needs; only when all pass, apply model/params and take a slot."""
        if self.closing:
            raise ChatError("shutting_down", "The server is restarting; try again in a moment.", 503)
        if session.reply is not None:
            raise ChatError("busy", "A reply is still streaming; stop it or wait for it to finish.", 409)
        new_model, new_params = self._choice(session, model, params)
        resolved = self._resolve(new_model)
        try:
            self.limiter.take_message(session.client)
            self.limiter.acquire_reply(session.client)
        except LimitError as exc:
            raise ChatError(exc.code, exc.message, 429 if exc.code == "rate_limited" else 503, exc.retry_after) from None
        session.model, session.params = new_model, new_params
        return resolved

    def send(self, session: Session, message, model=None, params=None) -> Reply:
        """Accept a user message and start its reply. Raises ``ChatError`` if refused."""
        message = self.check_message(message)
        resolved = self._admit(session, model, params)
        session.history.append({"role": "user", "content": message})
        return self._launch(session, resolved)

    def regenerate(self, session: Session, model=None, params=None) -> Reply:
        """Replace the last reply with a new one."""
        if session.reply is not None:
            raise ChatError("busy", "A reply is still streaming; stop it or wait for it to finish.", 409)
        h = session.history
        if len(h) < 2 or h[-1]["role"] != "assistant":
            raise ChatError("bad_request", "There is no reply to regenerate yet.")
        resolved = self._admit(session, model, params)
        h.pop()
        return self._launch(session, resolved)

    def edit(self, session: Session, index, message, model=None, params=None) -> Reply:
        """Replace the user message at ``index`` (and everything after it) and answer it."""
        message = self.check_message(message)
        if session.reply is not None:
            raise ChatError("busy", "A reply is still streaming; stop it or wait for it to finish.", 409)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(session.history) \
                or session.history[index]["role"] != "user":
            raise ChatError("bad_request", "index must point at one of your messages in the history")
        resolved = self._admit(session, model, params)
        del session.history[index:]
        session.history.append({"role": "user", "content": message})
        return self._launch(session, resolved)

    def restore(self, session: Session, history) -> None:
        """Seed an empty session with a client's copy of the conversation (after a restart)."""
        if session.reply is not None or session.history:
            raise ChatError("bad_request", "restore works only on a new, empty session")
        session.history = self.check_history(history)

    async def reset(self, session: Session) -> None:
        await self.stop(session, "stopped")
        session.history.clear()
        session.recent.clear()

    def _launch(self, session: Session, resolved: Resolved) -> Reply:
        messages = self.context(session, session.history)
        request = ChatRequest(resolved.model, messages, _params(session.params))
        reply = Reply(resolved.id, session.client)
        session.reply = reply
        session.recent.append(reply)
        if len(session.recent) > RECENT_REPLIES:
            del session.recent[0]
        session.emit({"type": "start", "reply": reply.id, "model": reply.model})
        task = asyncio.create_task(self._run(session, reply, resolved, request), name=f"reply {reply.id}")
        reply.task = task
        self._tasks.add(task)
        task.add_done_callback(partial(self._reply_done, session, reply))
        return reply

    async def _run(self, session: Session, reply: Reply, resolved: Resolved, request: ChatRequest) -> None:
        finish = "error"
        rid = reply.id
        try:
            while True:
                stream = resolved.provider.stream(request)
                failure: StreamError | None = None
                try:
                    async for ev in stream:
                        kind = type(ev)
                        if kind is TextDelta:
                            if reply.first_token is None:
                                reply.first_token = time.monotonic()
                            reply.content.append(ev.text)
                            session.emit({"type": "delta", "reply": rid, "content": ev.text})
                        elif kind is ReasoningDelta:
                            if reply.first_token is None:
                                reply.first_token = time.monotonic()
                            reply.reasoning.append(ev.text)
                            session.emit({"type": "reasoning", "reply": rid, "content": ev.text})
                        elif kind is Usage:
                            reply.usage = ev.data
                        elif kind is Finish:
                            finish = ev.reason
                        elif kind is StreamError:
                            failure = ev
                finally:
                    await stream.aclose()
                if failure is None:
                    break
                fallback = self._fallback_for(resolved, reply, failure)
                if fallback is None:
                    session.emit(error_event(failure.code, failure.message, rid))
                    finish = "error"
                    break
                reply.fallback = {"from": resolved.id, "to": fallback.id, "reason": failure.message}
                log.info("reply %s: %s failed (%s), falling back to %s", rid, resolved.id, failure.code, fallback.id)
                resolved = fallback
                request = ChatRequest(fallback.model, request.messages, request.params)
                reply.model = fallback.id
        except asyncio.CancelledError:
            if reply.stop_reason is None:
                raise  # not ours (shutdown): the done-callback records it as interrupted
            asyncio.current_task().uncancel()
            finish = reply.stop_reason
        except Exception:
            log.exception("reply %s failed", rid)
            session.emit(error_event("internal_error", "Something went wrong on the server while answering.", rid))
            finish = "error"
        self._finish(session, reply, finish)

    def _fallback_for(self, resolved: Resolved, reply: Reply, failure: StreamError) -> Resolved | None:
        """The provider's ``fallback`` model, once, if nothing was streamed yet."""
        if reply.content or reply.reasoning or reply.fallback is not None:
            return None
        if not (failure.retryable or failure.code in ("upstream_timeout", "provider_unavailable")):
            return None
        cfg = self.settings.providers.get(resolved.provider.name)
        if cfg is None or not cfg.fallback:
            return None
        try:
            fallback = self.registry.resolve(cfg.fallback)
        except ModelError:
            return None
        return fallback if fallback.id != resolved.id else None

    def _finish(self, session: Session, reply: Reply, finish: str) -> None:
        """Record the assistant turn and send ``done``: exactly once per reply."""
        if reply.finish_reason is not None:
            return
        reply.finish_reason = finish
        turn = {"role": "assistant", "content": reply.text, "finish_reason": finish, "model": reply.model}
        if reply.reasoning:
            turn["reasoning"] = "".join(reply.reasoning)
        if reply.usage:
            turn["usage"] = reply.usage
        session.history.append(turn)
        cap = self.settings.limits.max_history_messages
        if len(session.history) > cap:
            drop = len(session.history) - cap
            drop += drop % 2  # whole turns, so the history still starts with a user message
            del session.history[:drop]
        now = time.monotonic()
        done = {
            "type": "done", "reply": reply.id, "finish_reason": finish, "usage": reply.usage,
            "model": reply.model,
            "timing": {
                "ttft_ms": None if reply.first_token is None else round((reply.first_token - reply.started) * 1000, 1),
                "total_ms": round((now - reply.started) * 1000, 1),
            },
        }
        if reply.fallback:
            done["fallback"] = reply.fallback
        session.emit(done)
        if session.reply is reply:
            session.reply = None
        if session.grace_timer is not None:
            session.grace_timer.cancel()
            session.grace_timer = None
        reply.finished = now
        self.limiter.release_reply(reply.client)
        if session.closed:
            self._release_listeners(session)
        else:
            self.sessions.touch(session)

    def _reply_done(self, session: Session, reply: Reply, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # _run catches all; belt and braces
            log.error("reply task %s ended with %r", reply.id, task.exception())
        # Cancelled before it ran, or by shutdown: the turn is still recorded.
        self._finish(session, reply, reply.stop_reason or "interrupted")

    # ------------------------------------------------------------ stopping

    def _cancel(self, reply: Reply, reason: str) -> bool:
        if reply.task is None or reply.task.done() or reply.finish_reason is not None:
            return False
        if reply.stop_reason is None:
            reply.stop_reason = reason
        reply.task.cancel()
        return True

    async def stop(self, session: Session, reason: str = "stopped") -> bool:
        """Cancel the running reply (closing its upstream request) and wait until it is recorded."""
        reply = session.reply
        if reply is None or not self._cancel(reply, reason):
            return False
        await asyncio.wait([reply.task])
        return True

    # ------------------------------------------------------------ listeners

    def attach(self, session: Session, outbox: Outbox, after: int | None = None) -> None:
        """Add a listener; replay what it missed: the events after ``after``, or the running reply."""
        if session.grace_timer is not None:
            session.grace_timer.cancel()
            session.grace_timer = None
        session.listeners.add(outbox)
        self.sessions.touch(session)
        if after is not None:
            for reply in session.recent:
                if reply.log and reply.log[-1]["seq"] > after:
                    for ev in reply.log:
                        if ev["seq"] > after:
                            outbox.put(ev)
        elif session.reply is not None:
            for ev in session.reply.log:
                outbox.put(ev)

    def can_resume(self, session: Session, after: int) -> bool:
        """Is there anything to follow after ``after``: a running reply, or missed events?"""
        return session.reply is not None or any(r.log and r.log[-1]["seq"] > after for r in session.recent)

    def detach(self, session: Session, outbox: Outbox) -> None:
        """Remove a listener. The last one leaving starts the resume grace (or stops the reply)."""
        session.listeners.discard(outbox)
        self.sessions.touch(session)
        if session.listeners or session.reply is None:
            return
        grace = self.settings.chat.resume_grace_seconds
        if grace <= 0 or self.closing:
            self._cancel(session.reply, "interrupted")
        elif session.grace_timer is None:
            reply = session.reply
            session.grace_timer = asyncio.get_running_loop().call_later(grace, self._grace_over, session, reply)

    def _grace_over(self, session: Session, reply: Reply) -> None:
        session.grace_timer = None
        if session.reply is reply and not session.listeners:
            log.info("reply %s: nobody came back within the grace period", reply.id)
            self._cancel(reply, "interrupted")

    def forget_old_logs(self, now: float | None = None) -> None:
        """Replay logs of replies that ended longer than the resume grace ago are dropped:
        a client that comes back later redraws from the session's history instead."""
        now = time.monotonic() if now is None else now
        keep = max(self.settings.chat.resume_grace_seconds, 5.0)
        for s in self.sessions:
            while s.recent and s.recent[0].finished is not None and now - s.recent[0].finished > keep:
                s.recent.pop(0).log = []

    async def housekeeping(self) -> None:
        """Expire idle sessions and old replay logs, every few seconds."""
        interval = max(1.0, min(30.0, self.settings.chat.session_ttl_seconds / 4,
                                self.settings.chat.resume_grace_seconds or 30.0))
        while True:
            await asyncio.sleep(interval)
            expired = self.sessions.expire()
            if expired:
                log.info("expired %d idle sessions", expired)
            self.forget_old_logs()

    # ------------------------------------------------------------ shutdown

    async def close(self, grace: float, cancel_wait: float | None = 1.0) -> None:
        """Let running replies finish for up to ``grace`` seconds, then interrupt the rest (and wait
        up to ``cancel_wait`` seconds for them to record their turn: shutdown has a deadline)."""
        self.closing = True
        tasks = set(self._tasks)
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for s in self.sessions:
            if s.reply is not None:
                self._cancel(s.reply, "interrupted")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=cancel_wait)


def _params(params: dict) -> Params:
    return Params(params.get("temperature"), params.get("top_p"), params.get("max_tokens"))
