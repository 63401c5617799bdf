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

    from nexlm.appkeys import CONVERSATIONS

    from dataclasses import replace

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
