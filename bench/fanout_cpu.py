"""NexLM CPU per relayed token, a reply followed by a second listener: memory against redis.

    python bench/fanout_cpu.py [--rounds 3] [--pairs 50] [--n 400] [--out bench/results-fanout.md]

Each round starts fresh processes (a heap that never grew, no leftovers of other phases): the fast fake
upstream and the load (bench/fanout.py) on one core, NexLM on the other. memory: one NexLM, the chat
client and the listener on two sockets of one session. redis: a redis-server (on the harness core), the
chat on instance A, the listener on instance B (``/ws?session=ID``). CPU is read from /proc for the NexLM
processes only, from before the load starts to after it ends; the figure is the median of the rounds,
the rounds alternating memory and redis so that drift of the machine hits both. Issue 13's target: redis
at most 1.5× memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, LIFTED_LIMITS, ROOT, Proc, cpu_seconds, free_port, http_json, machine_lines, tests_module  # noqa: E402


def config(up_port: int, store: str) -> str:
    return f"""[server]
max_connections_per_address = 0
[chat]
default_model = "fake/fake-model"
resume_grace_seconds = 0
max_sessions = 100000
background_replies = false
{LIFTED_LIMITS}[providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:{up_port}/v1"
models = ["fake-model"]
{store}"""


def start_nexlm(tmp: Path, name: str, cfg: str, cpus) -> tuple[Proc, str]:
    path = tmp / f"{name}.toml"
    path.write_text(cfg)
    port = free_port()
    p = Proc(name, [sys.executable, str(ROOT / "app.py"), "--config", str(path), "--port", str(port)],
             tmp / f"{name}.log", cpus=cpus, cwd=tmp)
    deadline = time.monotonic() + 30
    while True:
        if not p.alive():
            raise RuntimeError(f"{name} exited at start: {(tmp / f'{name}.log').read_text()[-2000:]}")
        try:
            http_json(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return p, f"127.0.0.1:{port}"
        except Exception:  # noqa: BLE001
            if time.monotonic() > deadline:
                p.stop()
                raise RuntimeError(f"{name} did not answer /healthz") from None
            time.sleep(0.05)


def one_round(tmp: Path, kind: str, up_port: int, redis, args, nex_cpus, harness_cpus) -> dict:
    store = f'[store]\nkind = "redis"\nurl = "redis://127.0.0.1:{redis.port}/0"\n' if kind == "redis" else ""
    procs = []
    try:
        a, a_addr = start_nexlm(tmp, f"{kind}-a", config(up_port, store), nex_cpus)
        procs.append(a)
        b_addr = a_addr
        if kind == "redis":
            b, b_addr = start_nexlm(tmp, f"{kind}-b", config(up_port, store), nex_cpus)
            procs.append(b)
        spies = [subprocess.Popen(["py-spy", "record", "-p", str(p.pid), "-r", "200", "-d", str(int(args.n * args.iv / 1e3) + 1),
                                   "-f", "raw", "-o", f"{args.profile}/{p.name}.txt"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for p in procs] if args.profile else []
        c0 = [cpu_seconds(p.pid) for p in procs]
        r0 = cpu_seconds(redis.proc.pid)
        f = Proc("fanout", [sys.executable, str(BENCH / "fanout.py"), "--a", a_addr, "--b", b_addr, "--pairs",
                            str(args.pairs), "--n", str(args.n), "--iv", str(args.iv), "--stagger-ms", "500"],
                 tmp / "fanout.log", cpus=harness_cpus, pipe_stdout=True)
        try:
            res = json.loads(f.readline(120 + args.n * args.iv / 1e3 * 3))
        finally:
            f.stop()
        per = [cpu_seconds(p.pid) - c for p, c in zip(procs, c0)]
        for s in spies:
            s.wait(30)
        tokens = args.pairs * args.n
        res["us_per_token_by_instance"] = [round(c * 1e6 / tokens, 1) for c in per]
        res["us_per_token"] = round(sum(per) * 1e6 / tokens, 1)
        if kind == "redis":
            res["redis_server_us_per_token"] = round((cpu_seconds(redis.proc.pid) - r0) * 1e6 / tokens, 1)
        return res
    finally:
        for p in procs:
            p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--n", type=int, default=400, help="tokens per reply")
    ap.add_argument("--iv", type=float, default=20, help="ms between tokens")
    ap.add_argument("--profile", metavar="DIR", help="py-spy each NexLM during the load (collapsed stacks DIR/NAME.txt; "
                    "its sampling costs CPU too: figures from such a run are not comparable)")
    ap.add_argument("--out", help="append a results section to this markdown file")
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    harness_cpus, nex_cpus = ([0], [1]) if ncpu >= 2 else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="nexlm-fanout-"))
    up = Proc("upstream", [sys.executable, str(BENCH / "fake_upstream.py"), "--port", "0", "--uvloop"],
              tmp / "upstream.log", cpus=harness_cpus, pipes=True)
    redis = tests_module("redis_servers").RedisServer(tmp / "redis")
    if harness_cpus:
        os.sched_setaffinity(redis.proc.pid, harness_cpus)
    out: dict[str, list[dict]] = {"memory": [], "redis": []}
    try:
        line = up.readline(20)
        assert line.startswith("READY"), line
        up_port = int(line.split()[1])
        for i in range(args.rounds):
            for kind in (("memory", "redis") if i % 2 == 0 else ("redis", "memory")):
                r = one_round(tmp, kind, up_port, redis, args, nex_cpus, harness_cpus)
                print(f"[fanout {time.strftime('%H:%M:%S')}] round {i + 1} {kind}: {json.dumps(r)}", file=sys.stderr, flush=True)
                out[kind].append(r)
    finally:
        up.stop()
        redis.stop()
    med = {k: statistics.median(r["us_per_token"] for r in v) for k, v in out.items()}
    errors = sum(r["errors"] for v in out.values() for r in v)
    ratio = med["redis"] / med["memory"]
    verdict = "PASS" if ratio <= 1.5 and errors == 0 else "FAIL"
    summary = {"memory_us_per_token": med["memory"], "redis_us_per_token": med["redis"], "ratio": round(ratio, 2),
               "errors": errors, "verdict": verdict, "rounds": out}
    print(json.dumps(summary))
    if args.out:
        load = os.getloadavg()[0]
        lines = [f"\n## Fan-out CPU, {time.strftime('%Y-%m-%d %H:%M')} (load average {load:.2f} at the end)\n",
                 f"`python bench/fanout_cpu.py --rounds {args.rounds} --pairs {args.pairs} --n {args.n} --iv {args.iv:g}`; "
                 + "; ".join(line.lstrip("- ") for line in machine_lines()) + "\n",
                 "| store | µs/token per round (instances) | median | redis-server µs/token "
                 "| listener behind the chat client, ms p50/p99 per round (from 1 s after attaching) |",
                 "|---|---|---|---|---|"]
        for k, v in out.items():
            rounds = ", ".join(f"{r['us_per_token']} ({' + '.join(map(str, r['us_per_token_by_instance']))})" for r in v)
            rs = ", ".join(str(r.get("redis_server_us_per_token", "—")) for r in v)
            lag = ", ".join(f"{r['listener_lag_ms'].get('p50')}/{r['listener_lag_ms'].get('p99')} "
                            f"({r['listener_lag_after_1s_ms'].get('p50')}/{r['listener_lag_after_1s_ms'].get('p99')})" for r in v)
            lines.append(f"| {k} | {rounds} | {med[k]} | {rs} | {lag} |")
        lines.append(f"\nredis / memory = **{ratio:.2f}×** (target ≤ 1.5×): **{verdict}**; errors {errors}.\n")
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
