"""The listening socket's own limits, below HTTP: open connections per client address, and the
time a new connection gets to send its first request's head.

A client that opens connections and sends nothing holds a file descriptor each
(aiohttp keeps a silent connection for its keep-alive timeout, 75 s); with no cap
per address, a few hundred of them exhaust the process's descriptors and
``/healthz`` fails for everyone. aiohttp has no hook between ``accept()`` and its
protocol, so ``run`` is ``web.run_app`` for one TCP site whose protocol factory
counts connections per peer address, answers those past
``max_connections_per_address`` with a 503 and closes them at once (trusted
proxies are exempt: every user arrives from their address), and closes a
connection whose first request head is not complete within
``header_timeout_seconds``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import suppress
from typing import Callable, Iterable

from aiohttp import web

from .clients import is_trusted

log = logging.getLogger(__name__)

_BODY = json.dumps({"type": "error", "code": "overloaded",
                    "message": "Too many connections from your address; close some and try again."}).encode()
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 10\r\n"
           b"X-Content-Type-Options: nosniff\r\nConnection: close\r\nContent-Length: "
           + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class AddressCap:
    """Open connections per peer address (``limit`` 0: no cap), and the header timeout (0: none)."""

    def __init__(self, limit: int, exempt: Iterable[str] = (), header_timeout: float = 0.0) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self.timed_out = 0
        self.exempt = tuple(exempt)  # [server] trusted_proxies: addresses or CIDR ranges
        self.open: dict[str, int] = {}
        self.refused = 0

    def exempted(self, addr: str) -> bool:
        return is_trusted(addr, self.exempt)

    def admit(self, addr: str) -> bool:
        if not self.limit or self.exempted(addr):
            return True
        n = self.open.get(addr, 0)
        if n >= self.limit:
            self.refused += 1
            if self.refused % 1000 == 1:
                log.warning("refusing connections from %s: %d open (max_connections_per_address)", addr, n)
            return False
        self.open[addr] = n + 1
        return True

    def release(self, addr: str) -> None:
        n = self.open.get(addr, 0) - 1
        if n > 0:
            self.open[addr] = n
        else:
            self.open.pop(addr, None)


class _Guard(asyncio.Protocol):
    """In front of aiohttp's ``RequestHandler``: counts the connection, or refuses it; until the first
    request head is complete it looks for its end, and drops the connection at the header timeout."""

    __slots__ = ("_cap", "_factory", "_inner", "_addr", "_head", "_timer", "_transport")

    def __init__(self, cap: AddressCap, factory: Callable[[], asyncio.Protocol]) -> None:
        self._cap = cap
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._addr: str | None = None
        self._head = b""  # the last 3 bytes of the first request so far (its end may be split across reads)
        self._timer: asyncio.TimerHandle | None = None
        self._transport = None

    def connection_made(self, transport) -> None:
        peer = transport.get_extra_info("peername")
        addr = peer[0] if isinstance(peer, tuple) and peer else ""
        if not self._cap.admit(addr):
            transport.write(REFUSAL)
            transport.close()
            return
        if self._cap.limit and not self._cap.exempted(addr):
            self._addr = addr
        if self._cap.header_timeout > 0:
            self._transport = transport
            self._timer = asyncio.get_running_loop().call_later(self._cap.header_timeout, self._too_slow)
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def _too_slow(self) -> None:
        self._timer = None
        self._cap.timed_out += 1
        self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            head = self._head + data
            if b"\r\n\r\n" in head:
                self._timer.cancel()
                self._timer = None
                self._head = b""
                self._transport = None
            else:
                self._head = head[-3:]
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._transport = None
        if self._addr is not None:
            self._cap.release(self._addr)
            self._addr = None
        if self._inner is not None:
            self._inner.connection_lost(exc)


class _CappedFactory:
    """aiohttp's ``Server`` (the protocol factory a site listens with), with the cap in front."""

    def __init__(self, server: web.Server, cap: AddressCap) -> None:
        self._server = server
        self._cap = cap

    def __call__(self) -> _Guard:
        return _Guard(self._cap, self._server)

    def __getattr__(self, name):
        return getattr(self._server, name)


class _Runner(web.AppRunner):
    def __init__(self, app: web.Application, cap: AddressCap, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self._cap = cap

    @property
    def server(self):
        server = super().server
        return None if server is None else _CappedFactory(server, self._cap)


def run(app: web.Application, *, host: str, port: int, cap: AddressCap,
        print: Callable[[str], None] | None = None, **kwargs) -> None:  # noqa: A002 - as web.run_app
    """``web.run_app(app, host=host, port=port, **kwargs)``, with ``cap`` on every connection."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, host, port, cap, print, kwargs))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in tasks:
                t.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()


async def _serve(app, host, port, cap, print_fn, kwargs) -> None:
    runner = _Runner(app, cap, handle_signals=True, **kwargs)
    await runner.setup()
    try:
        # A deeper accept queue than aiohttp's 128: a burst of connections (refused or not) must not
        # make the kernel drop other clients' SYNs, which costs them a 1-3 s retransmit.
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        if print_fn is not None:
            print_fn(f"Running on {site.name}")
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()
