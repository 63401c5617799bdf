"""Login sessions (what the page's cookie names) and the throttle on failed sign-ins.

The cookie carries a random id, never the access token: it can be revoked (``POST
/logout``), expires on the server, and a stolen one does not reveal the token. Both
stores are bounded in memory. Ids are kept hashed, so a lookup's timing depends on a
hash of the guess, not on how much of a real id it shares.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
import time
from collections import OrderedDict


def _digest(sid: str) -> bytes:
    return hashlib.sha256(sid.encode()).digest()


class LoginSessions:
    """``id -> principal`` with a fixed lifetime; past ``cap`` the oldest login is dropped."""

    def __init__(self, ttl: float, cap: int, clock=time.monotonic) -> None:
        self.ttl = ttl
        self.cap = cap
        self.clock = clock
        self._by_digest: OrderedDict[bytes, tuple[str, float]] = OrderedDict()  # in expiry order

    def __len__(self) -> int:
        return len(self._by_digest)

    def _purge(self, now: float) -> None:
        while self._by_digest:
            digest, (_, expires) = next(iter(self._by_digest.items()))
            if expires > now:
                break
            del self._by_digest[digest]

    def create(self, principal: str) -> str:
        now = self.clock()
        self._purge(now)
        while len(self._by_digest) >= self.cap:
            self._by_digest.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        self._by_digest[_digest(sid)] = (principal, now + self.ttl)
        return sid

    def get(self, sid: str) -> str | None:
        if not sid or len(sid) > 128:
            return None
        entry = self._by_digest.get(_digest(sid))
        if entry is None:
            return None
        if entry[1] <= self.clock():
            self._by_digest.pop(_digest(sid), None)
            return None
        return entry[0]

    def revoke(self, sid: str) -> bool:
        if not sid or len(sid) > 128:
            return False
        return self._by_digest.pop(_digest(sid), None) is not None


class FailureThrottle:
    """Failed attempts per client: ``burst`` in a row, then one per ``every`` seconds.

    While a client has no attempt left, its attempts are refused unchecked (HTTP 429), so a
    correct guess cannot be told from a wrong one. IPv6 clients count per /64: one host
    owns a whole prefix. At most ``cap`` clients are remembered (the longest idle go first).
    """

    def __init__(self, burst: int = 10, every: float = 10.0, cap: int = 10000, clock=time.monotonic) -> None:
        self.burst = burst
        self.every = every
        self.cap = cap
        self.clock = clock
        self._left: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (attempts left, when)

    @staticmethod
    def _key(client: str) -> str:
        try:
            addr = ipaddress.ip_address(client)
        except ValueError:
            return client
        if addr.version == 6:
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.ip_network(f"{addr}/64", strict=False))
        return str(addr)

    def _level(self, key: str, now: float) -> float:
        entry = self._left.get(key)
        if entry is None:
            return float(self.burst)
        left, when = entry
        return min(float(self.burst), left + (now - when) / self.every)

    def retry_after(self, client: str) -> int:
        """0 when ``client`` may try now, else whole seconds until it may."""
        level = self._level(self._key(client), self.clock())
        return 0 if level >= 1 else max(1, math.ceil((1 - level) * self.every))

    def failed(self, client: str) -> None:
        key = self._key(client)
        now = self.clock()
        self._left[key] = (max(0.0, self._level(key, now) - 1), now)
        self._left.move_to_end(key)
        while len(self._left) > self.cap:
            self._left.popitem(last=False)
