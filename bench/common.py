"""What the bench scripts share: child processes, the file-descriptor limit, uvloop, /proc figures
(CPU, RSS, fds), free ports, a tiny HTTP JSON client, quantiles and the machine's description.

The scripts are run as ``python bench/X.py``, which puts bench/ first on ``sys.path``; each also
inserts it itself, so that a test loading a script by path (``tests/test_bench_smoke.py``) works too.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TESTS = ROOT / "tests"
CLK_TCK = os.sysconf("SC_CLK_TCK")
now = time.monotonic  # CLOCK_MONOTONIC: comparable across the processes of a run

# NexLM's per-client limits, lifted: every bench client comes from 127.0.0.1 (run.py and soak.py configs)
LIFTED_LIMITS = """[limits]
messages_per_minute = 1000000
max_replies_per_client = 1000000
max_replies_total = 1000000
max_sessions_per_client = 1000000
sessions_per_minute = 0
max_frame_bytes = 1048576
"""


# ----------------------------------------------------------------- this process

def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def use_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- /proc

def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def system_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all cores)."""
    with open("/proc/stat") as f:
        vals = list(map(int, f.readline().split()[1:]))
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / CLK_TCK


def proc_status(pid: int, keys=("VmRSS", "VmHWM", "RssAnon", "Threads")) -> dict:
    """Numeric fields of /proc/PID/status (sizes in kB)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def rss_kb(pid: int) -> int:
    return proc_status(pid, ("VmRSS",)).get("VmRSS", 0)


def proc_fds(pid: int) -> dict:
    """Open file descriptors of a process, by kind (socket, pipe, anon, file)."""
    kinds: collections.Counter = collections.Counter()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {"total": -1}
    for n in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        if target.startswith("socket:"):
            kinds["socket"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("anon_inode:"):
            kinds["anon"] += 1
        else:
            kinds["file"] += 1
    return {"total": sum(kinds.values()), **kinds}


# ----------------------------------------------------------------- HTTP, numbers

def http_json(url: str, method: str = "GET", timeout: float = 10.0):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def quantile(vals, p):
    """Quantile by linear interpolation between the nearest ranks (the list need not be sorted)."""
    if not vals:
        return None
    s = sorted(vals)
    if len(s) == 1:
        return s[0]
    pos = p * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary_ms(vals):
    """Durations in seconds -> n, p50, p90, p99, p999, max, mean in ms."""
    if not vals:
        return {"n": 0}
    s = sorted(vals)
    return {"n": len(s), "p50": quantile(s, 0.5) * 1e3, "p90": quantile(s, 0.9) * 1e3,
            "p99": quantile(s, 0.99) * 1e3, "p999": quantile(s, 0.999) * 1e3,
            "max": s[-1] * 1e3, "mean": sum(s) / len(s) * 1e3}


def knobs(req: dict) -> dict[str, str]:
    """The ``key=value`` words of the last user message of an OpenAI chat request: how the bench's
    fake upstreams are told what to send (``n=<tokens> iv=<ms> tag=<id>``), directly or through NexLM."""
    text = ""
    for m in reversed(req.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            text = c if isinstance(c, str) else ""
            break
    out = {}
    for word in text.split():
        k, eq, v = word.partition("=")
        if eq:
            out[k] = v
    return out


def machine_lines(packages=("aiohttp", "uvloop"), sep: str = ", ") -> list[str]:
    """``- CPU: ..., N cores; RAM ...; Linux ...`` and ``- Python X, pkg version, ...``."""
    from importlib.metadata import version
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    vers = []
    for pkg in packages:
        try:
            vers.append(f"{pkg} {version(pkg)}")
        except Exception:  # noqa: BLE001
            vers.append(f"{pkg} not installed")
    return [f"- CPU: {model}, {os.cpu_count()} cores; RAM {mem}; Linux {platform.release()}",
            f"- Python {platform.python_version()}{sep}" + ", ".join(vers)]


def tests_module(name: str):
    """``tests/<name>.py`` (the tests' fake upstream vocabulary, their invariant checks), loaded by
    path under the name ``nexlm_tests_<name>``: bench/ has a fake_upstream.py of its own."""
    import importlib.util
    import sys
    key = f"nexlm_tests_{name}"
    if key in sys.modules:
        return sys.modules[key]
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))  # tests/invariants.py imports nexlm
    spec = importlib.util.spec_from_file_location(key, TESTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------- child processes

class Proc:
    """A child process of the run, its output in ``log_path``.

    ``pipes``: stdin and stdout are pipes (a JSON-lines service: ``call``); ``pipe_stdout``: stdout
    only (a ``READY <port>`` line). ``cpus``: pinned with taskset (or sched_setaffinity)."""

    def __init__(self, name: str, argv: list[str], log_path: Path | None, *, cpus: list[int] | None = None,
                 pipes: bool = False, pipe_stdout: bool = False, env: dict | None = None, cwd: Path = ROOT) -> None:
        self.name = name
        self.cpus = cpus
        self.log_path = log_path
        taskset = shutil.which("taskset")
        if cpus and taskset:
            argv = ["taskset", "-c", ",".join(map(str, cpus))] + argv
        self.log = open(log_path, "wb") if log_path else None
        env = env if env is not None else dict(os.environ, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen(
            argv, cwd=cwd, env=env,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if (pipes or pipe_stdout) else (self.log or subprocess.DEVNULL),
            stderr=self.log or subprocess.DEVNULL,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if (cpus and not taskset) else None,
        )
        self.pid = self.p.pid
        self._buf = b""

    def readline(self, timeout: float) -> str:
        fd = self.p.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout:.0f}s (see {self.log_path})")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited (code {self.p.poll()}); see {self.log_path}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def send(self, line: str) -> None:
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def call(self, cmd: dict, timeout: float = 600.0) -> dict:
        """One JSON command, one JSON answer (bench/loadgen.py serve); an error answer raises."""
        self.send(json.dumps(cmd))
        res = json.loads(self.readline(timeout))
        if "error" in res and isinstance(res["error"], str):
            raise RuntimeError(f"{self.name} {cmd.get('cmd')}: {res['error']}\n{res.get('traceback', '')}")
        return res

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig=None, wait: float = 8.0) -> int | None:
        """Signal (default: SIGINT for NexLM, SIGTERM otherwise), wait, then kill; the exit code."""
        if sig is None:
            sig = signal.SIGINT if self.name == "nexlm" else signal.SIGTERM
        if self.p.poll() is None:
            try:
                self.p.send_signal(sig)
                self.p.wait(wait)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        for f in (self.p.stdout, self.p.stdin, self.log):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        return self.p.returncode
