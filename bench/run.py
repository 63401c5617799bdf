"""NexLM benchmark suite: one command, B1-B7 of issue 6, measured against a direct connection.

    python bench/run.py            # full run (a few minutes on 2 cores)
    python bench/run.py --quick    # tiny numbers, under a minute (what the smoke test runs)

Three processes (plus a tiny probe), started here and stopped at the end:

* ``bench/fake_upstream.py`` -- the fast fake OpenAI-compatible upstream;
* NexLM -- ``python app.py --config <generated toml> --port <free>``;
* ``bench/loadgen.py serve`` -- the load generator (commands as JSON lines);
* ``bench/loadgen.py probe`` -- GET /healthz every 10 ms, for loop lag (B7).

With two or more cores, NexLM gets a core of its own (``taskset``) and the
harness (fake upstream, load generator, probe, this script) shares the other
one. In direct rounds NexLM is idle, so the harness gets exactly the same CPU
in direct and proxied rounds: ratios compare like with like. Direct and
proxied rounds are interleaved (their order rotates every round), and every
figure is a difference or a ratio against the direct connection of the same
run. Results go to bench/results.md (table, machine, details) and stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH, LIFTED_LIMITS, ROOT, Proc, cpu_seconds, free_port, http_json, machine_lines,  # noqa: E402
                    quantile, raise_nofile, rss_kb, system_busy)
from stores import STORES_ROW_IDS, render_stores, stores_phase, stores_rows, stores_section  # noqa: E402,F401

FULL = dict(
    b1_rounds=10, b1_per_round=50,
    b2_rounds=2, b2_conc=10, b2_tokens=150,
    b3_rounds=5, b3_single_tokens=10000, b3_multi_streams=64, b3_multi_tokens=1000,
    b4_ladder=[100, 200, 300, 400, 500, 600, 800, 1000], b4_target=500, b4_tokens=175,
    b4_stagger_ms=500, b4_window_ms=200,
    b5_ops=1000, b5_conc=20, b5_direct_ops=200,
    b6_idle=10000, b6_active=1000, b6_active_iv=100,
    idle_rounds=[0, 10000, 0, 10000], idle_streams=[200, 500], idle_tokens=200, idle_wait_s=45, idle_gc_off=0,
    v1_rounds=10, v1_per_round=50, v1_conc=64, v1_conc_rounds=3, v1_conc_count=5, v1_conc_tokens=20,
    v1_tput_rounds=5, v1_tput_single_tokens=10000, v1_tput_multi_tokens=1000,
    stores_b4=[200], stores_fan_pairs=50, stores_fan_tokens=400, stores_fan_rounds=3, stores_readable=20,
)
QUICK = dict(
    b1_rounds=2, b1_per_round=10,
    b2_rounds=1, b2_conc=3, b2_tokens=15,
    b3_rounds=1, b3_single_tokens=1000, b3_multi_streams=8, b3_multi_tokens=100,
    b4_ladder=[10, 20], b4_target=20, b4_tokens=40,
    b4_stagger_ms=50, b4_window_ms=100,
    b5_ops=30, b5_conc=5, b5_direct_ops=10,
    b6_idle=200, b6_active=40, b6_active_iv=100,
    idle_rounds=[0, 200], idle_streams=[10, 20], idle_tokens=40, idle_wait_s=0, idle_gc_off=0,
    v1_rounds=2, v1_per_round=10, v1_conc=8, v1_conc_rounds=1, v1_conc_count=2, v1_conc_tokens=10,
    v1_tput_rounds=1, v1_tput_single_tokens=1000, v1_tput_multi_tokens=100,
    stores_b4=[10], stores_fan_pairs=3, stores_fan_tokens=20, stores_fan_rounds=1, stores_readable=3,
)

# every row the table always has (the smoke test checks them)
ROW_IDS = ["B1-ws", "B1-sse", "B2-ws", "B2-sse", "B3-1-ws", "B3-1-sse", "B3-64-ws", "B3-64-sse",
           "B4", "B5-stop", "B5-orphans", "B6-idle", "B6-active", "B6-after", "B7",
           "B4-idle-200", "B4-idle-500", "B7-idle",
           "V1-ttft-1", "V1-ttft-64", "V1-tput-1", "V1-tput-64", "V1-nonstream"]
IDLE_ROW_IDS = ROW_IDS[-8:-5]  # phase IDLE (issue 11): its rows are named after the sizes of FULL
V1_ROW_IDS = ROW_IDS[-5:]  # phase V1 (issue 12): /v1/chat/completions vs the direct connection


# ----------------------------------------------------------------- small helpers

q = quantile


def median(vals):
    return q(vals, 0.5)


def fmt(x, unit="", nd=2):
    if x is None:
        return "n/a"
    return f"{x:.{nd}f}{unit}"


def sfmt(x, unit=" ms", nd=2):
    """Signed format, for differences."""
    if x is None:
        return "n/a"
    return f"{x:+.{nd}f}{unit}"


# ----------------------------------------------------------------- processes

class CPUSampler:
    """CPU seconds of one process, sampled every 50 ms in a thread, stamped with CLOCK_MONOTONIC
    (the clock the load generator uses), so CPU can be read over a window known only afterwards."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        import threading
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), cpu_seconds(self.pid)))
            self._stop.wait(every)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

    def cpu_between(self, t0: float, t1: float):
        s = self.samples
        a = [x for x in s if x[0] >= t0]
        b = [x for x in s if x[0] <= t1]
        if not a or not b or b[-1][0] <= a[0][0]:
            return None
        # scale the sampled interval to the window
        (ta, ca), (tb, cb) = a[0], b[-1]
        return (cb - ca) * (t1 - t0) / (tb - ta)


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.P = dict(QUICK if args.quick else FULL)
        for item in args.set or []:
            k, _, v = item.partition("=")
            if k not in self.P:
                raise SystemExit(f"--set: unknown parameter {k!r} (known: {', '.join(self.P)})")
            self.P[k] = [int(x) for x in v.split(",")] if isinstance(self.P[k], list) else type(self.P[k])(v)
        self.tmp = Path(tempfile.mkdtemp(prefix="nexlm-bench-"))
        self.procs: list[Proc] = []
        self.res: dict = {"phases": {}, "cpu": {}}
        self.notes: list[str] = []
        self.only = set(args.only.split(",")) if args.only else None
        cpus = sorted(os.sched_getaffinity(0))
        if args.pin and len(cpus) >= 2:
            self.harness_cpus = [cpus[0]]
            self.nexlm_cpus = [cpus[1]]
        else:
            self.harness_cpus = self.nexlm_cpus = None
        self.profiles: dict = {}

    def want(self, phase: str) -> bool:
        return self.only is None or phase in self.only

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # -- lifecycle
    def start(self) -> None:
        py = sys.executable
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        up_extra = [] if self.args.no_uvloop else ["--uvloop"]
        self.up = Proc("upstream", [py, str(BENCH / "fake_upstream.py"), "--port", "0", *up_extra],
                       self.tmp / "upstream.log", cpus=self.harness_cpus, pipes=True, env=env)
        self.procs.append(self.up)
        line = self.up.readline(20)
        assert line.startswith("READY"), line
        self.up_port = int(line.split()[1])
        self.up_url = f"http://127.0.0.1:{self.up_port}"

        self.nex_port = free_port()
        self.start_nexlm()

        lg_args = [py, str(BENCH / "loadgen.py"), "serve", "--upstream", f"127.0.0.1:{self.up_port}",
                   "--nexlm", f"127.0.0.1:{self.nex_port}"]
        if self.args.no_compress:
            lg_args.append("--no-compress")
        if self.args.no_uvloop:
            lg_args.append("--no-uvloop")
        self.lg = Proc("loadgen", lg_args, self.tmp / "loadgen.log", cpus=self.harness_cpus, pipes=True, env=env)
        self.procs.append(self.lg)
        hello = json.loads(self.lg.readline(20))
        self.res["loadgen_uvloop"] = hello.get("uvloop")
        self.probe = Proc("probe", [py, str(BENCH / "loadgen.py"), "probe", "--nexlm", f"127.0.0.1:{self.nex_port}",
                                    "--path", "/healthz", "--interval-ms", "10"] + (["--no-uvloop"] if self.args.no_uvloop else []),
                          self.tmp / "probe.log", cpus=self.harness_cpus, pipes=True, env=env)
        self.procs.append(self.probe)
        assert self.probe.readline(20) == "READY"

    def start_nexlm(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cfg = self.tmp / "bench.toml"
        cfg.write_text(self.config_text())
        self.nexlm_starts = getattr(self, "nexlm_starts", 0) + 1
        log = self.tmp / f"nexlm-{self.nexlm_starts}.log"
        self.nex_log = log
        app = Path(self.args.app).resolve()
        wrap = []
        self.gc_out = None
        if getattr(self, "put_out", None):  # the STORES phase: every store.put timed (bench/put_trace.py)
            wrap = [str(BENCH / "put_trace.py"), str(self.put_out)]
        if getattr(self, "gc_trace", False):  # the IDLE phase: count and time NexLM's GC collections
            self.gc_out = self.tmp / f"gc-{self.nexlm_starts}.json"
            wrap = [str(BENCH / "gc_trace.py"), str(self.gc_out)]
            if self.P["idle_gc_off"]:  # the control: NexLM's cyclic collector off (gc.disable())
                env["BENCH_GC_OFF"] = "1"
        self.nex = Proc("nexlm", [sys.executable, *wrap, str(app), "--config", str(cfg),
                                  "--port", str(self.nex_port)], log, cpus=self.nexlm_cpus, env=env, cwd=app.parent)
        self.procs.insert(1, self.nex)
        self.nex_url = f"http://127.0.0.1:{self.nex_port}"
        deadline = time.monotonic() + 30
        while True:
            if not self.nex.alive():
                raise RuntimeError(f"NexLM exited at start:\n{log.read_text()[-3000:]}")
            try:
                http_json(self.nex_url + "/healthz", timeout=1)
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise RuntimeError("NexLM did not answer /healthz within 30 s") from None
                time.sleep(0.1)

    def restart_nexlm(self) -> None:
        """A fresh NexLM process on the same port (memory figures need a heap that never grew)."""
        self.dead_cpu = getattr(self, "dead_cpu", 0.0) + cpu_seconds(self.nex.pid)
        self.nex_log_bytes = getattr(self, "nex_log_bytes", 0) + self.nex_log.stat().st_size
        self.nex.stop()
        self.procs.remove(self.nex)
        self.start_nexlm()

    def config_text(self) -> str:
        server = "[server]\nmax_connections_per_address = 0\n" + ("uvloop = false\n" if self.args.nexlm_asyncio else "")
        return f"""{server}[chat]
default_model = "fake/fake-model"
resume_grace_seconds = 0
max_sessions = 100000
{"background_replies = false" + chr(10) if getattr(self, "store_block", "") else ""}{LIFTED_LIMITS}[providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:{self.up_port}/v1"
models = ["fake-model"]
{getattr(self, "store_block", "")}"""

    def stop(self) -> None:
        for p in reversed(self.procs):
            try:
                if p.name in ("loadgen", "probe") and p.alive():
                    p.send("quit" if p.name == "probe" else json.dumps({"cmd": "quit"}))
                    p.p.wait(3)
            except Exception:  # noqa: BLE001
                pass
            p.stop()

    # -- measuring helpers
    def cpu_snap(self) -> dict:
        return {p.name: cpu_seconds(p.pid) for p in self.procs} | {"_t": time.monotonic(), "_busy": system_busy()}

    @staticmethod
    def cpu_delta(a: dict, b: dict) -> dict:
        """CPU % of each of our processes over the interval, and of everything else on the machine."""
        dt = b["_t"] - a["_t"]
        if dt <= 0:
            return {}
        out = {k: round(100 * (b[k] - a[k]) / dt) for k in a if not k.startswith("_") and k in b}
        ours = sum(b[k] - a[k] for k in a if not k.startswith("_") and k in b)
        out["others"] = max(0, round(100 * ((b["_busy"] - a["_busy"]) - ours) / dt))
        return out

    def lg_call(self, cmd: dict, timeout: float = 600) -> dict:
        a = self.cpu_snap()
        res = self.lg.call(cmd, timeout)
        b = self.cpu_snap()
        if res.get("ws_extensions") is not None:
            self.res["ws_extensions"] = res["ws_extensions"]
        res["cpu_pct"] = self.cpu_delta(a, b)
        res["cpu_s"] = {k: round(b[k] - a[k], 3) for k in a if not k.startswith("_") and k in b}
        if res.get("tokens"):
            res["cpu_us_per_token"] = {k: round(v * 1e6 / res["tokens"], 2) for k, v in res["cpu_s"].items()}
        return res

    def up_stats(self) -> dict:
        return http_json(self.up_url + "/stats")

    def nex_metrics(self, reset: bool = False):
        try:
            return http_json(self.nex_url + "/api/metrics" + ("?reset=1" if reset else ""))
        except Exception:  # noqa: BLE001
            return None

    def py_spy(self, name: str, seconds: float):
        if not self.args.profile or not shutil.which("py-spy"):
            if self.args.profile:
                self.notes.append("--profile: py-spy not found (pip install py-spy)")
            return None
        out = BENCH / "profiles"
        out.mkdir(exist_ok=True)
        argv = ["py-spy", "record", "-p", str(self.nex.pid), "-d", str(max(1, int(seconds))), "-r", "400", "--function",
                "--nonblocking", "-f", "raw", "-o", str(out / f"{name}.txt")]
        if self.harness_cpus:
            argv = ["taskset", "-c", ",".join(map(str, self.harness_cpus))] + argv
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), name

    def py_spy_done(self, handle) -> None:
        if handle is None:
            return
        proc, name = handle
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        path = BENCH / "profiles" / f"{name}.txt"
        if path.exists():
            self.profiles[name] = summarize_profile(path)

    # -- phases
    def warmup(self, record: bool = True) -> None:
        for t in ("direct", "ws", "sse"):
            r = self.lg_call({"cmd": "replies", "target": t, "concurrency": 2, "count": 5, "n": 20})
            if r["errors"]:
                raise RuntimeError(f"warm-up over {t} failed: {r['error_samples']}")
        self.lg_call({"cmd": "cleanup"})
        time.sleep(0.5)
        if record:
            self.res["rss_baseline_kb"] = rss_kb(self.nex.pid)

    @staticmethod
    def order(i: int) -> list[str]:
        t = ["direct", "ws", "sse"]
        return t[i % 3:] + t[:i % 3]

    def b1(self) -> None:
        P = self.P
        ttft = {"direct": [], "ws": [], "sse": []}
        errors = {"direct": 0, "ws": 0, "sse": 0}
        prof = self.py_spy("b1_all_rounds", 6)
        for i in range(P["b1_rounds"]):
            for t in self.order(i):
                r = self.lg_call({"cmd": "replies", "target": t, "concurrency": 1, "count": P["b1_per_round"],
                                  "n": 5, "raw_ttft": True, "pause_ms": 2})
                ttft[t] += r["ttft"]
                errors[t] += r["errors"]
        self.py_spy_done(prof)
        self.res["phases"]["B1"] = {"ttft_ms": {t: summ(v) for t, v in ttft.items()}, "errors": errors,
                                    "added": {t: {"p50": q(ttft[t], .5) - q(ttft["direct"], .5),
                                                  "p99": q(ttft[t], .99) - q(ttft["direct"], .99)}
                                              for t in ("ws", "sse")}}

    def b2(self) -> None:
        P = self.P
        gaps = {"direct": [], "ws": [], "sse": []}
        errors = {"direct": 0, "ws": 0, "sse": 0}
        cpu = {}
        for i in range(P["b2_rounds"]):
            for t in self.order(i):
                r = self.lg_call({"cmd": "replies", "target": t, "concurrency": P["b2_conc"], "count": 1,
                                  "n": P["b2_tokens"], "iv": 20, "record": True, "raw_gaps": True,
                                  "stagger_ms": 20})
                gaps[t] += r["gaps"]
                errors[t] += r["errors"]
                cpu[t] = r["cpu_pct"]
        self.res["phases"]["B2"] = {"gap_ms": {t: summ(v) for t, v in gaps.items()}, "errors": errors,
                                    "added": {t: {"p50": q(gaps[t], .5) - q(gaps["direct"], .5),
                                                  "p99": q(gaps[t], .99) - q(gaps["direct"], .99)}
                                              for t in ("ws", "sse")}, "cpu_pct": cpu}

    def b3(self) -> None:
        P = self.P
        out = {}
        for label, conc, n in (("1", 1, P["b3_single_tokens"]), ("64", P["b3_multi_streams"], P["b3_multi_tokens"])):
            tps = {"direct": [], "ws": [], "sse": []}
            ratios = {"ws": [], "sse": []}
            errors = {"direct": 0, "ws": 0, "sse": 0}
            cpu = {}
            cpt = {}
            prof = self.py_spy(f"b3_{label}_all_rounds", 3 * P["b3_rounds"]) if label == "64" else None
            for i in range(P["b3_rounds"]):
                round_tps = {}
                for t in self.order(i):
                    r = self.lg_call({"cmd": "replies", "target": t, "concurrency": conc, "count": 1, "n": n,
                                      "stagger_ms": 0})
                    round_tps[t] = r.get("tokens_per_s", 0.0) if not r["errors"] else 0.0
                    tps[t].append(round_tps[t])
                    errors[t] += r["errors"]
                    cpu.setdefault(t, []).append(r["cpu_pct"])
                    cpt.setdefault(t, []).append(r.get("cpu_us_per_token", {}))
                for t in ("ws", "sse"):
                    if round_tps["direct"]:
                        ratios[t].append(round_tps[t] / round_tps["direct"])
            self.py_spy_done(prof)
            out[label] = {"streams": conc, "tokens_per_stream": n,
                          "tokens_per_s": {t: median(v) for t, v in tps.items()},
                          "ratio": {t: median(v) for t, v in ratios.items()},
                          "ratios_all": ratios, "errors": errors,
                          "cpu_pct_last": {t: v[-1] for t, v in cpu.items()},
                          "cpu_us_per_token": {t: {k: median([x.get(k, 0) for x in v]) for k in v[0]}
                                               for t, v in cpt.items() if v and v[0]}}
        self.res["phases"]["B3"] = out

    def v1(self) -> None:
        """Issue 12: ``/v1/chat/completions`` against the direct connection, rounds interleaved.

        * TTFT at concurrency 1: sequential 5-token replies, as B1 (request written -> first token parsed);
        * TTFT at ``v1_conc`` concurrent streams: each worker runs ``v1_conc_count`` 20 ms-paced replies
          in a row, starts spread over one reply's length, so every start meets the others mid-stream;
        * unpaced tokens/s, 1 stream and ``v1_conc`` streams, the ratio taken per round as in B3;
        * non-streaming: sequential 5-token answers, request written -> whole body parsed."""
        P = self.P
        for t in ("v1", "v1_ns"):
            r = self.lg_call({"cmd": "replies", "target": t, "concurrency": 2, "count": 5, "n": 20})
            if r["errors"]:
                raise RuntimeError(f"V1 warm-up over {t} (POST /v1/chat/completions) failed: {r['error_samples']}")
        out: dict = {}

        cpu: dict = {}  # NexLM's CPU µs per token in the /v1 rounds, by measurement

        def rounds(name, pair, n_rounds, cmd, key):
            vals = {t: [] for t in pair}
            errors = dict.fromkeys(pair, 0)
            for i in range(n_rounds):
                for t in (pair if i % 2 == 0 else pair[::-1]):
                    r = self.lg_call({"cmd": "replies", "target": t, **cmd})
                    vals[t] += r[key] if key == "ttft" else [r.get(key, 0.0) if not r["errors"] else 0.0]
                    errors[t] += r["errors"]
                    if t == pair[1] and "nexlm" in r.get("cpu_us_per_token", {}):
                        cpu.setdefault(name, []).append(r["cpu_us_per_token"]["nexlm"])
            return vals, errors

        def added(vals, errors, pair):
            d, v = pair
            return {"ms": {t: summ(x) for t, x in vals.items()}, "errors": errors,
                    "added": {"p50": q(vals[v], .5) - q(vals[d], .5), "p99": q(vals[v], .99) - q(vals[d], .99)}}

        pair = ("direct", "v1")
        vals, errors = rounds("ttft_1", pair, P["v1_rounds"], {"concurrency": 1, "count": P["v1_per_round"], "n": 5,
                                                               "raw_ttft": True, "pause_ms": 2}, "ttft")
        out["ttft_1"] = added(vals, errors, pair)
        iv, n = 20, P["v1_conc_tokens"]
        vals, errors = rounds("ttft_conc", pair, P["v1_conc_rounds"],
                              {"concurrency": P["v1_conc"], "count": P["v1_conc_count"], "n": n, "iv": iv,
                               "stagger_ms": n * iv, "raw_ttft": True}, "ttft")
        out["ttft_conc"] = added(vals, errors, pair) | {"streams": P["v1_conc"]}
        for label, conc, n in (("1", 1, P["v1_tput_single_tokens"]), ("conc", P["v1_conc"], P["v1_tput_multi_tokens"])):
            tps, errors = rounds(f"tput_{label}", pair, P["v1_tput_rounds"], {"concurrency": conc, "count": 1, "n": n},
                                 "tokens_per_s")
            ratios = [v / d for d, v in zip(tps["direct"], tps["v1"]) if d]
            out[f"tput_{label}"] = {"streams": conc, "tokens_per_stream": n, "errors": errors,
                                    "tokens_per_s": {t: median(x) for t, x in tps.items()},
                                    "ratio": median(ratios), "ratios_all": ratios}
        pair = ("direct_ns", "v1_ns")
        vals, errors = rounds("nonstream", pair, P["v1_rounds"], {"concurrency": 1, "count": P["v1_per_round"], "n": 5,
                                                                  "raw_ttft": True, "pause_ms": 2}, "ttft")
        out["nonstream"] = added(vals, errors, pair)
        for key in out:
            out[key]["nexlm_us_per_token"] = median(cpu.get(key, []))
        self.res["phases"]["V1"] = out

    def b4(self) -> None:
        """Ladder of concurrent 20 ms-paced streams; the probe samples /healthz during each round."""
        P = self.P
        steps = []
        passed_max = 0
        ladder = list(P["b4_ladder"])
        failed = False
        for N in ladder:
            if failed and N > P["b4_target"]:
                break
            if failed and N != P["b4_target"]:
                continue
            step = self.b4_step(N)
            if not step["ws"]["ok"]:
                self.log(f"B4 N={N}: failed once (direct ok={step['direct']['ok']}); retrying the step")
                first = step
                step = self.b4_step(N)
                step["first_attempt"] = {t: {k: first[t][k] for k in ("ok", "stalls_over_40ms", "errors", "gap_window")}
                                         for t in ("direct", "ws")}
            step["pass"] = step["ws"]["ok"]
            steps.append(step)
            self.log(f"B4 N={N}: direct ok={step['direct']['ok']} ws ok={step['ws']['ok']} "
                     f"(max gap {fmt((step['ws']['gap_window'] or {}).get('max'))} ms, "
                     f"stalls {step['ws']['stalls_over_40ms']}, nexlm cpu {step['ws']['cpu_pct'].get('nexlm')}%)")
            if step["pass"] and not failed:
                passed_max = N
            else:
                failed = True
        self.res["phases"]["B4"] = {"steps": steps, "max_pass": passed_max, "ladder": ladder}

    def b4_step(self, N: int) -> dict:
        P = self.P
        step = {"N": N}
        for t in ("direct", "ws"):
            cmd = {"cmd": "replies", "target": t, "concurrency": N, "count": 1, "n": P["b4_tokens"], "iv": 20,
                   "record": True, "stagger_ms": P["b4_stagger_ms"], "window_ms": P["b4_window_ms"],
                   "timeout": 60 + P["b4_tokens"] * 0.1}
            self.probe.send("start")
            self.probe.readline(10)
            m0 = self.nex_metrics(reset=True) if t == "ws" else None
            prof = self.py_spy(f"b4_{N}", P["b4_tokens"] * 0.02) if (t == "ws" and N == P["b4_target"]) else None
            sampler = CPUSampler(self.nex.pid)
            r = self.lg_call(cmd, timeout=300)
            sampler.stop()
            self.py_spy_done(prof)
            steady = None
            if r.get("window_t") and r.get("window_s", 0) > 0.2:
                t_a, t_b = r["window_t"]
                c = sampler.cpu_between(t_a, t_b)
                if c is not None:
                    steady = {"nexlm_cpu_pct": round(100 * c / (t_b - t_a)),
                              "nexlm_us_per_token": round(c * 1e6 / max(1, r["window_frames"]), 1),
                              "tokens_per_s": round(r["window_frames"] / (t_b - t_a))}
            self.probe.send("stop")
            pr = json.loads(self.probe.readline(30))
            m1 = self.nex_metrics() if t == "ws" else None
            up = self.up_stats()
            ok = (r["errors"] == 0 and r.get("stalls_over_40ms", 1) == 0 and r.get("window_s", 0) > 0
                  and r.get("streams_started", 0) == N)
            step[t] = {"ok": ok, "errors": r["errors"], "error_samples": r["error_samples"],
                       "window_s": r.get("window_s"), "gap_window": r.get("gap_window"),
                       "stalls_over_40ms": r.get("stalls_over_40ms"),
                       "streams_with_stall": r.get("streams_with_stall"),
                       "streams_started": r.get("streams_started"), "cpu_pct": r["cpu_pct"],
                       "loadgen_lag": r.get("loadgen_lag"), "probe_rtt": pr["rtt"], "probe_errors": pr["errors"],
                       "upstream_lag": up.get("loop_lag_ms"), "cpu_us_per_token": r.get("cpu_us_per_token"),
                       "tokens": r.get("tokens"), "steady": steady,
                       "nexlm_metrics_before": m0, "nexlm_metrics_after": m1}
        return step

    def b5(self) -> None:
        P = self.P
        since = self.up_stats()["total_requests"]  # not used for filtering; records are filtered by tag
        http_json(self.up_url + "/reset", "POST")
        a = self.cpu_snap()
        r = self.lg.call({"cmd": "stops", "ops": P["b5_ops"], "concurrency": P["b5_conc"], "iv": 20}, timeout=600)
        d = self.lg.call({"cmd": "direct_stops", "ops": P["b5_direct_ops"], "concurrency": 10, "iv": 20})
        cpu = self.cpu_delta(a, self.cpu_snap())
        time.sleep(1.5)  # resume_grace_seconds = 0: anything still open now is an orphan
        stats = self.up_stats()
        recs = {rec[1]: rec for rec in http_json(self.up_url + "/records?since=0")["records"]}
        by_kind: dict = {}
        never = {}
        errors = []
        for op in r["ops"] + d["ops"]:
            k = op["kind"]
            if op.get("error") or (k in ("ws_stop", "sse_stop") and op.get("finish") != "stopped"):
                errors.append(f"{k}: {op.get('error') or 'finish=' + str(op.get('finish'))}")
            rec = recs.get(op["tag"])
            if rec is None:
                never[k] = never.get(k, 0) + 1
                continue
            if rec[5] and not rec[6] and "t_action" in op:
                by_kind.setdefault(k, []).append((rec[5] - op["t_action"]) * 1e3)
        self.res["phases"]["B5"] = {
            "latency_ms": {k: summ(v) for k, v in by_kind.items()},
            "never_reached_upstream": never, "ops": len(r["ops"]), "direct_ops": len(d["ops"]),
            "errors": len(errors), "error_samples": sorted(set(errors))[:8],
            "orphans": stats["active_streams"], "orphan_tags": stats.get("active_tags", [])[:10],
            "upstream_open_connections": stats["open_connections"], "cpu_pct": cpu,
            "negative_latency": sum(1 for v in by_kind.values() for x in v if x < 0),
            "ignored_since": since}

    def memory_load(self) -> None:
        """The main process gets the B6 load too (10k idle sockets, then active streams), twice, so that
        'after load' follows every kind of load, and a second identical load tells a leak (RSS keeps
        growing) from a high-water mark (it does not). Per-connection figures come from fresh processes."""
        P = self.P
        pid = self.nex.pid
        out = self.res["phases"].setdefault("B6", {})
        for k in (1, 2):
            r = self.lg_call({"cmd": "idle_open", "n": P["b6_idle"], "parallel": 64}, timeout=600)
            out[f"main_idle_{k}_kb"] = rss_kb(pid)
            out[f"main_idle_open_{k}"] = {x: r[x] for x in ("opened", "errors", "seconds")}
            self.lg_call({"cmd": "idle_close"})
            r = self.lg_call({"cmd": "active_start", "n": P["b6_active"], "iv": P["b6_active_iv"]}, timeout=600)
            time.sleep(1.0)
            out[f"main_active_{k}_kb"] = rss_kb(pid)
            out[f"main_active_start_{k}"] = {x: r[x] for x in ("streaming", "connect_errors")}
            self.lg_call({"cmd": "active_stop"})
            self.lg_call({"cmd": "cleanup"}, timeout=600)
            time.sleep(2.0)
            out[f"main_after_pass_{k}_kb"] = rss_kb(pid)

    def after(self) -> None:
        time.sleep(2.0)
        pid = self.nex.pid
        out = self.res["phases"].setdefault("B6", {})
        out["baseline_kb"] = self.res.get("rss_baseline_kb")
        out["after_load_kb"] = rss_kb(pid)
        out["after_metrics"] = self.nex_metrics()
        out["cleanup"] = self.lg_call({"cmd": "cleanup"}, timeout=600)
        time.sleep(3.0)
        out["after_cleanup_kb"] = rss_kb(pid)
        out["after_cleanup_metrics"] = self.nex_metrics()
        out["orphans_at_end"] = self.up_stats()["active_streams"]

    def b6_idle(self) -> None:
        """Fresh NexLM: baseline, then 10k idle WebSockets."""
        P = self.P
        out = self.res["phases"].setdefault("B6", {})
        self.restart_nexlm()
        self.warmup(record=False)
        pid = self.nex.pid
        time.sleep(0.5)
        out["pre_idle_kb"] = rss_kb(pid)
        r = self.lg_call({"cmd": "idle_open", "n": P["b6_idle"], "parallel": 64}, timeout=600)
        time.sleep(1.0)
        out["idle_kb"] = rss_kb(pid)
        out["idle_open"] = r
        out["idle_metrics"] = self.nex_metrics()
        out["per_idle_kb"] = (out["idle_kb"] - out["pre_idle_kb"]) / max(1, r["opened"])
        self.lg_call({"cmd": "idle_close"})

    def b6_active(self) -> None:
        """Fresh NexLM: baseline, N sockets, then a long paced reply on each."""
        P = self.P
        out = self.res["phases"].setdefault("B6", {})
        self.restart_nexlm()
        self.warmup(record=False)
        pid = self.nex.pid
        time.sleep(0.5)
        out["pre_active_kb"] = rss_kb(pid)
        http_json(self.up_url + "/reset", "POST")
        r = self.lg_call({"cmd": "active_start", "n": P["b6_active"], "iv": P["b6_active_iv"], "rss_pid": pid},
                         timeout=600)
        out["active_sockets_kb"] = r.pop("rss_sockets_kb", None)
        time.sleep(2.0)
        out["active_kb"] = rss_kb(pid)
        out["active_start"] = r
        out["active_upstream"] = self.up_stats()
        out["active_metrics"] = self.nex_metrics()
        out["per_active_kb"] = (out["active_kb"] - out["pre_active_kb"]) / max(1, r["streaming"])
        if out["active_sockets_kb"]:
            out["per_active_marginal_kb"] = (out["active_kb"] - out["active_sockets_kb"]) / max(1, r["streaming"])
        out["active_stop"] = self.lg_call({"cmd": "active_stop"})

    def gc_snapshot(self):
        """NexLM's GC figures from bench/gc_trace.py (None when it does not run under it)."""
        if not self.gc_out:
            return None
        req = Path(str(self.gc_out) + ".req")
        try:
            old = self.gc_out.stat().st_mtime_ns
        except OSError:
            old = 0
        req.touch()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                if self.gc_out.stat().st_mtime_ns != old and not req.exists():
                    return json.loads(self.gc_out.read_text())
            except (OSError, ValueError):
                pass
        return None

    @staticmethod
    def gc_delta(a, b):
        if not a or not b:
            return None
        return {g: {"n": b["gen"][g]["n"] - a["gen"][g]["n"],
                    "total_ms": round(b["gen"][g]["total_ms"] - a["gen"][g]["total_ms"], 2),
                    "max_ms_so_far": b["gen"][g]["max_ms"]} for g in b["gen"]}

    def idle_sessions(self) -> None:
        """Issue 11: paced WS streams (20 ms, idle_tokens each) at every N of idle_streams, and the loop
        lag at the largest N, with 0 or with 10,000 idle sessions stored (``POST /api/sessions`` from the
        load generator), rounds alternating as in idle_rounds. Every round is a fresh NexLM process (the
        same heap history for both variants), started under bench/gc_trace.py to count its collections."""
        P = self.P
        rounds = []
        self.gc_trace = True
        try:
            for i, idle in enumerate(P["idle_rounds"]):
                self.lg_call({"cmd": "cleanup"})
                self.restart_nexlm()
                self.warmup(record=False)
                rd = {"idle": idle, "round": i + 1}
                if idle:
                    r = self.lg_call({"cmd": "store_sessions", "n": idle, "parallel": 32}, timeout=300)
                    rd["store"] = {k: r[k] for k in ("created", "statuses", "seconds")}
                    rd["store"]["nexlm_cpu_s"] = r["cpu_s"].get("nexlm")
                # Before issue 11's fix POST /api/sessions left each conversation live until the next
                # housekeeping pass (every 30 s here); now it is a record at once and this wait is 0 s.
                # Kept, so that the phase measures older commits the same way.
                t_w = time.monotonic()
                while True:
                    m = self.nex_metrics() or {}
                    if (m.get("sessions_live") or 0) <= 5 or time.monotonic() - t_w > P["idle_wait_s"]:
                        break
                    time.sleep(1.0)
                rd["waited_s"] = round(time.monotonic() - t_w, 1)
                rd["metrics_before"] = {k: m.get(k) for k in ("sessions", "sessions_live", "websockets")}
                time.sleep(0.5)
                rd["rss_before_kb"] = rss_kb(self.nex.pid)
                rd["gc_before"] = self.gc_snapshot()
                steps = {}
                for N in P["idle_streams"]:
                    g0 = self.gc_snapshot()
                    st = self.paced_round("ws", N, P["idle_tokens"])
                    st["gc"] = self.gc_delta(g0, self.gc_snapshot())
                    st["rss_kb"] = rss_kb(self.nex.pid)
                    steps[N] = st
                    self.lg_call({"cmd": "cleanup"})
                    w = st["stream_worst_gap"] or {}
                    self.log(f"IDLE round {i + 1} ({idle} idle) N={N}: worst gap per stream p50 "
                             f"{fmt(w.get('p50'))} p99 {fmt(w.get('p99'))} ms, streams > 40 ms "
                             f"{st['streams_with_stall']}/{N}, /healthz p99 {fmt(st['probe_rtt'].get('p99'))} ms, "
                             f"gen2 collections {((st['gc'] or {}).get('2') or {}).get('n')}")
                if i == 0:  # the harness alone, once: can it pace the largest N itself?
                    rd["direct"] = self.paced_round("direct", max(P["idle_streams"]), P["idle_tokens"])
                rd["steps"] = steps
                rd["metrics_after"] = {k: (self.nex_metrics() or {}).get(k) for k in ("sessions", "sessions_live")}
                rd["gc_after"] = self.gc_snapshot()
                rounds.append(rd)
        finally:
            self.gc_trace = False
        self.res["phases"]["IDLE"] = {"rounds": rounds}

    def paced_round(self, target: str, N: int, tokens: int) -> dict:
        """One B4-style round (20 ms pacing) with the /healthz probe and NexLM's own loop lag."""
        P = self.P
        cmd = {"cmd": "replies", "target": target, "concurrency": N, "count": 1, "n": tokens, "iv": 20,
               "record": True, "stagger_ms": P["b4_stagger_ms"], "window_ms": P["b4_window_ms"],
               "timeout": 60 + tokens * 0.1}
        self.probe.send("start")
        self.probe.readline(10)
        self.nex_metrics(reset=True)
        sampler = CPUSampler(self.nex.pid)
        r = self.lg_call(cmd, timeout=300)
        sampler.stop()
        self.probe.send("stop")
        pr = json.loads(self.probe.readline(30))
        m1 = self.nex_metrics() or {}
        steady = None
        if r.get("window_t") and r.get("window_s", 0) > 0.2:
            t_a, t_b = r["window_t"]
            c = sampler.cpu_between(t_a, t_b)
            if c is not None:
                steady = {"nexlm_cpu_pct": round(100 * c / (t_b - t_a)),
                          "nexlm_us_per_token": round(c * 1e6 / max(1, r["window_frames"]), 1)}
        return {"N": N, "errors": r["errors"], "error_samples": r["error_samples"],
                "window_s": r.get("window_s"), "gap_window": r.get("gap_window"),
                "stream_worst_gap": r.get("stream_worst_gap"), "streams_with_stall": r.get("streams_with_stall"),
                "streams_started": r.get("streams_started"), "cpu_pct": r["cpu_pct"], "steady": steady,
                "loadgen_lag": r.get("loadgen_lag"), "probe_rtt": pr["rtt"], "probe_errors": pr["errors"],
                "nexlm_loop_lag": m1.get("loop_lag_ms")}

    def stores(self) -> None:
        """Issue 13: NexLM with each store in turn (bench/stores.py)."""
        stores_phase(self)

    def wait_quiet(self) -> None:
        """Wait (up to --wait-quiet seconds) until the rest of the machine uses < 0.3 core over 5 s."""
        limit = self.args.wait_quiet
        if not limit:
            return
        t_end = time.monotonic() + limit
        while True:
            b0, t0 = system_busy(), time.monotonic()
            time.sleep(5)
            load = (system_busy() - b0) / (time.monotonic() - t0)
            if load < 0.3:
                self.log(f"machine quiet enough ({load:.2f} cores busy)")
                return
            if time.monotonic() > t_end:
                self.log(f"machine still busy ({load:.2f} cores used by others); measuring anyway")
                self.notes.append(f"started while other processes used {load:.2f} cores")
                return
            self.log(f"waiting for a quieter machine ({load:.2f} cores busy)")

    def run(self) -> int:
        raise_nofile()
        if self.args.nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, self.args.nice)  # inherited by every process started here
                self.res["nice"] = self.args.nice
            except OSError as exc:
                self.res["nice"] = f"not set ({exc.strerror})"
        self.wait_quiet()
        t0 = time.monotonic()
        busy0 = system_busy()
        self.res["loadavg_before"] = os.getloadavg()
        self.start()
        self.log(f"fake upstream :{self.up_port} (pid {self.up.pid}), NexLM :{self.nex_port} (pid {self.nex.pid}), "
                 f"loadgen pid {self.lg.pid}; harness cpus {self.harness_cpus}, NexLM cpus {self.nexlm_cpus}")
        self.warmup()
        plan = [("B1", self.b1), ("B2", self.b2), ("B3", self.b3), ("V1", self.v1), ("B5", self.b5), ("B4", self.b4),
                ("B6", self.memory_load), ("after", self.after), ("B6", self.b6_idle), ("B6", self.b6_active),
                ("IDLE", self.idle_sessions), ("STORES", self.stores)]
        for name, fn in plan:
            if name == "STORES" and not (self.only and "STORES" in self.only):
                continue  # issue 13's phase runs only when named: it needs redis-server and restarts NexLM 3 times
            if name == "after" or self.want(name) or (name == "B4" and self.want("B7")):
                t = time.monotonic()
                self.log(f"{name} {fn.__name__} ...")
                fn()
                sec = self.res.setdefault("seconds", {})
                sec[fn.__name__] = round(time.monotonic() - t, 1)
                if not self.nex.alive():
                    raise RuntimeError(f"NexLM died during {name}; see {self.nex_log}")
        ours = sum(cpu_seconds(p.pid) for p in self.procs) + getattr(self, "dead_cpu", 0.0)
        self.res["wall_s"] = time.monotonic() - t0
        self.res["other_cpu_s"] = max(0.0, system_busy() - busy0 - ours)
        self.res["our_cpu_s"] = ours
        self.res["nexlm_log_bytes"] = getattr(self, "nex_log_bytes", 0) + self.nex_log.stat().st_size
        self.res["profiles"] = self.profiles
        self.res["notes"] = self.notes
        return 0


def summ(vals):
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "p50": q(vals, .5), "p90": q(vals, .9), "p99": q(vals, .99), "max": max(vals),
            "mean": sum(vals) / len(vals)}


IDLE_LEAVES = ("select (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py",
               "poll (", "epoll")


def summarize_profile(path: Path, top: int = 25) -> dict:
    """py-spy raw (collapsed) stacks -> the functions with most self and inclusive samples.

    Stacks whose leaf is a wait (epoll, an idle executor thread) are counted as idle and left out;
    percentages are of the busy samples."""
    self_c: dict = {}
    incl: dict = {}
    total = 0
    idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        try:
            n = int(n)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        total += n
        if not frames or any(x in frames[-1] for x in IDLE_LEAVES):
            idle += n
            continue
        leaf = frames[-1]
        self_c[leaf] = self_c.get(leaf, 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    busy = max(1, total - idle)
    return {"samples": total, "idle_samples": idle,
            "self": [(f, round(100 * c / busy, 1)) for f, c in sorted(self_c.items(), key=lambda x: -x[1])[:top]],
            "inclusive": [(f, round(100 * c / busy, 1)) for f, c in sorted(incl.items(), key=lambda x: -x[1])[:top * 2]]}


# ----------------------------------------------------------------- the report

def verdict(ok) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def build_rows(res: dict, P: dict) -> list[dict]:
    ph = res["phases"]
    rows = []

    def row(id_, what, target, measured, direct, errors, ok):
        rows.append({"id": id_, "what": what, "target": target, "measured": measured, "direct": direct,
                     "errors": errors, "result": verdict(ok)})

    b1 = ph.get("B1")
    for t in ("ws", "sse"):
        if b1:
            a = b1["added"][t]
            d = b1["ttft_ms"]["direct"]
            m = b1["ttft_ms"][t]
            row(f"B1-{t}", f"added TTFT, 1 stream, {t.upper()}", "p50 ≤ 0.5 ms, p99 ≤ 2 ms",
                f"p50 {sfmt(a['p50'])}, p99 {sfmt(a['p99'])} (proxied p50 {fmt(m.get('p50'))}, p99 {fmt(m.get('p99'))} ms; n={m['n']})",
                f"p50 {fmt(d.get('p50'), nd=3)}, p99 {fmt(d.get('p99'), nd=3)} ms",
                b1["errors"][t], b1["errors"][t] == 0 and a["p50"] <= 0.5 and a["p99"] <= 2.0)
        else:
            row(f"B1-{t}", f"added TTFT, 1 stream, {t.upper()}", "p50 ≤ 0.5 ms, p99 ≤ 2 ms", "not run", "", "", None)
    b2 = ph.get("B2")
    for t in ("ws", "sse"):
        if b2:
            a = b2["added"][t]
            g = b2["gap_ms"][t]
            d = b2["gap_ms"]["direct"]
            row(f"B2-{t}", f"added inter-token gap, 20 ms pacing, {P['b2_conc']} streams, {t.upper()}", "p99 ≤ 1 ms",
                f"p99 {sfmt(a['p99'])} (gap p50 {fmt(g.get('p50'))}, p99 {fmt(g.get('p99'))}, max {fmt(g.get('max'))} ms; n={g['n']})",
                f"gap p50 {fmt(d.get('p50'))}, p99 {fmt(d.get('p99'))} ms", b2["errors"][t],
                b2["errors"][t] == 0 and a["p99"] <= 1.0)
        else:
            row(f"B2-{t}", f"added inter-token gap, 20 ms pacing, {t.upper()}", "p99 ≤ 1 ms", "not run", "", "", None)
    b3 = ph.get("B3")
    for label in ("1", "64"):
        for t in ("ws", "sse"):
            rid = f"B3-{label}-{t}"
            if b3:
                x = b3[label]
                r = x["ratio"][t]
                row(rid, f"unpaced tokens/s relayed ÷ direct, {x['streams']} stream{'s' if x['streams'] > 1 else ''}, {t.upper()}",
                    "≥ 0.90", f"{fmt(r)} ({x['tokens_per_s'][t]:,.0f} tok/s; rounds {', '.join(fmt(v) for v in x['ratios_all'][t])})",
                    f"{x['tokens_per_s']['direct']:,.0f} tok/s", x["errors"][t],
                    x["errors"][t] == 0 and r is not None and r >= 0.90)
            else:
                row(rid, "unpaced tokens/s relayed ÷ direct", "≥ 0.90", "not run", "", "", None)
    b4 = ph.get("B4")
    if b4:
        steps = b4["steps"]
        last_ok_direct = max((s["N"] for s in steps if s["direct"]["ok"]), default=0)
        passed = b4["max_pass"]
        tested = ", ".join(f"{s['N']}{'✓' if s['pass'] else '✗'}" for s in steps)
        fail_step = next((s for s in steps if not s["pass"]), None)
        detail = ""
        if fail_step:
            w = fail_step["ws"]
            detail = (f"; at {fail_step['N']}: max gap {fmt((w['gap_window'] or {}).get('max'), nd=1)} ms, "
                      f"{w['stalls_over_40ms']} gaps > 40 ms in {w['streams_with_stall']} streams, errors {w['errors']}")
        top = max(s["N"] for s in steps)
        measured = f"{passed} (tried {tested}){detail}"
        if passed == top:
            measured = f"≥ {passed} (ladder top; tried {tested})"
        row("B4", "concurrent WS streams at 20 ms pacing, no gap > 40 ms", f"≥ {FULL['b4_target']}",
            measured, f"direct held every N up to {last_ok_direct}",
            sum(s["ws"]["errors"] for s in steps), passed >= FULL["b4_target"])
    else:
        row("B4", "concurrent WS streams at 20 ms pacing, no gap > 40 ms", "≥ 500", "not run", "", "", None)
    b5 = ph.get("B5")
    if b5:
        lat = b5["latency_ms"]
        s = lat.get("ws_stop", {"n": 0})
        dref = lat.get("direct_close", {"n": 0})
        other = "; ".join(f"{k} p50 {fmt(v.get('p50'))} p99 {fmt(v.get('p99'))} (n={v['n']})"
                          for k, v in sorted(lat.items()) if k not in ("ws_stop", "direct_close"))
        row("B5-stop", "stop latency: WS stop sent → upstream connection closed",
            "p99 ≤ 5 ms", f"p50 {fmt(s.get('p50'))}, p99 {fmt(s.get('p99'))} ms (n={s['n']}); {other}",
            f"client closes upstream itself: p50 {fmt(dref.get('p50'))}, p99 {fmt(dref.get('p99'))} ms",
            b5["errors"], s["n"] > 0 and s["p99"] <= 5.0 and b5["errors"] == 0)
        row("B5-orphans", f"orphaned upstream streams after {b5['ops']} random stops/disconnects", "0",
            f"{b5['orphans']} (still streaming 1.5 s after the last op; never reached upstream: "
            f"{sum(b5['never_reached_upstream'].get(k, 0) for k in b5['never_reached_upstream'] if k != 'direct_close')})",
            "", b5["errors"], b5["orphans"] == 0)
    else:
        row("B5-stop", "stop latency", "p99 ≤ 5 ms", "not run", "", "", None)
        row("B5-orphans", "orphaned upstream connections", "0", "not run", "", "", None)
    b6 = ph.get("B6", {})
    if "per_idle_kb" in b6:
        io = b6["idle_open"]
        row("B6-idle", f"RSS growth per idle WebSocket, {io['opened']:,} open (fresh process)", "≤ 20 KB",
            f"{fmt(b6['per_idle_kb'], ' KB', 1)} ({b6['pre_idle_kb'] / 1024:.1f} → {b6['idle_kb'] / 1024:.1f} MB)",
            "", io["errors"], io["errors"] == 0 and io["opened"] == P["b6_idle"] and b6["per_idle_kb"] <= 20)
    else:
        row("B6-idle", "RSS growth per idle WebSocket", "≤ 20 KB", "not run", "", "", None)
    if "per_active_kb" in b6:
        a = b6["active_start"]
        marg = b6.get("per_active_marginal_kb")
        row("B6-active", f"RSS growth per active stream (socket included), {a['streaming']:,} streaming "
            f"({P['b6_active_iv']} ms pacing, fresh process)",
            "≤ 64 KB", f"{fmt(b6['per_active_kb'], ' KB', 1)} ({b6['pre_active_kb'] / 1024:.1f} → {b6['active_kb'] / 1024:.1f} MB"
            + (f"; the reply alone, over an idle socket: {fmt(marg, ' KB', 1)}" if marg is not None else "") + ")",
            "", a["connect_errors"] + a["not_streaming"],
            a["streaming"] == P["b6_active"] and b6["per_active_kb"] <= 64)
    else:
        row("B6-active", "RSS growth per active stream", "≤ 64 KB", "not run", "", "", None)
    if "after_cleanup_kb" in b6 and b6.get("baseline_kb"):
        base = b6["baseline_kb"]
        aft = b6["after_cleanup_kb"]
        row("B6-after", "RSS after load (sessions deleted) vs baseline", "within 10%",
            f"{(aft / base - 1) * 100:+.1f}% ({base / 1024:.1f} → {aft / 1024:.1f} MB; "
            f"a second identical load ended at {b6.get('main_after_pass_2_kb', 0) / 1024:.1f} MB after the first's "
            f"{b6.get('main_after_pass_1_kb', 0) / 1024:.1f} MB: "
            f"{'a high-water mark, not a leak' if b6.get('main_after_pass_2_kb', 0) <= b6.get('main_after_pass_1_kb', 0) * 1.03 else 'still growing: a leak?'})",
            "", sum(v for k, v in b6["cleanup"]["statuses"].items() if k not in ("200", "404")),
            aft <= base * 1.10)
    else:
        row("B6-after", "RSS after load vs baseline", "within 10%", "not run", "", "", None)
    if b4:
        steps = b4["steps"]
        st = next((s for s in steps if s["N"] == P["b4_target"]), steps[-1])
        w = st["ws"]
        idle_p50 = st["direct"]["probe_rtt"].get("p50")
        p99 = w["probe_rtt"].get("p99")
        lag = (p99 - idle_p50) if (p99 is not None and idle_p50 is not None) else None
        self_lag = (w.get("nexlm_metrics_after") or {}).get("loop_lag_ms") or {}
        row("B7", f"event-loop lag during B4 load ({st['N']} streams)", "p99 ≤ 10 ms",
            f"p99 {fmt(lag)} ms (/healthz RTT p99 {fmt(p99)} − idle p50 {fmt(idle_p50)}; n={w['probe_rtt'].get('n', 0)}); "
            f"NexLM's own /api/metrics: p99 {self_lag.get('p99', 'n/a')} ms, max {self_lag.get('max', 'n/a')} ms",
            f"/healthz RTT with NexLM idle, same harness load: p99 {fmt(st['direct']['probe_rtt'].get('p99'))} ms",
            w["probe_errors"], lag is not None and lag <= 10)
    else:
        row("B7", "event-loop lag during B4 load", "p99 ≤ 10 ms", "not run", "", "", None)
    idle_rows(ph.get("IDLE"), P, row)
    v1_rows(ph.get("V1"), row)
    return rows


def v1_rows(v1, row) -> None:
    """Issue 12's Speed targets for ``/v1/chat/completions``, each against the direct connection."""
    specs = [("V1-ttft-1", "added TTFT, 1 stream, /v1 streaming", "p50 ≤ 0.5 ms, p99 ≤ 2 ms"),
             ("V1-ttft-64", "added TTFT, 64 concurrent 20 ms-paced streams, /v1 streaming", "p99 ≤ 5 ms"),
             ("V1-tput-1", "unpaced tokens/s /v1 ÷ direct, 1 stream", "≥ 0.90"),
             ("V1-tput-64", "unpaced tokens/s /v1 ÷ direct, 64 streams", "≥ 0.90"),
             ("V1-nonstream", "added latency, non-streaming /v1, 5 tokens, 1 client", "p50 ≤ 1 ms")]
    if not v1:
        for rid, what, target in specs:
            row(rid, what, target, "not run", "", "", None)
        return

    def ttft(rid, what, target, x, v, d, p50_max, p99_max):
        a, m, dm = x["added"], x["ms"][v], x["ms"][d]
        ok = x["errors"][v] == 0 and (p50_max is None or a["p50"] <= p50_max) and a["p99"] <= p99_max
        row(rid, what, target,
            f"p50 {sfmt(a['p50'])}, p99 {sfmt(a['p99'])} (/v1 p50 {fmt(m.get('p50'))}, p99 {fmt(m.get('p99'))} ms; n={m['n']})",
            f"p50 {fmt(dm.get('p50'), nd=3)}, p99 {fmt(dm.get('p99'), nd=3)} ms", x["errors"][v], ok)

    (r1, w1, t1), (r64, w64, t64), (rt1, wt1, tt1), (rt64, wt64, tt64), (rns, wns, tns) = specs
    c = v1["ttft_conc"]["streams"]
    ttft(r1, w1, t1, v1["ttft_1"], "v1", "direct", 0.5, 2.0)
    ttft(r64, w64.replace("64", str(c)), t64, v1["ttft_conc"], "v1", "direct", None, 5.0)
    for rid, what, target, x in ((rt1, wt1, tt1, v1["tput_1"]), (rt64, wt64.replace("64", str(c)), tt64, v1["tput_conc"])):
        r = x["ratio"]
        row(rid, what, target,
            f"{fmt(r)} ({x['tokens_per_s']['v1']:,.0f} tok/s; rounds {', '.join(fmt(v) for v in x['ratios_all'])})",
            f"{x['tokens_per_s']['direct']:,.0f} tok/s", x["errors"]["v1"],
            x["errors"]["v1"] == 0 and r is not None and r >= 0.90)
    x = v1["nonstream"]
    a, m, dm = x["added"], x["ms"]["v1_ns"], x["ms"]["direct_ns"]
    row(rns, wns, tns, f"p50 {sfmt(a['p50'])}, p99 {sfmt(a['p99'])} (/v1 p50 {fmt(m.get('p50'))} ms; n={m['n']})",
        f"p50 {fmt(dm.get('p50'), nd=3)}, p99 {fmt(dm.get('p99'), nd=3)} ms", x["errors"]["v1_ns"],
        x["errors"]["v1_ns"] == 0 and a["p50"] <= 1.0)


def _by_variant(rounds, N, key):
    """{idle count: [value of key(step at N) per round, in round order]}"""
    out: dict = {}
    for rd in rounds:
        st = rd["steps"].get(N) or rd["steps"].get(str(N))
        if st is not None:
            out.setdefault(rd["idle"], []).append(key(st))
    return out


def idle_rows(ph, P, row) -> None:
    """Issue 11: 10,000 idle sessions stored must not change paced-stream smoothness or loop lag.
    A variant with idle sessions passes when its worst round is no worse than the 0-idle rounds'
    worst, with a margin for run-to-run noise (streams over 40 ms: 2% of N; worst-gap p50: 3 ms;
    loop-lag p99 of the /healthz probe: 2 ms)."""
    if not ph:
        for rid in IDLE_ROW_IDS:
            row(rid, "idle sessions stored vs none", "no change", "not run", "", "", None)
        return
    rounds = ph["rounds"]
    sizes = list(P["idle_streams"])
    loaded = max(P["idle_rounds"])

    def cell(vals):
        return ", ".join(vals)

    for rid, N in zip(IDLE_ROW_IDS[:2], sizes):
        stalls = _by_variant(rounds, N, lambda st: st["streams_with_stall"] or 0)
        p50 = _by_variant(rounds, N, lambda st: (st["stream_worst_gap"] or {}).get("p50"))
        p99 = _by_variant(rounds, N, lambda st: (st["stream_worst_gap"] or {}).get("p99"))
        errs = sum(st["errors"] for rd in rounds for k, st in rd["steps"].items() if int(k) == N)
        gen2 = _by_variant(rounds, N, lambda st: ((st.get("gc") or {}).get("2") or {}).get("n"))
        gen1 = _by_variant(rounds, N, lambda st: ((st.get("gc") or {}).get("1") or {}).get("total_ms"))

        def describe(v):
            return (f"worst gap per stream p50 {cell(fmt(x, nd=1) for x in p50.get(v, []))}, "
                    f"p99 {cell(fmt(x, nd=1) for x in p99.get(v, []))} ms; streams > 40 ms "
                    f"{cell(str(x) for x in stalls.get(v, []))} of {N}; gen1 GC ms in the round "
                    f"{cell(str(x) for x in gen1.get(v, []))}; full GCs {cell(str(x) for x in gen2.get(v, []))}")
        ok = None
        if 0 in stalls and loaded in stalls:
            ok = (max(stalls[loaded]) <= max(stalls[0]) + 0.02 * N
                  and max(x or 0 for x in p50[loaded]) <= max(x or 0 for x in p50[0]) + 3.0 and errs == 0)
        row(rid, f"{N} paced WS streams ({P['idle_tokens']} tokens, 20 ms) with {loaded:,} idle sessions stored "
            "vs none (per round, alternating)",
            "no change (streams > 40 ms ≤ 0-idle + 2% of N; worst-gap p50 ≤ 0-idle + 3 ms)",
            f"{loaded:,} idle: {describe(loaded)}", f"0 idle: {describe(0)}", errs, ok)
    N = max(sizes)
    rtt99 = _by_variant(rounds, N, lambda st: st["probe_rtt"].get("p99"))
    rtt50 = _by_variant(rounds, N, lambda st: st["probe_rtt"].get("p50"))
    own99 = _by_variant(rounds, N, lambda st: (st.get("nexlm_loop_lag") or {}).get("p99"))
    own50 = _by_variant(rounds, N, lambda st: (st.get("nexlm_loop_lag") or {}).get("p50"))
    perr = sum(st["probe_errors"] for rd in rounds for k, st in rd["steps"].items() if int(k) == N)

    def lag(v):
        return (f"/healthz RTT p50 {cell(fmt(x) for x in rtt50.get(v, []))}, p99 {cell(fmt(x) for x in rtt99.get(v, []))} ms; "
                f"NexLM's own loop lag p50 {cell(str(x) for x in own50.get(v, []))}, p99 {cell(str(x) for x in own99.get(v, []))} ms")
    ok = None
    if 0 in rtt99 and loaded in rtt99:
        ok = max(x or 1e9 for x in rtt99[loaded]) <= max(x or 0 for x in rtt99[0]) + 2.0 and perr == 0
    row(IDLE_ROW_IDS[2], f"event-loop lag during {N} paced streams, {loaded:,} idle sessions stored vs none",
        "no change (/healthz p99 ≤ 0-idle + 2 ms)", f"{loaded:,} idle: {lag(loaded)}", f"0 idle: {lag(0)}", perr, ok)


def idle_details(ph, P) -> list[str]:
    out = ["| round | idle sessions stored | N | worst gap per stream p50 / p99 / max | streams > 40 ms | "
           "all gaps p50 / p99 | /healthz RTT p50 / p99 | NexLM loop lag p50 / p99 / max (own) | "
           "NexLM CPU % (steady) | µs/token | GC collections gen0/gen1/gen2 (gen1 / gen2 ms) | NexLM RSS MB | "
           "CPU % of other processes (round) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rd in ph["rounds"]:
        items = [(str(k), v) for k, v in rd["steps"].items()]
        if rd.get("direct"):
            items.append(("direct", rd["direct"]))
        for k, st in items:
            w = st["stream_worst_gap"] or {}
            g = st["gap_window"] or {}
            ll = st.get("nexlm_loop_lag") or {}
            gc_ = st.get("gc") or {}
            gcs = "/".join(str((gc_.get(x) or {}).get("n", "")) for x in ("0", "1", "2"))
            gcs += f" ({(gc_.get('1') or {}).get('total_ms', '')} / {(gc_.get('2') or {}).get('total_ms', '')})" if gc_ else ""
            sd = st.get("steady") or {}
            label = f"{st['N']}" + (" (direct, harness only)" if k == "direct" else "")
            out.append(f"| {rd['round']} | {rd['idle']:,} | {label} | {fmt(w.get('p50'), nd=1)} / {fmt(w.get('p99'), nd=1)} / "
                       f"{fmt(w.get('max'), nd=1)} | {st['streams_with_stall']} of {st['streams_started']} | "
                       f"{fmt(g.get('p50'))} / {fmt(g.get('p99'))} | {fmt(st['probe_rtt'].get('p50'))} / "
                       f"{fmt(st['probe_rtt'].get('p99'))} | "
                       + (f"{ll.get('p50')} / {ll.get('p99')} / {ll.get('max')} | " if k != "direct" else " | ")
                       + f"{sd.get('nexlm_cpu_pct', '') if k != 'direct' else ''} | "
                       f"{sd.get('nexlm_us_per_token', '') if k != 'direct' else ''} | "
                       f"{gcs if k != 'direct' else ''} | {fmt(st['rss_kb'] / 1024, nd=1) if st.get('rss_kb') else ''} | "
                       f"{st['cpu_pct'].get('others', '')} |")
    out.append("")
    for rd in ph["rounds"]:
        gb = rd.get("gc_before") or {}
        out.append(f"- round {rd['round']} ({rd['idle']:,} idle): stored {json.dumps(rd.get('store'))}; waited "
                   f"{rd['waited_s']} s for them to become records; before the streams: metrics "
                   f"{json.dumps(rd['metrics_before'])}, RSS {rd['rss_before_kb'] / 1024:.1f} MB, GC-tracked objects "
                   f"{gb.get('tracked_objects', 'n/a')}, thresholds {gb.get('thresholds', 'n/a')}; after: "
                   f"{json.dumps(rd['metrics_after'])}, GC-tracked objects "
                   f"{(rd.get('gc_after') or {}).get('tracked_objects', 'n/a')}, collections so far (gen0/1/2) "
                   + "/".join(str(((rd.get('gc_after') or {}).get('gen') or {}).get(g, {}).get('n', '?')) for g in "012"))
    return out


def machine_info(args, res) -> list[str]:
    return [
        *machine_lines(),
        f"- server measured: `{os.path.relpath(args.app, ROOT)}`; its event loop: "
        f"{'asyncio (--nexlm-asyncio)' if args.nexlm_asyncio else 'uvloop (its default when installed)'}; "
        f"harness (fake upstream, loadgen, probe): {'uvloop' if res.get('loadgen_uvloop') else 'asyncio'}",
        f"- pinning: {res.get('pinning')}; priority of every process of the run: nice {res.get('nice', 0)}",
        f"- WebSocket client offered permessage-deflate: {'no' if args.no_compress else 'yes (like a browser)'}; "
        f"server accepted: {res.get('ws_extensions') or 'no'}",
        f"- load average before the run: {', '.join(f'{x:.2f}' for x in res.get('loadavg_before', ()))}; "
        f"CPU used by other processes during the run: {res.get('other_cpu_s', 0):.1f} core-s "
        f"(ours: {res.get('our_cpu_s', 0):.1f} core-s over {res.get('wall_s', 0):.0f} s)",
    ]


def render(rows, res, args, P) -> str:
    lines = ["| id | what | target | measured (proxy − direct, or ratio) | direct, same run | errors | result |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {r['what']} | {r['target']} | {r['measured']} | {r['direct']} | "
                     f"{r['errors']} | {r['result']} |")
    return "\n".join(lines)


def cost_summary(res) -> list[str]:
    """CPU time per relayed token: much less sensitive to other load on the machine than rates are."""
    ph = res["phases"]
    out = []
    if "B3" in ph:
        for x in ph["B3"].values():
            c = x.get("cpu_us_per_token") or {}
            out.append(f"- unpaced, {x['streams']} stream(s): NexLM {c.get('ws', {}).get('nexlm', 'n/a')} µs/token over WS, "
                       f"{c.get('sse', {}).get('nexlm', 'n/a')} over SSE; the load generator reading the upstream directly: "
                       f"{c.get('direct', {}).get('loadgen', 'n/a')} µs/token")
    if "B4" in ph:
        costs = [(s["N"], s["ws"]["steady"]["nexlm_us_per_token"]) for s in ph["B4"]["steps"]
                 if s["ws"].get("steady") and s["ws"]["steady"].get("nexlm_us_per_token")]
        if costs:
            best = min(c for _, c in costs)
            out.append("- 20 ms pacing, steady window: NexLM " + ", ".join(f"{c} µs/token at N={n}" for n, c in costs)
                       + f". At {best} µs/token one core relays {1e6 / best:,.0f} tokens/s, i.e. about "
                       f"{0.8e6 / best / 50:,.0f} streams at 20 ms pacing with the core 80% busy.")
    return out


def details(res, P) -> str:
    ph = res["phases"]
    out = []
    cost = cost_summary(res)
    if cost:
        out.append("### CPU cost per token (robust to other load on the machine)")
        out += cost
        out.append("")
    if "B3" in ph:
        out.append("### B3 throughput (median of rounds)")
        for x in ph["B3"].values():
            out.append(f"- {x['streams']} stream(s) × {x['tokens_per_stream']} tokens: "
                       + ", ".join(f"{t} {v:,.0f} tok/s" for t, v in x["tokens_per_s"].items())
                       + f"; CPU % in the last round: {json.dumps(x['cpu_pct_last'])}"
                       + f"; CPU µs per token (median): {json.dumps(x.get('cpu_us_per_token'))}")
    if "B4" in ph:
        out.append("\n### B4 ladder (20 ms pacing; gaps in the steady window where every stream runs)")
        out.append("| N | target | ok | window s | gap p50 | gap p99 | gap max | gaps > 40 ms | streams started | "
                   "CPU % upstream/loadgen/nexlm/others (whole round) | NexLM CPU µs/token (steady window) | /healthz RTT p50/p99 | NexLM loop lag p99/max (own) |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in ph["B4"]["steps"]:
            for t in ("direct", "ws"):
                w = s[t]
                g = w["gap_window"] or {}
                c = w["cpu_pct"]
                ll = (w.get("nexlm_metrics_after") or {}).get("loop_lag_ms") or {}
                out.append(f"| {s['N']} | {t} | {'yes' if w['ok'] else 'no'} | {fmt(w['window_s'], nd=1)} | "
                           f"{fmt(g.get('p50'))} | {fmt(g.get('p99'))} | {fmt(g.get('max'))} | {w['stalls_over_40ms']} | "
                           f"{w['streams_started']} | {c.get('upstream')}/{c.get('loadgen')}/{c.get('nexlm')}/{c.get('others')} | "
                           f"{(w.get('steady') or {}).get('nexlm_us_per_token', '') if t == 'ws' else ''} | "
                           f"{fmt(w['probe_rtt'].get('p50'))}/{fmt(w['probe_rtt'].get('p99'))} | "
                           f"{ll.get('p99', '')}/{ll.get('max', '')} |")
    if "B5" in ph:
        b = ph["B5"]
        out.append("\n### B5 stops and disconnects")
        for k, v in sorted(b["latency_ms"].items()):
            out.append(f"- {k}: action → upstream connection closed p50 {fmt(v.get('p50'))}, p99 {fmt(v.get('p99'))}, "
                       f"max {fmt(v.get('max'))} ms (n={v['n']})")
        out.append(f"- ops that never reached the upstream (stopped before NexLM connected): {b['never_reached_upstream']}")
        out.append(f"- errors: {b['errors']} {b['error_samples']}; orphans: {b['orphans']} {b['orphan_tags']}")
    if "B6" in ph:
        b = ph["B6"]
        keys = ["baseline_kb", "main_idle_1_kb", "main_active_1_kb", "main_after_pass_1_kb", "main_idle_2_kb",
                "main_active_2_kb", "main_after_pass_2_kb", "after_load_kb", "after_cleanup_kb",
                "pre_idle_kb", "idle_kb", "pre_active_kb", "active_sockets_kb", "active_kb"]
        out.append("\n### B6 RSS of the NexLM process (MB)")
        out.append("main process: baseline (after warm-up); after B1-B5: 10k idle sockets, then active streams, then "
                   "sessions deleted -- twice (pass 1, pass 2: if pass 2 ends where pass 1 did, the growth is a "
                   "high-water mark, not a leak); after load; after deleting sessions. Fresh process 2: pre_idle, idle. "
                   "Fresh process 3: pre_active, active_sockets (sockets open, no reply yet), active.")
        out.append("- " + ", ".join(f"{k[:-3]} {b[k] / 1024:.1f}" for k in keys if k in b))
        if "idle_open" in b:
            out.append(f"- 10k idle: opened {b['idle_open']['opened']} in {b['idle_open']['seconds']:.1f} s, "
                       f"errors {b['idle_open']['errors']} {b['idle_open']['error_samples']}")
        if "active_start" in b:
            out.append(f"- active: {json.dumps(b['active_start'])}; upstream active streams "
                       f"{b['active_upstream'].get('active_streams')}; NexLM metrics: {json.dumps(b.get('active_metrics'))}")
        if "cleanup" in b:
            out.append(f"- cleanup: {json.dumps(b['cleanup'])}; NexLM metrics after: {json.dumps(b.get('after_cleanup_metrics'))}")
    if "B2" in ph:
        out.append("\n### B1/B2 raw quantiles (ms)")
        for name in ("B1", "B2"):
            if name in ph:
                key = "ttft_ms" if name == "B1" else "gap_ms"
                for t, v in ph[name][key].items():
                    out.append(f"- {name} {t}: " + ", ".join(f"{k} {fmt(x, nd=3) if k != 'n' else x}"
                                                           for k, x in v.items()))
    if "V1" in ph:
        out.append("\n### V1: /v1/chat/completions vs direct (issue 12)")
        out += v1_details(ph["V1"])
    if "IDLE" in ph:
        out.append("\n### Idle sessions stored (issue 11): every round a fresh NexLM, under bench/gc_trace.py")
        out += idle_details(ph["IDLE"], P)
    out.append(f"\nPhase seconds: {json.dumps(res.get('seconds'))}; NexLM log: {res.get('nexlm_log_bytes', 0):,} bytes")
    if res.get("notes"):
        out.append("\nNotes from this run: " + "; ".join(res["notes"]))
    return "\n".join(out)


def v1_details(v1) -> list[str]:
    out = []
    for key, what in (("ttft_1", "TTFT, 1 stream"), ("ttft_conc", f"TTFT, {v1['ttft_conc']['streams']} streams"),
                      ("nonstream", "non-streaming answer, 1 client")):
        for t, v in v1[key]["ms"].items():
            out.append(f"- {what}, {t}: " + ", ".join(f"{k} {fmt(x, nd=3) if k != 'n' else x}" for k, x in v.items())
                       + " ms")
    for key in ("tput_1", "tput_conc"):
        x = v1[key]
        out.append(f"- unpaced, {x['streams']} stream(s) × {x['tokens_per_stream']} tokens: "
                   + ", ".join(f"{t} {v:,.0f} tok/s" for t, v in x["tokens_per_s"].items()))
    out.append("- NexLM CPU µs per relayed token, unpaced (median of rounds): "
               + ", ".join(f"{v1[k]['streams']} stream(s) {v1[k].get('nexlm_us_per_token', 'n/a')}"
                           for k in ("tput_1", "tput_conc")))
    return out


V1_BEGIN = "<!-- v1: begin (added by bench/run.py --only V1) -->"
V1_END = "<!-- v1: end -->"


def v1_section(rows, res, args, when, cmdline) -> str:
    ids = set(V1_ROW_IDS)
    return "\n".join([
        V1_BEGIN,
        "## OpenAI-compatible /v1/chat/completions (issue 12)", "",
        f"Run {when}: `python bench/run.py {cmdline}` ({res['wall_s']:.0f} s). Direct and /v1 rounds interleaved "
        "against the same fake upstream, in the same run.", "",
        *machine_info(args, res), "",
        render([r for r in rows if r["id"] in ids], res, args, None), "",
        *(v1_details(res["phases"]["V1"]) if "V1" in res["phases"] else []),
        V1_END, ""])


IDLE_BEGIN = "<!-- idle-sessions: begin (added by bench/run.py --only IDLE) -->"
IDLE_END = "<!-- idle-sessions: end -->"


def idle_section(rows, res, args, P, when, cmdline) -> str:
    ids = set(IDLE_ROW_IDS)
    return "\n".join([
        IDLE_BEGIN,
        "## Idle sessions stored (issue 11)", "",
        f"Run {when}: `python bench/run.py {cmdline}` ({res['wall_s']:.0f} s). Rounds alternate "
        f"{', '.join(f'{x:,}' for x in P['idle_rounds'])} idle sessions (stored with `POST /api/sessions` by the load "
        "generator, then given the 30 s housekeeping pass that turns them into records); each round is a fresh "
        "NexLM process on its own core, under bench/gc_trace.py (GC collections counted and timed)"
        + ("; **control: NexLM's automatic garbage collection off** (`--set idle_gc_off=1`, `gc.disable()`)."
           if P.get("idle_gc_off") else "."), "",
        *machine_info(args, res), "",
        render([r for r in rows if r["id"] in ids], res, args, P), "",
        *(idle_details(res["phases"]["IDLE"], P) if "IDLE" in res["phases"] else []),
        IDLE_END, ""])


def merge_section(text: str, section: str) -> str:
    """Each ``--only IDLE`` run adds its own dated section after the report (a full run rewrites it all)."""
    return text.rstrip("\n") + "\n\n" + section


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="NexLM benchmark suite (issue 6)")
    ap.add_argument("--quick", action="store_true", help="tiny numbers: checks the suite end to end (< 1 min)")
    ap.add_argument("--out", default=str(BENCH / "results.md"), help="where to write the report")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temporary directory (config, logs)")
    ap.add_argument("--json", default=None, help="also write every raw figure as JSON here")
    ap.add_argument("--only", default=None, help="comma-separated phases to run: B1,B2,B3,B4,B5,B6 (B7 rides on B4), IDLE "
                         "(issue 11), V1 (issue 12), STORES (issue 13: memory/sqlite/redis side by side; only when named); "
                         "IDLE, V1 or STORES alone adds a dated section to --out and leaves the rest")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to cores")
    ap.add_argument("--nexlm-asyncio", action="store_true", help="run NexLM with [server] uvloop = false")
    ap.add_argument("--no-uvloop", action="store_true", help="harness without uvloop")
    ap.add_argument("--no-compress", action="store_true", help="WS client does not offer permessage-deflate")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a size, e.g. --set b4_ladder=200,400 --set b3_rounds=3 (see FULL in run.py)")
    ap.add_argument("--nice", type=int, default=-10,
                    help="scheduling priority for every process of the run (default -10, if allowed): shields the "
                         "measurement from other load on a shared machine; direct and proxied alike. 0: leave it")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="first wait up to this long for other processes to leave the CPUs alone")
    ap.add_argument("--app", default=str(ROOT / "app.py"),
                    help="the server to measure (default: this checkout's app.py); e.g. another checkout's "
                         "app.py to A/B a change, or bench/bare_relay.py for the bare-aiohttp floor")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy record NexLM during B3 (64 streams) and B4 (target N) into bench/profiles/")
    args = ap.parse_args(argv)
    if not Path(args.app).exists():
        print(f"bench: {args.app} not found; nothing to measure", file=sys.stderr)
        return 2
    b = Bench(args)
    b.res["pinning"] = (f"harness on CPU {b.harness_cpus}, NexLM on CPU {b.nexlm_cpus} (taskset)"
                        if b.harness_cpus else "none")
    ok = False
    try:
        b.run()
        ok = True
    finally:
        b.stop()
        if ok and not args.keep_logs:
            shutil.rmtree(b.tmp, ignore_errors=True)
        else:
            print(f"bench: logs and config kept in {b.tmp}", file=sys.stderr)
    res = b.res
    rows = build_rows(res, b.P)
    title = f"# NexLM benchmark results{' (--quick: tiny numbers, not meaningful)' if args.quick else ''}"
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = "\n".join([
        title, "",
        f"Run {when}: `python bench/run.py{' ' + ' '.join(argv if argv is not None else sys.argv[1:]) if (argv if argv is not None else sys.argv[1:]) else ''}` "
        f"({res['wall_s']:.0f} s). Every figure is against the direct connection to the same fake upstream, "
        "measured in the same run with direct and proxied rounds interleaved.", "",
        *machine_info(args, res), "",
        render(rows, res, args, b.P), "",
        "## Details", "", details(res, b.P), "",
    ])
    text += ("\n## Notes\n\n- B7 during embedded-model generation is measured by `bench/llamacpp_lag.py`, not by this run.\n"
             "- NexLM's own loop-lag figure (`/api/metrics`) covers its last ~6000 samples (about a minute), not just "
             "the B4 round; the /healthz probe is the round's own figure.\n"
             "- See bench/README.md for the method and the caveats.\n")
    if args.quick:
        text += "- --quick: the sizes are tiny; the figures only show that every part ran.\n"
    if b.profiles:
        text += "\n## Profiles (py-spy, NexLM process; % of non-idle samples)\n"
        for name, p in b.profiles.items():
            text += f"\n### {name} ({p['samples']} samples, {p['idle_samples']} idle)\nself:\n"
            text += "\n".join(f"- {pct}% {f}" for f, pct in p["self"][:15]) + "\n"
            text += "inclusive (outermost frames left out):\n"
            text += "\n".join(f"- {pct}% {f}" for f, pct in p["inclusive"] if pct < 95)[:3000] + "\n"
    cmdline = " ".join(argv if argv is not None else sys.argv[1:])
    if b.only == {"IDLE"} and Path(args.out).exists():
        # the IDLE phase alone: a section of its own is added, the rest of the report stays
        text = merge_section(Path(args.out).read_text(), idle_section(rows, res, args, b.P, when, cmdline))
    elif b.only == {"V1"} and Path(args.out).exists():  # the same for V1 (issue 12)
        text = merge_section(Path(args.out).read_text(), v1_section(rows, res, args, when, cmdline))
    elif b.only == {"STORES"}:  # the same for STORES (issue 13); its own table, with a column per store
        section = stores_section(res, b.P, machine_info(args, res), when, cmdline)
        text = merge_section(Path(args.out).read_text() if Path(args.out).exists() else title + "\n", section)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "res": res}, indent=1, default=str))
    print(render(rows, res, args, b.P))
    if "STORES" in res["phases"]:
        print("\n" + render_stores(stores_rows(res["phases"]["STORES"])))
    print(f"\nwritten to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
