"""Real redis-server processes for the tests (Debian's ``redis-server``), on free loopback ports.

Each is started with no persistence (``--save "" --appendonly no``) in its own directory and
is ready when it answers PING (polled against a deadline, never a fixed sleep). A cluster is
three such nodes joined by ``redis-cli --cluster create`` and ready when every node reports
``cluster_state:ok``. The fixtures (tests/conftest.py) stop them at the end of the session.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

DEADLINE = 20.0  # seconds to come up (a loaded 2-core machine); normally well under one


def free_port(bus: bool = False) -> int:
    """A free loopback port; with ``bus``, one whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def command(port: int, *args: str) -> str:
    """One command over a raw socket (RESP), answered as text: enough for readiness checks."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        s.sendall(payload.encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n")
            if sep and (not head.startswith(b"$") or len(body) >= int(head[1:]) + 2):
                break
        return data.decode(errors="replace")


def wait_until(check, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: redis-server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {DEADLINE} s")
        time.sleep(0.02)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl), for a TLS redis-server."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    return cert, key


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server the test started, then kill it if it does not exit within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    """``tls``: TLS only (``rediss://``, ``self.cert`` is the CA to trust), with ``password``."""

    def __init__(self, directory: Path, cluster: bool = False, tls: bool = False, password: str | None = None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(bus=cluster)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        args = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "log")]
        ready = lambda: command(self.port, "PING").startswith("+PONG")  # noqa: E731
        if password:
            args += ["--requirepass", password]
        if tls:
            self.cert, key = self_signed(self.dir)
            args[2] = "0"  # no plain port
            args += ["--tls-port", str(self.port), "--tls-cert-file", str(self.cert), "--tls-key-file", str(key),
                     "--tls-auth-clients", "no"]
            self.url = f"rediss://127.0.0.1:{self.port}/0"
            cli = [shutil.which("redis-cli") or "redis-cli", "--tls", "--cacert", str(self.cert), "-p", str(self.port),
                   *(["--no-auth-warning", "-a", password] if password else []), "PING"]
            ready = lambda: b"PONG" in subprocess.run(cli, capture_output=True, timeout=5).stdout  # noqa: E731
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf"),
                     "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(ready, f"redis on {self.port}", self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)


class RedisCluster:
    """Three master nodes, no replicas: every slot served, ``url`` names one node."""

    def __init__(self, directory: Path) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for i in range(3):
                self.nodes.append(RedisServer(directory / f"node{i}", cluster=True))
            subprocess.run([shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
                            *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
            for n in self.nodes:
                wait_until(lambda n=n: "cluster_state:ok" in command(n.port, "CLUSTER", "INFO"),
                           f"cluster node {n.port}", n.proc)
        except BaseException:
            self.stop()
            raise
        self.url = f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
