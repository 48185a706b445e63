"""Abuse limits of the signal API (HTTP 429 + Retry-After): token buckets per key, a bound on
concurrent expensive work, and the caller address the per-address limits are keyed by.

All of it is in the memory of one ingress replica: limits are per replica and start afresh when
a replica restarts.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `rate_per_minute`.

    `check(key)` spends one token and returns None, or, when the bucket is empty, returns how
    many seconds until a token is available (for `Retry-After`; round it up to whole seconds).
    `clock` returns seconds on a monotonic scale (injectable for tests).

    Memory is bounded: a bucket idle long enough to have refilled completely is forgotten
    (a new bucket for that key is identical), and beyond `max_keys` the least recently seen
    key is dropped (which can only ever give that key a fresh burst, never block it).
    Thread-safe: FastAPI runs sync endpoints on a thread pool.
    """

    def __init__(
        self,
        rate_per_minute: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if not rate_per_minute > 0:
            raise ValueError(f"rate_per_minute must be > 0, got {rate_per_minute}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self._rate_per_s = rate_per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        # Seconds for an empty bucket to refill completely; idle longer = forgettable.
        self._full_refill_s = self._burst / self._rate_per_s
        self._lock = threading.Lock()
        # key -> (tokens, last seen), ordered from least to most recently seen.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        """Keys currently tracked."""
        return len(self._buckets)

    def check(self, key: str) -> float | None:
        """Spend one request of `key`: None when allowed, else the seconds to wait."""
        with self._lock:
            now = self._clock()
            self._evict_idle(now)
            state = self._buckets.pop(key, None)
            if state is None:
                tokens = self._burst
            else:
                stored, last = state
                # max(0, ...): tolerate a clock that steps back rather than draining tokens.
                tokens = min(self._burst, stored + max(0.0, now - last) * self._rate_per_s)
            retry_after: float | None
            if tokens >= 1.0:
                tokens -= 1.0
                retry_after = None
            else:
                retry_after = (1.0 - tokens) / self._rate_per_s
            # Re-inserted at the end: the OrderedDict stays sorted by last seen.
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return retry_after

    def refund(self, key: str) -> None:
        """Give back the request `check(key)` spent (capped at the burst): for callers that
        reserve before expensive work and only count the outcomes they want to limit."""
        with self._lock:
            state = self._buckets.get(key)
            if state is not None:
                tokens, last = state
                self._buckets[key] = (min(self._burst, tokens + 1.0), last)

    def _evict_idle(self, now: float) -> None:
        """Drop buckets (oldest first) whose idle time has refilled them completely; the
        ordering by last seen makes this amortised O(1) per call."""
        while self._buckets:
            _, (_, last) = next(iter(self._buckets.items()))
            if now - last < self._full_refill_s:
                break
            self._buckets.popitem(last=False)


class ConcurrencyLimit:
    """At most `limit` holders at once; `try_acquire` never waits, so excess work is refused
    at once instead of queueing without bound. Thread-safe."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self._slots = threading.BoundedSemaphore(limit)

    def try_acquire(self) -> bool:
        """Take a slot if one is free; the caller must `release` it."""
        return self._slots.acquire(blocking=False)

    def release(self) -> None:
        self._slots.release()


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress:
    """The caller's address for per-address limits.

    The direct peer (the ASGI client host) is the caller unless it is one of `trusted_proxies`
    (IP addresses or CIDR networks). Then X-Forwarded-For is read right to left, each proxy
    having appended the address it was connected from: the first entry that is not itself a
    trusted proxy is the caller. Entries left of that were written by the caller and are never
    believed. An entry that is not an IP address ends the walk at the proxy that wrote it.
    """

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self._trusted: tuple[IpNetwork, ...] = tuple(
            ipaddress.ip_network(proxy, strict=False) for proxy in trusted_proxies
        )

    def _is_trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def resolve(self, peer: str | None, forwarded_for: Iterable[str] = ()) -> str:
        """The caller address given the direct `peer` (None when the server does not know it)
        and the X-Forwarded-For header values in the order received."""
        caller = peer or "unknown"
        if not self._trusted or not self._is_trusted(caller):
            return caller
        entries = [entry.strip() for value in forwarded_for for entry in value.split(",")]
        for entry in reversed(entries):
            try:
                ipaddress.ip_address(entry)
            except ValueError:
                break
            caller = entry
            if not self._is_trusted(entry):
                break
        return caller
