"""A property-based fuzz of the WebSocket protocol (hypothesis).

Each example builds one app on a fresh fake upstream holding random scripts (good replies,
HTTP errors, resets, malformed chunks, in-band errors, stalls, keep-alives only), opens one
WebSocket and drives it with a random sequence of frames: valid commands with random values
(NaN, negative, huge and wrong-typed parameters, lone surrogates and NULs as JSON escapes,
unknown models), junk JSON, plain text, stops and waits. After every frame it pings and reads
up to the pong, so it knows what that frame caused. It asserts:

- the server never crashes: the socket stays open, or closes with a proper code after a frame
  that deserves it (binary 1003, too big 1009); no ERROR is logged;
- every frame gets its one answer (``start``, an error, a ``session`` frame or ``pong``);
- every reply that starts ends with exactly one ``done``;
- the session's history is exactly what a model of the protocol predicts: the accepted user
  messages (cleaned of NULs and lone surrogates), each followed by its reply's text as
  streamed and the ``done``'s finish_reason; and the invariants of ``invariants.py`` hold.

Known bugs with their own tests are left out of the generators so the fuzz can find new ones:
lone surrogates coming *from the upstream*, and a lone surrogate in a restored turn's model.
Bounded: 80 derandomized examples of at most 12 frames, 0.2 s upstream timeouts.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import extra_config
from fake_upstream import DONE, KEEPALIVE, FakeUpstream, Script, chunk, error, from_fixture, reply
from invariants import ConnectionClosed, Harness, clean, strict_json
from nexlm.config import load_settings
from nexlm.server import create_app

CONFIG = """
[limits]
max_frame_bytes = 16384
max_message_chars = 500
messages_per_minute = 0
[providers.fake]
first_token_timeout = 0.2
idle_timeout = 0.2
max_retries = 0
"""
ROLE = chunk("", role=True)

# ---------------------------------------------------------------------------- generators

safe_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
odd_text = st.sampled_from(["\ud800", "a\x00b", "x\udfffy", "\x00", "🙂", "   ", "", "{", "NaN", "\u202e"])
message = st.one_of(safe_text, odd_text, st.text(st.characters(exclude_categories=("Cs",)), min_size=480,
                                                    max_size=520))
model = st.sampled_from(["fake/fake-model", "fake/fake-reasoner", "fakey", "fake", "nope/x", "deepseek", "", 7, None])
number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10000),
                   st.sampled_from([0, 1, 2, 0.5, 8192, 8193, True, "0.5", None, [1]]))
params = st.dictionaries(st.sampled_from(["temperature", "top_p", "max_tokens", "system", "base_url"]),
                         st.one_of(number, safe_text, odd_text), max_size=3)
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                              "content": st.one_of(safe_text, odd_text, st.integers())})


def with_optional(base: dict, **optional) -> st.SearchStrategy:
    return st.fixed_dictionaries(base, optional={k: v for k, v in optional.items()})


good_message = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).filter(str.strip)
good_chat = st.fixed_dictionaries({"type": st.just("chat"), "message": good_message})
ops = st.one_of(
    good_chat, good_chat, st.builds(lambda op: {**op, "wait_first": True}, good_chat),
    st.builds(lambda op: {**op, "wait_first": True}, good_chat),
    st.just({"wait": True}),
    st.just({"wait": True}),
    st.fixed_dictionaries({"type": st.just("regenerate")}),
    st.fixed_dictionaries({"type": st.just("stop")}),
    with_optional({"type": st.just("chat"), "message": message}, model=model, params=params),
    with_optional({"modelType": model, "message": message}),
    st.fixed_dictionaries({"type": st.just("stop")}),
    st.fixed_dictionaries({"type": st.just("ping")}),
    st.fixed_dictionaries({"type": st.just("reset")}),
    with_optional({"type": st.just("regenerate")}, model=model, params=params),
    with_optional({"type": st.just("edit"), "index": st.one_of(st.integers(-1, 6), st.just("0")),
                   "message": message}),
    with_optional({"type": st.just("set")}, model=model, params=params),
    st.fixed_dictionaries({"type": st.just("restore"), "history": st.lists(turn, max_size=4)}),
    st.fixed_dictionaries({"type": st.one_of(safe_text, st.integers(), st.none())}),
    st.builds(lambda t: {"raw": t}, st.one_of(
        st.builds(lambda t: "{" + t, safe_text), st.sampled_from(["[1,2]", "42", "null", '{"type": "chat",}']),
        safe_text.filter(lambda t: not t.lstrip().startswith("{"))),
    ),
    st.just({"wait": True}),
)
terminal = st.sampled_from([None, None, None, "binary", "oversize"])

upstream_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8)
scripts = st.lists(st.one_of(
    st.builds(lambda ps, p: reply(*ps, pause=p), st.lists(upstream_text, min_size=1, max_size=4),
              st.sampled_from([0.0, 0.0, 0.005, 0.02])),
    st.builds(lambda ps: reply(*ps, reasoning=("thinking",)), st.lists(upstream_text, min_size=1, max_size=2)),
    st.builds(lambda s: error(s, "upstream says no"), st.sampled_from([400, 401, 429, 500, 503])),
    st.builds(lambda t: Script([ROLE, chunk(t), 0.01, "reset"]), upstream_text),
    st.builds(lambda t: Script([ROLE, chunk(t), b"data: {broken\n\n"]), upstream_text),
    st.just(from_fixture("in-stream-error.txt")),
    st.just(Script(["hang"])),
    st.builds(lambda t: Script([ROLE, chunk(t), "hang"]), upstream_text),
    st.builds(lambda t: Script([ROLE, chunk(t)]), upstream_text),
    st.just(Script([KEEPALIVE, 0.05] * 8)),
    st.builds(lambda t: Script([ROLE, chunk(t), chunk(finish="stop"), DONE]), upstream_text),
), max_size=6)


# ---------------------------------------------------------------------------- the model of a session

class Model:
    """What the history must be: ("user", text) and ("assistant", reply id or restored text)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, bool]] = []  # (role, text-or-rid, restored)

    def apply(self, op: dict, window: list[dict]) -> None:
        starts = [f for f in window if f["type"] == "start"]
        assert len(starts) <= 1, f"one frame started {len(starts)} replies"
        kind, msg = kind_of(op)
        if kind == "chat" and starts:
            self.entries += [("user", clean(msg), False), ("assistant", starts[0]["reply"], False)]
        elif kind == "regenerate" and starts:
            assert self.entries and self.entries[-1][0] == "assistant"
            self.entries[-1] = ("assistant", starts[0]["reply"], False)
        elif kind == "edit" and starts:
            del self.entries[op["index"]:]
            self.entries += [("user", clean(op["message"]), False), ("assistant", starts[0]["reply"], False)]
        elif kind == "reset":
            self.entries = []
        elif kind == "restore":
            sessions = [f for f in window if f["type"] == "session"]
            if sessions:
                self.entries = [(t["role"], t["content"], True) for t in sessions[-1]["history"]]
        else:
            assert not starts, f"{op} started a reply"

    def expected(self, frames: list[dict]) -> list[tuple[str, str, str | None]]:
        out = []
        for role, value, restored in self.entries:
            if role == "user" or restored:
                out.append((role, value, None))
            else:
                text = "".join(f["content"] for f in frames if f["type"] == "delta" and f["reply"] == value)
                done = [f["finish_reason"] for f in frames if f["type"] == "done" and f["reply"] == value]
                assert len(done) == 1, f"reply {value} ended with {len(done)} done events"
                out.append((role, text, done[0]))
        return out


def kind_of(op: dict) -> tuple[str, object]:
    """How the server must read ``op``: (kind, message)."""
    if "raw" in op:
        raw = op["raw"]
        try:
            strict_json(raw)  # any JSON must be a command object; only text that is not JSON is a chat
        except ValueError:
            return ("junk", None) if raw.lstrip().startswith("{") else ("chat", raw)
        return "junk", None
    if "type" not in op:
        return ("chat", op["message"]) if "message" in op else ("junk", None)
    kind = op["type"]
    if kind == "chat":
        return "chat", op.get("message")
    if kind in ("stop", "ping", "reset", "regenerate", "edit", "set", "restore"):
        return kind, op.get("message")
    return "junk", None


def check_answer(op: dict, window: list[dict]) -> None:
    """Every frame but ``stop`` gets exactly one answer of the right kind before the pong."""
    kind, _ = kind_of(op)
    answers = [f for f in window[:-1] if f["type"] in ("start", "session", "pong")
               or (f["type"] == "error" and "reply" not in f)]
    if kind == "stop":
        assert answers == [], (op, answers)
        return
    assert len(answers) == 1, f"{op!r} got {len(answers)} answers: {answers}"
    a = answers[0]
    allowed = {"chat": {"start", "error"}, "regenerate": {"start", "error"}, "edit": {"start", "error"},
               "set": {"session", "error"}, "reset": {"session"}, "restore": {"session", "error"},
               "ping": {"pong"}, "junk": {"error"}}[kind]
    assert a["type"] in allowed, (op, a)
    if kind == "junk":
        assert a["code"] == "bad_request", (op, a)


# ---------------------------------------------------------------------------- the property

class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:  # the fake upstream shares aiohttp's server logger: its own errors are noise
            if tb.tb_frame.f_code.co_filename.endswith("fake_upstream.py"):
                return
            tb = tb.tb_next
        self.records.append(record)


async def run_example(tmp_path, frames_to_send: list[dict], upstream_scripts: list[Script], last) -> None:
    upstream = FakeUpstream()
    await upstream.start()
    upstream.push(*upstream_scripts)
    cfg = tmp_path / "fuzz.toml"
    cfg.write_text(extra_config(upstream.url, CONFIG))
    client = TestClient(TestServer(create_app(load_settings(str(cfg), env={}))))
    await client.start_server()
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        h = Harness(client, upstream)
        peer = await h.ws()
        model = Model()
        closed = None
        try:
            for op in frames_to_send:
                if op.get("wait") or op.get("wait_first"):
                    running = running_replies(peer.frames)
                    if running:
                        await peer.until("done", timeout=5, reply=running[0])
                    if op.get("wait"):
                        continue
                    op = {k: v for k, v in op.items() if k != "wait_first"}
                if "raw" in op:
                    await peer.ws.send_str(op["raw"])
                else:
                    await peer.send(op)
                window = await peer.until("pong") if kind_of(op)[0] == "ping" else []
                window += await peer.sync()
                check_answer(op, window)
                model.apply(op, window)
                assert len(running_replies(peer.frames)) <= 1, "two replies running in one session"
            if last == "binary":
                await peer.ws.send_bytes(b"\x00")
                closed = await peer.expect_close()
                assert closed == 1003, closed
            elif last == "oversize":
                await peer.send({"type": "chat", "message": "z" * 20000})
                closed = await peer.expect_close()
                assert closed == 1009, closed
            else:
                await peer.stop()
                await peer.sync()
        except ConnectionClosed as exc:
            raise AssertionError(f"the server closed the socket ({exc.code}) after an ordinary frame") from None
        await h.settle()
        if closed is None:
            assert not running_replies(peer.frames), "a reply started but never ended"
        s = h.session(peer.sid)
        actual = [(t["role"], t["content"], t.get("finish_reason") if t["role"] == "assistant" else None)
                  for t in s.history]
        if closed is None:
            expected = model.expected(peer.frames)
            restored = [was for _, _, was in model.entries]
            if len(actual) == len(restored):  # a restored turn keeps its own finish_reason: not compared
                actual = [(r, c, None if was else f) for (r, c, f), was in zip(actual, restored)]
            assert actual == expected, f"history {actual!r}\nexpected {expected!r}"
        h.nonlinear.add(peer.sid)  # the model above checked the history in full
        await h.check()
        assert not errors.records, "the server logged errors: " + "; ".join(
            f"{r.name}: {r.getMessage()}" for r in errors.records)
    finally:
        logging.getLogger().removeHandler(errors)
        await client.close()
        await upstream.close()


def running_replies(frames: list[dict]) -> list[str]:
    started = [f["reply"] for f in frames if f["type"] == "start"]
    ended = {f["reply"] for f in frames if f["type"] == "done"}
    return [r for r in started if r not in ended]


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(frames_to_send=st.lists(ops, min_size=4, max_size=12), upstream_scripts=scripts, last=terminal)
def test_websocket_protocol_fuzz(tmp_path, frames_to_send, upstream_scripts, last):
    asyncio.run(run_example(tmp_path, frames_to_send, upstream_scripts, last))
