"""Phase STORES of bench/run.py (issue 13, "Speed"): NexLM with each store in turn, side by side.

Per store (memory; sqlite on a temp file; redis on a ``redis-server`` started here on a free loopback
port, ``--save "" --appendonly no``), each on a fresh NexLM process run under bench/put_trace.py:

* B1: added TTFT, 1 WS stream, 5-token replies, rounds interleaved with the direct connection;
* commit: every ``store.put`` of a finished turn timed inside NexLM (call → write done: SQLite committed,
  Redis answered), once for the B1 replies (one at a time) and once for the B4 round (N at once). With
  redis the put is awaited before ``done`` goes out (another instance must see the turn); with memory and
  sqlite it runs after ``done``. Checked too: right after ``done``, ``GET /api/sessions/{id}`` through a
  second HTTP connection (redis: through the second instance) has the finished turn;
* B5: the random stop/disconnect mix; WS ``stop`` → upstream connection closed;
* B4: N 20 ms-paced WS streams: worst gap per stream, gaps > 40 ms, NexLM CPU µs per token;
* fan-out (after the three, bench/fanout_cpu.py's rounds on fresh processes, memory and redis alternating):
  pairs of a chat client and a listener following the same reply (bench/fanout.py). memory: both on the one
  instance; redis: the listener on a second NexLM instance on the same Redis. NexLM CPU (both instances)
  per reply token, the median round; target redis ≤ 1.5 × memory.

``[chat] background_replies = false`` for every store, so that a client that leaves stops its reply as
with memory (B5 compares like with like; sqlite and redis default it to true).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import fanout_cpu
from common import Proc, free_port, http_json, quantile, tests_module

STORES = ("memory", "sqlite", "redis")
STORES_ROW_IDS = ["S-B1", "S-commit-1", "S-commit-N", "S-readable", "S-B5", "S-B4", "S-fanout"]
FANOUT_MAX_RATIO = 1.5


def _summ(vals_s):
    if not vals_s:
        return {"n": 0}
    return {"n": len(vals_s), "p50": quantile(vals_s, .5) * 1e3, "p99": quantile(vals_s, .99) * 1e3,
            "max": max(vals_s) * 1e3}


def store_block(kind: str, b) -> str:
    if kind == "memory":
        return '[store]\nkind = "memory"\n'
    if kind == "sqlite":
        return f'[store]\nkind = "sqlite"\npath = "{b.tmp / "stores-bench.db"}"\n'
    return f'[store]\nkind = "redis"\nurl = "{b.redis.url}"\n'


def puts(b, out) -> dict:
    """The put durations NexLM recorded since the last call (bench/put_trace.py), then a fresh list."""
    req = out.with_name(out.name + ".req")
    before = out.stat().st_mtime_ns if out.exists() else 0
    req.touch()
    deadline = time.monotonic() + 10
    while (not out.exists() or out.stat().st_mtime_ns == before or req.exists()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return json.loads(out.read_text())


def start_second(b, cfg_text: str) -> tuple[Proc, str]:
    """A second NexLM on the same config (the redis fan-out), on NexLM's core too."""
    cfg = b.tmp / "bench-b.toml"
    cfg.write_text(cfg_text)
    port = free_port()
    app = os.path.abspath(b.args.app)
    p = Proc("nexlm", [sys.executable, app, "--config", str(cfg), "--port", str(port)], b.tmp / "nexlm-b.log",
             cpus=b.nexlm_cpus, cwd=b.tmp)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if not p.alive():
            raise RuntimeError(f"second NexLM exited at start: {(b.tmp / 'nexlm-b.log').read_text()[-2000:]}")
        try:
            http_json(url + "/healthz", timeout=1)
            return p, f"127.0.0.1:{port}"
        except Exception:  # noqa: BLE001
            if time.monotonic() > deadline:
                p.stop()
                raise RuntimeError("second NexLM did not answer /healthz within 30 s") from None
            time.sleep(0.1)


def readable(b, base: str, count: int) -> dict:
    """Right after ``done`` (the load generator's last reply ended), a second connection reads the record."""
    ok = bad = 0
    for sid in list(b.lg.call({"cmd": "list_sessions"}).get("sessions", []))[-count:]:
        try:
            rec = http_json(f"{base}/api/sessions/{sid}")
            hist = rec.get("history") or []
            last = hist[-1] if hist else {}
            good = last.get("role") == "assistant" and last.get("finish_reason") == "stop"
        except Exception:  # noqa: BLE001
            good = False
        ok, bad = ok + good, bad + (not good)
    return {"ok": ok, "bad": bad}


def fanout_rounds(b) -> dict:
    """bench/fanout_cpu.py's rounds: fresh NexLM processes (memory: one; redis: two on one
    redis-server) for each round, memory and redis alternating; the median round of each."""
    P = b.P
    args = argparse.Namespace(pairs=P["stores_fan_pairs"], n=P["stores_fan_tokens"], iv=20, profile=None)
    rounds: dict[str, list[dict]] = {"memory": [], "redis": []}
    for i in range(P["stores_fan_rounds"]):
        for kind in (("memory", "redis") if i % 2 == 0 else ("redis", "memory")):
            rounds[kind].append(fanout_cpu.one_round(b.tmp, kind, b.up_port, b.redis, args, b.nexlm_cpus, b.harness_cpus))
    out = {}
    for kind, rs in rounds.items():
        med = sorted(rs, key=lambda r: r["us_per_token"])[len(rs) // 2]
        out[kind] = {"nexlm_us_per_token": med["us_per_token"], "nexlm_us_per_token_by_instance": med["us_per_token_by_instance"],
                     "redis_us_per_token": med.get("redis_server_us_per_token"), "errors": sum(r["errors"] for r in rs),
                     "rounds": [r["us_per_token"] for r in rs]}
    return out


def run_one(b, kind: str) -> dict:
    P = b.P
    b.store_block = store_block(kind, b)
    b.put_out = b.tmp / f"puts-{kind}.json"
    b.restart_nexlm()
    s: dict = {"warmup_errors": []}
    for t in ("direct", "ws", "sse"):  # run.py's warm-up, with a pause between a reply's done and the next chat:
        # on redis the session's running lease is released just after done (redis_live), and a chat sent
        # at once can meet it still held (busy); that race is counted in B1's errors, not here
        r = b.lg_call({"cmd": "replies", "target": t, "concurrency": 2, "count": 5, "n": 20, "pause_ms": 20})
        s["warmup_errors"] += r["error_samples"]
    b.lg_call({"cmd": "cleanup"})
    puts(b, b.put_out)  # the warm-up's puts are not counted
    ttft = {"direct": [], "ws": []}
    errors = {"direct": 0, "ws": 0}
    for i in range(P["b1_rounds"]):
        for t in (("direct", "ws") if i % 2 == 0 else ("ws", "direct")):
            r = b.lg_call({"cmd": "replies", "target": t, "concurrency": 1, "count": P["b1_per_round"], "n": 5,
                           "raw_ttft": True, "pause_ms": 2, "reset_between": True})
            ttft[t] += r["ttft"]
            errors[t] += r["errors"]
            s.setdefault("b1_error_samples", []).extend(r["error_samples"])
    s["b1"] = {"errors": errors["ws"] + errors["direct"], "ws": _summ([x / 1e3 for x in ttft["ws"]]),
               "direct": _summ([x / 1e3 for x in ttft["direct"]]),
               "added_p50": quantile(ttft["ws"], .5) - quantile(ttft["direct"], .5),
               "added_p99": quantile(ttft["ws"], .99) - quantile(ttft["direct"], .99)}
    p = puts(b, b.put_out)
    s["commit_1"] = _summ(p["turn"]) | {"other": _summ(p["other"])}
    b.b5()
    s["b5"] = b.res["phases"].pop("B5")
    puts(b, b.put_out)
    steps = []
    for N in P["stores_b4"]:
        steps.append(b.paced_round("ws", N, P["b4_tokens"]))
    s["b4"] = steps
    p = puts(b, b.put_out)
    s["commit_n"] = _summ(p["turn"]) | {"other": _summ(p["other"]), "N": P["stores_b4"][-1]}
    second = None
    try:
        if kind == "redis":
            second, other = start_second(b, b.config_text())
        else:
            other = f"127.0.0.1:{b.nex_port}"
        # the last replies of the load generator: readable right away through a second connection/instance
        b.lg_call({"cmd": "cleanup"})
        b.lg_call({"cmd": "replies", "target": "ws", "concurrency": P["stores_readable"], "count": 1, "n": 5,
                   "stagger_ms": 200})
        s["readable"] = readable(b, "http://" + other, P["stores_readable"])
    finally:
        if second is not None:
            second.stop()
    b.lg_call({"cmd": "cleanup"})
    return s


def stores_phase(b) -> None:
    if not shutil.which("redis-server"):
        raise RuntimeError("--only STORES needs redis-server (apt-get install redis-server)")
    b.redis = None
    out = {}
    try:
        b.redis = tests_module("redis_servers").RedisServer(b.tmp / "redis")
        if b.harness_cpus:
            os.sched_setaffinity(b.redis.proc.pid, b.harness_cpus)
        for kind in STORES:
            b.log(f"STORES: {kind}")
            out[kind] = run_one(b, kind)
        b.log("STORES: fan-out rounds (fresh processes, memory and redis alternating)")
        for kind, res in fanout_rounds(b).items():
            out[kind]["fanout"] = res
    finally:
        b.store_block = ""
        b.put_out = None
        if b.redis is not None:
            b.redis.stop()
        b.redis = None
    b.res["phases"]["STORES"] = out


# ----------------------------------------------------------------- the report

def _f(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def stores_rows(ph) -> list[dict]:
    rows = []

    def row(id_, what, cells, target="—", result="figure", errors=0):
        rows.append({"id": id_, "what": what, **{k: cells.get(k, "—") for k in STORES}, "target": target,
                     "errors": errors, "result": result})

    st = {k: ph.get(k, {}) for k in STORES}
    row("S-B1", "added TTFT, 1 WS stream, 5 tokens (ws − direct, same run)",
        {k: f"p50 {v['b1']['added_p50']:+.3f}, p99 {v['b1']['added_p99']:+.3f} ms (n={v['b1']['ws']['n']})"
         for k, v in st.items() if v},
        errors="; ".join(f"{k} {v['b1']['errors']}" + (f" ({', '.join(sorted(set(v.get('b1_error_samples', [])))[:3])})"
                                                       if v["b1"]["errors"] else "") for k, v in st.items() if v))
    for rid, key, what in (("S-commit-1", "commit_1", "turn commit: store.put of a finished turn, one reply at a time"),
                           ("S-commit-N", "commit_n", "turn commit under load: the B4 round's finished turns")):
        row(rid, what, {k: (f"p50 {_f(v[key].get('p50'), 3)}, p99 {_f(v[key].get('p99'), 3)} ms (n={v[key]['n']})"
                            if v[key]["n"] else "no put per turn (the record is written when the conversation goes idle)")
                        for k, v in st.items() if v})
    row("S-readable", "finished turn readable right after done via a 2nd connection (redis: 2nd instance)",
        {k: f"{v['readable']['ok']}/{v['readable']['ok'] + v['readable']['bad']}" for k, v in st.items() if v},
        errors=sum(v["readable"]["bad"] for v in st.values() if v))

    def b5(v):
        s = v["b5"]["latency_ms"].get("ws_stop", {"n": 0})
        return f"p50 {_f(s.get('p50'))}, p99 {_f(s.get('p99'))} ms (n={s['n']}); orphans {v['b5']['orphans']}"
    row("S-B5", "stop latency: WS stop → upstream connection closed", {k: b5(v) for k, v in st.items() if v},
        errors="; ".join(f"{k} {v['b5']['errors']}" + (f" ({', '.join(v['b5']['error_samples'][:3])})"
                                                       if v["b5"]["errors"] else "") for k, v in st.items() if v))

    def b4(v):
        x = v["b4"][-1]
        w = x.get("stream_worst_gap") or {}
        return (f"N={x['N']}: worst gap/stream p50 {_f(w.get('p50'), 1)}, p99 {_f(w.get('p99'), 1)} ms; "
                f"streams > 40 ms {x['streams_with_stall']}; {(x.get('steady') or {}).get('nexlm_us_per_token', 'n/a')} µs/token")
    row("S-B4", "paced WS streams, 20 ms pacing (steady window)", {k: b4(v) for k, v in st.items() if v},
        errors=sum(x["errors"] for v in st.values() if v for x in v["b4"]))
    fm, fr = st["memory"].get("fanout"), st["redis"].get("fanout")
    ratio = (fr["nexlm_us_per_token"] / fm["nexlm_us_per_token"]) if fm and fr and fm["nexlm_us_per_token"] else None
    cells = {}
    if fm:
        cells["memory"] = f"{fm['nexlm_us_per_token']} µs/token (chat + listener on one instance)"
    if fr:
        split = fr.get("nexlm_us_per_token_by_instance") or []
        cells["redis"] = (f"{fr['nexlm_us_per_token']} µs/token (both instances; listener on the 2nd"
                          + (f": chat's {split[0]} + listener's {split[1]}" if len(split) == 2 else "") + ") = "
                          f"{_f(ratio)}× memory; redis-server {fr.get('redis_us_per_token')} µs/token")
    cells["sqlite"] = "not run (one instance only)"
    errs = (fm or {}).get("errors", 0) + (fr or {}).get("errors", 0)
    ok = ratio is not None and ratio <= FANOUT_MAX_RATIO and errs == 0
    row("S-fanout", "NexLM CPU per reply token, reply followed by a 2nd listener", cells,
        target=f"redis ≤ {FANOUT_MAX_RATIO}× memory", result="PASS" if ok else "FAIL", errors=errs)
    return rows


def render_stores(rows) -> str:
    lines = ["| id | what | memory | sqlite | redis | target | errors | result |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['what']} | {r['memory']} | {r['sqlite']} | {r['redis']} | {r['target']} | "
                     f"{r['errors']} | {r['result']} |")
    return "\n".join(lines)


STORES_BEGIN = "<!-- stores: begin (added by bench/run.py --only STORES) -->"
STORES_END = "<!-- stores: end -->"


def stores_section(res, P, machine, when, cmdline) -> str:
    ph = res["phases"].get("STORES", {})
    fan = {k: ph.get(k, {}).get("fanout") for k in ("memory", "redis")}
    detail = [f"- fan-out {k}: {json.dumps(v)}" for k, v in fan.items() if v]
    return "\n".join([
        STORES_BEGIN, "## Stores side by side: memory, sqlite, redis (issue 13)", "",
        f"Run {when}: `python bench/run.py {cmdline}` ({res['wall_s']:.0f} s). Each store on a fresh NexLM process "
        "(under bench/put_trace.py, which times every store.put); sqlite on a temp file; redis on a redis-server "
        "started by the run (`--save \"\" --appendonly no`, on the harness core), the fan-out's second instance on "
        "NexLM's core. `[chat] background_replies = false` for all three. Turn commit = a finished turn's "
        "`store.put`, call → write done (SQLite committed, Redis answered): with redis it is awaited before `done` "
        "goes out, with memory and sqlite it runs after `done`; per token nothing waits on the store (checkpoints "
        "are written by a ticker, Redis events by one pipeline task per instance). "
        f"Sizes: B1 {P['b1_rounds']}×{P['b1_per_round']} replies per target, B5 {P['b5_ops']} ops, "
        f"B4 N={P['stores_b4']} × {P['b4_tokens']} tokens, fan-out {P['stores_fan_pairs']} pairs × "
        f"{P['stores_fan_tokens']} tokens at 20 ms, {P['stores_fan_rounds']} rounds per store on fresh processes "
        "(bench/fanout_cpu.py's; the median round).", "",
        *machine, "",
        render_stores(stores_rows(ph)), "",
        *detail, STORES_END, ""])
