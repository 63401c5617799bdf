"""Event-loop lag, sampled: how late a 10 ms sleep wakes up, over the last minute or so.

A loop that is blocked (CPU-bound work, a blocking call) shows up here first; the
benchmark reads it from ``/api/metrics`` (B7) and operators can alert on it (``/metrics``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class LoopLag:
    def __init__(self, interval: float = 0.01, keep: int = 6000,
                 observe: Callable[[float], None] | None = None) -> None:
        self.interval = interval
        self.samples: deque[float] = deque(maxlen=keep)  # lag in ms
        self.observe = observe  # also told each sample, in seconds (the Prometheus histogram)

    async def run(self) -> None:
        clock = time.perf_counter  # uvloop's loop.time() has only millisecond resolution
        while True:
            t0 = clock()
            await asyncio.sleep(self.interval)
            lag = max(0.0, clock() - t0 - self.interval)
            self.samples.append(lag * 1000)
            if self.observe is not None:
                self.observe(lag)

    def snapshot(self, reset: bool = False) -> dict:
        data = sorted(self.samples)
        if reset:
            self.samples.clear()
        if not data:
            return {"n": 0, "p50": None, "p99": None, "max": None}
        pick = lambda q: round(data[min(len(data) - 1, int(q * len(data)))], 3)  # noqa: E731
        return {"n": len(data), "p50": pick(0.5), "p99": pick(0.99), "max": round(data[-1], 3)}
