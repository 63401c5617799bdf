"""Run NexLM: ``python app.py [--config nexlm.toml] [--host H] [--port P]``.

Parses arguments, loads settings, and hands ``create_app`` to ``nexlm.listen.run`` (``web.run_app``
with a cap on connections per client address). Everything else lives in the ``nexlm`` package.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import sys
from dataclasses import replace

from aiohttp.abc import AbstractAccessLogger

from nexlm import listen
from nexlm.config import ConfigError, load_settings
from nexlm.logsafe import BadRequestSummary, OneLine, loggable_path, printable
from nexlm.server import create_app, startup_lines
from nexlm.store import StoreError


class AccessLogger(AbstractAccessLogger):
    """Address, method, path, status, time: never the query string, which can carry message text
    and session ids; session ids in the path cut short; control characters escaped."""

    def log(self, request, response, time):
        if request.path.endswith("/healthz"):
            return  # probes every few seconds would drown everything else
        self.logger.info("%s %s %s %s %.1fms", printable(request.remote or "-", 64), printable(request.method, 16),
                         loggable_path(request.path), response.status, time * 1000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description="NexLM: a streaming chat server for LLMs.")
    p.add_argument("--config", default=os.environ.get("NEXLM_CONFIG"), help="TOML settings file (or NEXLM_CONFIG)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080)")
    p.add_argument("--debug", action="store_true", help="debug logging (may include message text)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(OneLine())  # whoever logs what a client sent, it cannot forge a line
    logging.getLogger("aiohttp.server").addFilter(BadRequestSummary())
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"nexlm: configuration error: {exc}", file=sys.stderr)
        return 2
    server = settings.server
    if args.host:
        server = replace(server, host=args.host)
    if args.port is not None:
        server = replace(server, port=args.port)
    settings = replace(settings, server=server)

    if server.uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass  # optional: plain asyncio works, uvloop spends about a sixth less CPU per token

    app = create_app(settings)
    # Everything built so far lives as long as the process: keep it out of the collector's
    # way, and collect the young generation less often. Full collections with ~80k tracked
    # objects paused the loop for 20-40 ms under load (bench B4/B7).
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 20, 20)

    shown_host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
    url = f"http://{shown_host}:{server.port}{server.base_path}/"
    try:
        listen.run(  # web.run_app, with [server] max_connections_per_address in front
            app,
            host=server.host,
            port=server.port,
            cap=listen.AddressCap(server.max_connections_per_address, server.trusted_proxies,
                                  server.header_timeout_seconds),
            handler_cancellation=True,  # as in tests: a handler whose client left is cancelled
            shutdown_timeout=0.5,  # for plain requests; on_shutdown has already ended every stream
            access_log_class=AccessLogger,
            print=lambda _: print("\n".join([f"NexLM is running: open {url}", *startup_lines(app)]), flush=True),
        )
    except StoreError as exc:  # raised at start, before anything listens
        print(f"nexlm: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"nexlm: port {server.port} on {server.host} is already in use; pick another with --port",
                  file=sys.stderr)
            return 1
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            print(f"nexlm: cannot listen on {server.host}:{server.port}: {exc.strerror}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
