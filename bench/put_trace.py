"""Run a server script with every store ``put`` timed (bench only): the turn-commit figure of
``bench/run.py --only STORES`` (issue 13).

    python bench/put_trace.py OUT.json app.py --config ... --port ...

The product has no store-latency metric, so the bench wraps the process, as bench/gc_trace.py does:
``put`` of MemoryStore, SQLiteStore and RedisStore is wrapped to time each call (perf_counter, from the
call to the write being done: SQLite committed in WAL, Redis answered). A daemon thread answers a request
file (``OUT.json.req``: touch it, wait for OUT.json to be rewritten) with the durations so far, split
into final turns (the history ends with an assistant entry whose finish_reason is not ``streaming``) and the others
(checkpoints while a reply streams, new sessions), and starts a new list.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time

_lock = threading.Lock()
_puts: dict[str, list[float]] = {"turn": [], "other": []}


def _kind(conv) -> str:
    hist = getattr(conv, "history", None) or []
    last = hist[-1] if hist and isinstance(hist[-1], dict) else {}
    done = last.get("role") == "assistant" and last.get("finish_reason") not in (None, "streaming")
    return "turn" if done else "other"


def _wrap(cls) -> None:
    orig = cls.put

    async def put(self, conv, *a, **kw):
        t = time.perf_counter()
        try:
            return await orig(self, conv, *a, **kw)
        finally:
            d = time.perf_counter() - t
            with _lock:
                _puts[_kind(conv)].append(d)

    cls.put = put


def _answer(out: str) -> None:
    req = out + ".req"
    while True:
        time.sleep(0.05)
        if os.path.exists(req):
            os.unlink(req)
            with _lock:
                data = {k: list(v) for k, v in _puts.items()}
                for v in _puts.values():
                    v.clear()
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, out)


def main() -> None:
    out, script, *rest = sys.argv[1:]
    sys.argv = [script, *rest]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    from nexlm.store import MemoryStore
    from nexlm.store_redis import RedisStore
    from nexlm.store_sqlite import SQLiteStore
    for cls in (MemoryStore, SQLiteStore, RedisStore):
        _wrap(cls)
    threading.Thread(target=_answer, args=(os.path.abspath(out),), daemon=True).start()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
