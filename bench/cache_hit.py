"""Time to first token of a response-cache hit against a miss to the same upstream (issue 14, "Speed").

    python bench/cache_hit.py            # 300 misses and 300 hits per door, interleaved; prints a table
    python bench/cache_hit.py --quick    # 20 of each: checks the script end to end only

One NexLM process (``app.py``, ``[cache] enabled = true``) in front of bench/fake_upstream.py (unpaced,
5 tokens). Over ``/v1/chat/completions`` (streamed) and ``/ws`` (``reset`` between replies, so every
hit has the same upstream messages), in one run: a miss is a question never asked (its own tag), a hit
the primed question; both at temperature 0. TTFT = request written -> first content delta read, with
aiohttp's client (the same client for both, so the difference is the upstream round trip saved).
Target: hit p50 at most 1 ms. Timings only here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, LIFTED_LIMITS, ROOT, Proc, free_port, http_json, summary_ms  # noqa: E402


def config(up_port: int) -> str:
    return f"""[server]
max_connections_per_address = 0
[chat]
default_model = "fake/fake-model"
resume_grace_seconds = 0
{LIFTED_LIMITS}[cache]
enabled = true
[providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}/v1"
models = ["fake-model"]
"""


async def v1_ttft(session: aiohttp.ClientSession, url: str, text: str) -> tuple[float, str]:
    body = {"model": "fake/fake-model", "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": text}]}
    t0 = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        first = None
        async for line in r.content:
            if first is None and line.startswith(b"data: {") and b'"content":"' in line:
                first = time.perf_counter() - t0
        return first, r.headers.get("x-nexlm-cache", "")


async def ws_ttft(ws, text: str) -> tuple[float, bool]:
    await ws.send_json({"type": "reset"})
    while (await ws.receive_json())["type"] != "session":
        pass
    t0 = time.perf_counter()
    await ws.send_json({"type": "chat", "message": text, "params": {"temperature": 0}})
    first = None
    while True:
        f = await ws.receive_json()
        if f["type"] == "delta" and first is None:
            first = time.perf_counter() - t0
        if f["type"] == "done":
            return first, bool(f.get("cached"))


async def measure(url: str, n: int) -> dict:
    out = {}
    async with aiohttp.ClientSession() as session:
        hit_q = "n=5 iv=0 tag=primed"
        await v1_ttft(session, url, hit_q)  # prime (the write is done by the time the next request looks)
        await asyncio.sleep(0.2)
        for door in ("v1", "ws"):
            miss, hit, wrong = [], [], 0
            ws = await session.ws_connect(url + "/ws") if door == "ws" else None
            if ws is not None:
                await ws.receive_json()
            for i in range(n):
                for kind in ("miss", "hit") if i % 2 else ("hit", "miss"):
                    q = hit_q if kind == "hit" else f"n=5 iv=0 tag={door}-miss-{i}"
                    if ws is None:
                        t, status = await v1_ttft(session, url, q)
                        wrong += status != kind
                    else:
                        t, cached = await ws_ttft(ws, q)
                        wrong += cached != (kind == "hit")
                    (hit if kind == "hit" else miss).append(t)
            if ws is not None:
                await ws.close()
            out[door] = {"miss": summary_ms(miss), "hit": summary_ms(hit), "wrong": wrong}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, default=300)
    args = ap.parse_args(argv)
    n = 20 if args.quick else args.n
    tmp = Path(tempfile.mkdtemp(prefix="nexlm-cache-bench-"))
    up = Proc("upstream", [sys.executable, str(BENCH / "fake_upstream.py"), "--port", "0"], tmp / "up.log",
              pipes=True)
    nex = None
    try:
        line = up.readline(20)
        up_port = int(line.split()[1])
        cfg = tmp / "bench.toml"
        cfg.write_text(config(up_port))
        port = free_port()
        nex = Proc("nexlm", [sys.executable, str(ROOT / "app.py"), "--config", str(cfg), "--port", str(port)],
                   tmp / "nexlm.log", cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                http_json(url + "/healthz", timeout=1)
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline or not nex.alive():
                    raise RuntimeError(f"NexLM did not start; see {tmp / 'nexlm.log'}") from None
                time.sleep(0.1)
        res = asyncio.run(measure(url, n))
    finally:
        for p in (nex, up):
            if p is not None:
                p.stop()
    print("| row | miss p50 | hit p50 | hit p99 | target | result |")
    print("|---|---|---|---|---|---|")
    ok = True
    for door, r in res.items():
        good = r["hit"]["p50"] <= 1.0 and r["wrong"] == 0
        ok &= good
        note = f" ({r['wrong']} mislabelled)" if r["wrong"] else ""
        print(f"| CACHE-ttft-{door} | {r['miss']['p50']:.2f} ms | {r['hit']['p50']:.2f} ms | {r['hit']['p99']:.2f} ms "
              f"| hit p50 <= 1 ms | {'PASS' if good else 'FAIL'}{note} |")
    print(json.dumps(res), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
