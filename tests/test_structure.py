"""The shape of the code, checked: no import cycles, transports only on the facade and the
encoders, no module over ~400 lines (tools/import_graph.py prints the graph)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

MAX_LINES = 420  # "under ~400": a docstring's worth of slack, no more


def test_no_cycles_and_transports_use_only_the_facade():
    eager, _ = import_graph.graph()
    assert "nexlm.conversations" in eager and "nexlm.transports.ws" in eager
    assert import_graph.problems(eager) == []


def test_the_checks_can_fail():
    """A cycle and a transport reaching into the store are both reported."""
    fake = {"nexlm.a": {"nexlm.b"}, "nexlm.b": {"nexlm.a"},
            "nexlm.transports.ws": {"nexlm.store", "nexlm.conversations"}}
    found = import_graph.problems(fake)
    assert any("cycle" in f and "nexlm.a" in f for f in found)
    assert any("nexlm.transports.ws imports nexlm.store" in f for f in found)
    assert not any("nexlm.conversations" in f and "imports" in f for f in found)


def test_no_module_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "nexlm").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


async def test_idle_conversations_cost_the_collector_nothing(client):
    """10,000 stored idle conversations add (almost) no objects for the garbage collector to walk:
    a full collection's pause grows with tracked objects, and it paused every live stream."""
    import gc
    from dataclasses import replace

    from nexlm.appkeys import CONVERSATIONS

    convs = client.app[CONVERSATIONS]
    # the built-in caps would refuse 10,000 from one client; this is about what each one costs
    convs.store.max_sessions = convs.store.max_per_client = 20000
    convs.limiter.config = replace(convs.limiter.config, sessions_per_minute=0)
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(10000):
        await convs.create_seeded(None, "c", params={"temperature": 0.5},
                                  history=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    await convs.housekeeping_once()  # nothing running, nobody listening: they are records now
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert convs.stats()["sessions"] == 10000 and convs.stats()["live"] == 0
    assert grown < 500, f"{grown} more tracked objects for 10,000 idle conversations"


async def test_storing_idle_conversations_leaves_the_collector_nothing_to_count(client):
    """Creating 10,000 conversations through ``POST /api/sessions``'s path leaves no tracked object
    behind, not even until the next collection: the young-generation counters barely move, so
    idle conversations cannot shift a young collection into live streams (bench IDLE)."""
    import gc
    from dataclasses import replace

    from nexlm.appkeys import CONVERSATIONS

    convs = client.app[CONVERSATIONS]
    convs.store.max_sessions = convs.store.max_per_client = 20000
    convs.limiter.config = replace(convs.limiter.config, sessions_per_minute=0)
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    gc.collect()
    gc.disable()  # count, don't collect: what stays tracked shows in the counter
    try:
        before = gc.get_count()[0]
        for _ in range(10000):
            await convs.create_seeded(None, "c", params={"temperature": 0.5}, history=history)
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert convs.stats()["sessions"] == 10000 and convs.stats()["live"] == 0
    assert grown < 500, f"{grown} tracked objects left by 10,000 stored conversations"


async def test_housekeeping_collects_the_young_generations_only_when_nothing_streams(client):
    import gc

    from nexlm.appkeys import CONVERSATIONS

    convs = client.app[CONVERSATIONS]
    thresholds = gc.get_threshold()
    gc.set_threshold(1_000_000, 1000, 1000)  # no automatic collection in the way of the counters
    try:
        junk = [[i] for i in range(3000)]  # tracked objects: the young counter is well above zero
        convs.limiter.running_total = 1  # a reply is running somewhere: no collection now
        await convs.housekeeping_once()
        assert gc.get_count()[0] >= 3000
        convs.limiter.running_total = 0
        await convs.housekeeping_once()
        assert gc.get_count()[:2] == (0, 0)
    finally:
        convs.limiter.running_total = 0
        gc.set_threshold(*thresholds)
        del junk
