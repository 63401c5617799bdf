"""Event-loop lag while the embedded model generates, and its speed.

Runs the real ``LlamaCppProvider`` (by default the packaged Gemma 3 270M) in this
process and samples the loop with ``nexlm.looplag.LoopLag`` (how late a 10 ms
sleep wakes up) in three phases:

* ``idle``: no generation, the baseline for this machine;
* ``generate xN``: N concurrent requests (they queue on the model, one runs at
  a time), each asking for ``--tokens`` tokens; the target is p99 < 10 ms;
* ``control`` (``--control``): the same generation run *on* the loop, to show
  that the instrument does see a blocked loop.

Speed: generation tokens/s counts tokens after the first one (so it excludes
prompt processing), per request; time to first token includes queueing.

    python bench/llamacpp_lag.py                       # 3 runs x 200 tokens, 1 and 2 concurrent
    python bench/llamacpp_lag.py --tokens 100 --runs 1 --concurrency 1 --control
    python bench/llamacpp_lag.py --model-path my.gguf --chat-format "" --n-threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexlm.config import builtin_providers  # noqa: E402
from nexlm.looplag import LoopLag  # noqa: E402
from nexlm.providers.base import ChatRequest, Finish, Params, StreamError, TextDelta, Usage  # noqa: E402
from nexlm.providers import llamacpp  # noqa: E402
from nexlm.providers.llamacpp import LlamaCppProvider  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


async def one_reply(provider: LlamaCppProvider, tokens: int) -> dict:
    loop = asyncio.get_running_loop()
    req = ChatRequest(model=provider.models[0], messages=[{"role": "user", "content": PROMPT}],
                      params=Params(max_tokens=tokens, temperature=0.8))
    start = loop.time()
    first = last = None
    deltas = 0
    usage: dict = {}
    finish = ""
    async for ev in provider.stream(req):
        now = loop.time()
        if isinstance(ev, TextDelta):
            deltas += 1
            first = first if first is not None else now
            last = now
        elif isinstance(ev, Usage):
            usage = ev.data
        elif isinstance(ev, Finish):
            finish = ev.reason
        elif isinstance(ev, StreamError):
            raise SystemExit(f"error from the model: {ev.code}: {ev.message}")
    n = usage.get("completion_tokens", 0)
    gen_s = (last - first) if first is not None and last is not None else 0.0
    return {
        "ttft_ms": round(((first or loop.time()) - start) * 1000, 1),
        "tokens": n,
        "deltas": deltas,
        "finish": finish,
        "tok_s": round((n - 1) / gen_s, 1) if n > 1 and gen_s > 0 else None,
    }


async def sample_lag(coro_factory, settle: float = 0.0) -> tuple[dict, object]:
    lag = LoopLag(interval=0.01, keep=1_000_000)
    sampler = asyncio.create_task(lag.run())
    try:
        result = await coro_factory()
        if settle:
            await asyncio.sleep(settle)
    finally:
        sampler.cancel()
        try:
            await sampler
        except asyncio.CancelledError:
            pass
    return lag.snapshot(), result


def blocking_generate(provider: LlamaCppProvider, tokens: int) -> int:
    """The control: llama.cpp called directly on the loop (what the provider must never do)."""
    llm = provider._model.llm  # noqa: SLF001 - the bench reaches in on purpose
    toks = llm.tokenize(PROMPT.encode())
    n = 0
    for _ in llm.generate(toks, temp=0.8):
        n += 1
        if n >= tokens:
            break
    return n


def fmt_lag(s: dict) -> str:
    return f"loop lag p50 {s['p50']:.2f} ms  p99 {s['p99']:.2f} ms  max {s['max']:.2f} ms  (n={s['n']})"


async def main(args: argparse.Namespace) -> int:
    if args.cache:
        os.environ["NEXLM_CACHE"] = args.cache
    if args.nice is not None:
        llamacpp.WORKER_NICE = args.nice
    cfg = builtin_providers({})["local"]
    if args.model_path:
        cfg = replace(cfg, model_path=args.model_path, chat_format=args.chat_format)
    cfg = replace(cfg, n_threads=args.n_threads, n_ctx=args.n_ctx)
    provider = LlamaCppProvider(cfg)
    reason = provider.unavailable_reason()
    if reason:
        print(f"unavailable: {reason}", file=sys.stderr)
        return 2

    report: dict = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "n_threads": args.n_threads,
                    "nice": llamacpp.WORKER_NICE,
                    "tokens": args.tokens, "runs": args.runs, "phases": []}
    if hasattr(os, "getloadavg"):
        report["loadavg_start"] = os.getloadavg()
        print("load average at the start: " + " ".join(f"{x:.2f}" for x in report["loadavg_start"]))
    t = time.perf_counter()
    await provider.load()
    print(f"model loaded in {time.perf_counter() - t:.2f} s (first time includes assembling the GGUF "
          f"and a self-check subprocess)")
    await one_reply(provider, 4)  # warm-up

    idle, _ = await sample_lag(lambda: asyncio.sleep(args.idle_seconds))
    print(f"idle           {fmt_lag(idle)}")
    report["phases"].append({"phase": "idle", "lag": idle})

    for conc in args.concurrency:
        for run in range(args.runs):
            lag, replies = await sample_lag(
                lambda: asyncio.gather(*(one_reply(provider, args.tokens) for _ in range(conc))))
            rates = [r["tok_s"] for r in replies if r["tok_s"]]
            print(f"generate x{conc} run {run + 1}: {fmt_lag(lag)}; "
                  f"{statistics.mean(rates):.1f} tok/s per reply; "
                  f"ttft {', '.join(str(r['ttft_ms']) for r in replies)} ms; "
                  f"tokens {'/'.join(str(r['tokens']) for r in replies)}, "
                  f"deltas {'/'.join(str(r['deltas']) for r in replies)}")
            report["phases"].append({"phase": f"generate x{conc}", "run": run + 1, "lag": lag, "replies": replies})

    if args.control:
        async def on_loop():
            await asyncio.sleep(0.05)  # let the sampler start
            return blocking_generate(provider, args.tokens)

        lag, n = await sample_lag(on_loop, settle=0.05)
        print(f"control (on the loop, {n} tokens): {fmt_lag(lag)}")
        report["phases"].append({"phase": "control: generate on the loop", "lag": lag})

    await provider.close()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average at the end (1/5/15 min, {os.cpu_count()} cpus): "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} -- other processes' CPU use shows up as lag here too")
        report["loadavg_end"] = load
    worst = max((p["lag"]["p99"] for p in report["phases"] if p["phase"].startswith("generate")), default=None)
    verdict = "PASS" if worst is not None and worst < 10 else "FAIL"
    print(f"worst p99 during generation: {worst} ms -> {verdict} (target < 10 ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n-threads", type=int, default=0, help="0: one per core (the default config)")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--model-path", default="")
    ap.add_argument("--chat-format", default="")
    ap.add_argument("--cache", default="",
                    help="cache dir for the assembled model (default $NEXLM_CACHE or ~/.cache/nexlm)")
    ap.add_argument("--idle-seconds", type=float, default=3.0)
    ap.add_argument("--control", action="store_true", help="also run generation on the loop, to show a blocked loop")
    ap.add_argument("--nice", type=int, default=None,
                    help=f"niceness added to generation threads (default {llamacpp.WORKER_NICE})")
    ap.add_argument("--json", default="", help="write the figures to this file")
    sys.exit(asyncio.run(main(ap.parse_args())))
