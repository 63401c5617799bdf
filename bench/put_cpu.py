"""CPU of one ``RedisStore.put`` (a running reply's checkpoint), against a redis-server it starts.

    python bench/put_cpu.py [--n 20000]

A record with a short history and a 2,000-character streaming turn, put ``--n`` times in a row;
``time.process_time`` of this process only (the redis-server's CPU is not counted). The figure
``redis_batch.packed_pipeline``'s docstring cites (a redis-py pipeline against that packed put).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, tests_module  # noqa: E402

sys.path.insert(0, str(ROOT))
from nexlm.records import Conversation  # noqa: E402
from nexlm.store_redis import RedisStore  # noqa: E402


async def measure(url: str, n: int) -> dict:
    store = RedisStore(url, 3600, 100_000, 10_000, in_use=lambda cid: False)
    await store.open()
    try:
        conv = Conversation(None, "127.0.0.1", "fake/fake-model")
        await store.add(conv)
        conv.history = [{"role": "user", "content": "hello " * 20},
                        {"role": "assistant", "content": "x" * 2000, "finish_reason": "streaming"}]
        t = time.process_time()
        for _ in range(n):
            await store.put(conv)
        return {"puts": n, "us_per_put": round((time.process_time() - t) / n * 1e6, 1)}
    finally:
        await store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    args = ap.parse_args()
    redis = tests_module("redis_servers").RedisServer(Path(tempfile.mkdtemp(prefix="nexlm-put-")) / "redis")
    try:
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            run = asyncio.run
        res = run(measure(redis.url, args.n))
    finally:
        redis.stop()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
