"""Run a server script with its garbage-collector collections counted and timed (bench only).

    python bench/gc_trace.py OUT.json app.py --config ... --port ...

The product exposes no GC figures, so the bench wraps the process: ``gc.callbacks`` time every
collection (per generation: count, total and max pause), and a daemon thread answers a request
file (``OUT.json.req``: touch it, wait for OUT.json to be rewritten) with those figures plus
``len(gc.get_objects())`` (tracked objects; that one walk takes a few ms, so ask between rounds,
not during a measurement). The callbacks cost a microsecond or two per collection.
With BENCH_GC_OFF=1 (``--set idle_gc_off=1``) automatic collections are off: the control that tells
what the collector costs from what the rest of the process does.
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import sys
import threading
import time

_stats = {g: {"n": 0, "total_ms": 0.0, "max_ms": 0.0} for g in (0, 1, 2)}
_t0 = [0.0]


def _cb(phase: str, info: dict) -> None:
    if phase == "start":
        _t0[0] = time.perf_counter()
        return
    d = (time.perf_counter() - _t0[0]) * 1e3
    s = _stats[info["generation"]]
    s["n"] += 1
    s["total_ms"] += d
    if d > s["max_ms"]:
        s["max_ms"] = d


def snapshot() -> dict:
    return {"gen": {str(g): {"n": s["n"], "total_ms": round(s["total_ms"], 3), "max_ms": round(s["max_ms"], 3)}
                    for g, s in _stats.items()},
            "tracked_objects": len(gc.get_objects()), "thresholds": gc.get_threshold()}


def _answer(out: str) -> None:
    req = out + ".req"
    while True:
        time.sleep(0.1)
        if os.path.exists(req):
            os.unlink(req)
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(snapshot(), f)
            os.replace(tmp, out)


def main() -> None:
    out, script, *rest = sys.argv[1:]
    gc.callbacks.append(_cb)
    if os.environ.get("BENCH_GC_OFF"):  # bench/run.py --set idle_gc_off=1: no automatic collections at all
        gc.disable()
    threading.Thread(target=_answer, args=(os.path.abspath(out),), daemon=True).start()
    sys.argv = [script, *rest]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
