"""When the garbage collector runs: young collections at quiet moments, not inside live streams.

A young (generation 1) collection walks every object that survived since the last one. With
200 replies streaming that is ~37,000 objects (each WebSocket stream holds ~185: its request,
handler, tasks, buffers) and the pause is 20-26 ms, one stall for every stream at once. Its
timing depends on how much was allocated before: 10,000 conversations created through
``POST /api/sessions`` moved it from after a 200-stream round into it (bench IDLE). Collecting
the young generations when no reply is running costs about a millisecond and starts the next
burst of traffic with the counters at zero, so what happened while idle does not decide when
the next pause falls inside the streams.
"""

from __future__ import annotations

import gc


def collect_young() -> None:
    """Collect generations 0 and 1 (call it only when nothing is streaming)."""
    if gc.isenabled():
        gc.collect(1)
