"""What usage recording and quota checks add per reply (issue 14's Speed: at most 0.1 ms p50 on B1).

    python bench/accounting_cost.py [--n 20000]

Builds the real app in process (memory store, a named user with a default quota), then times on
the event loop, per call: ``Admission.check_quota`` (the only new step before the first token) and
the ended-turn fan-out (metrics, usage, quotas: after the reply, off the TTFT path), with the quota
and usage steps also timed alone. CPU time (``time.process_time_ns``) per call, so a busy machine
slows it less than wall time would; p50/p99 over ``--n`` calls. No network: the upstream is never
called (the turn is built, not run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp.test_utils import TestServer  # noqa: E402

from nexlm.appkeys import CONVERSATIONS, GATEWAY, REGISTRY, USAGE  # noqa: E402
from nexlm.clients import Who  # noqa: E402
from nexlm.config import load_settings  # noqa: E402
from nexlm.engine import Turn  # noqa: E402
from nexlm.providers.base import ChatRequest  # noqa: E402
from nexlm.server import create_app  # noqa: E402

CONFIG = """[chat]
default_model = "fake/fake-model"
[auth.users.alice]
token = "alice-token-0123456789"
groups = ["staff"]
[quotas.default]
tokens_per_day = 1000000000
messages_per_day = 1000000000
models = ["fake/*"]
[providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
models = ["fake-model"]
"""


def pct(xs: list[int]) -> str:
    xs = sorted(xs)
    return f"p50 {statistics.median(xs) / 1000:.1f} µs, p99 {xs[int(len(xs) * 0.99)] / 1000:.1f} µs"


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "nexlm.toml"
        cfg.write_text(CONFIG)
        app = create_app(load_settings(str(cfg), env={}))
        server = TestServer(app)
        await server.start_server()
        try:
            admission = app[GATEWAY].admission
            resolved = app[REGISTRY].resolve("fake/fake-model")
            who = Who("alice", ("staff",), "c")
            fan_out = app[CONVERSATIONS].on_turn_done
            recorder, quotas = app[USAGE], admission.quotas
            request = ChatRequest(resolved.model, [{"role": "user", "content": "hi"}])

            def turn() -> Turn:
                t = Turn(resolved, request, door="v1", owner="u:alice", client="c", who=who)
                t.usage = {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}
                t.finish, t.first_token = "stop", t.started + 0.001
                return t

            results = {}
            for name, step in (
                ("check_quota (before the first token)", lambda: admission.check_quota(who, resolved)),
            ):
                xs = []
                for _ in range(n):
                    t0 = time.process_time_ns()
                    await step()
                    xs.append(time.process_time_ns() - t0)
                results[name] = xs
            for name, fn in (("ended-turn fan-out: metrics + usage + quotas (after the reply)", fan_out),
                             ("  usage recorder alone", recorder.turn_done),
                             ("  quotas alone", quotas.turn_done)):
                turns = [turn() for _ in range(n)]
                xs = []
                for t in turns:
                    t0 = time.process_time_ns()
                    fn(t, None)
                    xs.append(time.process_time_ns() - t0)
                results[name] = xs
                await asyncio.sleep(0.6)  # let the recorder's batch writer and quota counting run
            for name, xs in results.items():
                print(f"{name}: {pct(xs)} (n={n})")
        finally:
            await server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    asyncio.run(main(ap.parse_args().n))
