"""Fan-out load for ``bench/run.py --only STORES`` (issue 13): each pair is a chat client on instance A
and a listener on instance B (``/ws?session=ID``, attached once the reply has started: it replays from
``start`` and then follows live) that reads the reply to its ``done``.

    python bench/fanout.py --a 127.0.0.1:PORT_A --b 127.0.0.1:PORT_B --pairs 20 --n 200 --iv 20

A and B may be the same instance (memory store: two sockets on one session). Prints one JSON line:
pairs, errors, tokens seen by the chat clients and by the listeners, and the wall time. Only the
servers' CPU is measured (by run.py), so an aiohttp client is fine here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

TOKEN_CHARS = 4


async def read_until_done(ws, on_start=None, marks: list | None = None) -> tuple[int, str | None]:
    """Tokens and finish reason; ``marks`` gets (characters so far, monotonic time) per delta."""
    chars, finish = 0, None
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        ev = json.loads(msg.data)
        t = ev.get("type")
        if t == "delta":
            chars += len(ev.get("content") or "")
            if marks is not None:
                marks.append((chars, time.monotonic()))
        elif t == "start" and on_start is not None:
            on_start()
        elif t == "done":
            finish = ev.get("finish_reason")
            break
        elif t == "error":
            finish = "error:" + str(ev.get("code"))
            break
    return chars // TOKEN_CHARS, finish


async def pair(http, a: str, b: str, n: int, iv: float, i: int, delay: float) -> dict:
    await asyncio.sleep(delay)
    async with http.ws_connect(f"http://{a}/ws", origin=f"http://{a}") as wa:
        first = json.loads((await wa.receive()).data)
        sid = first.get("session")
        started = asyncio.Event()
        await wa.send_json({"type": "chat", "message": f"bench n={n} iv={iv:g} tag=fan{i}"})
        chat_marks: list = []
        lis_marks: list = []
        chat = asyncio.ensure_future(read_until_done(wa, started.set, chat_marks))
        try:
            await asyncio.wait_for(started.wait(), 30)
            async with http.ws_connect(f"http://{b}/ws?session={sid}", origin=f"http://{b}") as wb:
                hello = json.loads((await wb.receive()).data)
                attached = time.monotonic()
                if hello.get("session") != sid:
                    return {"error": "listener got another session"}
                lis = await asyncio.wait_for(read_until_done(wb, marks=lis_marks), 60 + n * iv / 1e3 * 3)
            got = await asyncio.wait_for(chat, 60)
        finally:
            chat.cancel()
    return {"chat": got, "listener": lis, "lags": lags(chat_marks, lis_marks, attached)}


def lags(chat: list, lis: list, attached: float) -> list[tuple[float, float]]:
    """For each delta the listener got live (what the chat client got after the listener attached),
    how much later than the chat client it had the text up to there: (ms, seconds since it attached)."""
    out, j = [], 0
    for chars, t in lis if chat else ():
        while j < len(chat) - 1 and chat[j][0] < chars:
            j += 1
        if chat[j][1] > attached:
            out.append(((t - chat[j][1]) * 1e3, t - attached))
    return out


async def main_async(args) -> dict:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        res = await asyncio.gather(*(pair(http, args.a, args.b, args.n, args.iv, i, i * args.stagger_ms / 1e3 / args.pairs)
                                     for i in range(args.pairs)), return_exceptions=True)
    errors, samples = 0, []
    chat_tokens = lis_tokens = 0
    lag: list[tuple[float, float]] = []
    for r in res:
        if isinstance(r, BaseException) or "error" in r:
            errors += 1
            samples.append(repr(r) if isinstance(r, BaseException) else r["error"])
            continue
        (ct, cf), (lt, lf) = r["chat"], r["listener"]
        chat_tokens += ct
        lis_tokens += lt
        lag += r["lags"]
        if cf != "stop" or lf != "stop" or lt != args.n:
            errors += 1
            samples.append(f"chat {ct} {cf}, listener {lt} {lf}")
    return {"pairs": args.pairs, "errors": errors, "error_samples": sorted(set(samples))[:5],
            "chat_tokens": chat_tokens, "listener_tokens": lis_tokens, "wall_s": round(time.monotonic() - t0, 3),
            "listener_lag_ms": percentiles([ms for ms, _ in lag]),
            "listener_lag_after_1s_ms": percentiles([ms for ms, since in lag if since >= 1])}


def percentiles(xs: list[float]) -> dict:
    """p50/p99/max of ``xs`` (the listener's lag behind the chat client, ms), n the count. (The first
    second after attaching has the replay and the other pairs' sessions opening: ``_after_1s`` leaves it out.)"""
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    return {"n": len(xs), "p50": round(xs[len(xs) // 2], 1), "p99": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 1),
            "max": round(xs[-1], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--iv", type=float, default=20)
    ap.add_argument("--stagger-ms", type=float, default=500)
    print(json.dumps(asyncio.run(main_async(ap.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
