"""Per-client token-bucket rate limiting for the signal API (HTTP 429 + Retry-After)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


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

    def _evict_idle(self, now: float) -> None:
        """Drop buckets (oldest first) whose idle time has refilled them completely; the
        ordering by last seen makes this amortised O(1) per call."""
        while self._buckets:
            _, (_, last) = next(iter(self._buckets.items()))
            if now - last < self._full_refill_s:
                break
            self._buckets.popitem(last=False)
