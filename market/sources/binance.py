"""Binance's REST klines endpoint as a kline source.

`GET /api/v3/klines?symbol=&interval=1m&startTime=&endTime=&limit=1000` returns up to `limit`
klines as JSON arrays of 12 elements. The client paginates from the last stored open time, keeps
under the request-weight budget (its own count and the server's `X-MBX-USED-WEIGHT-1M` header),
honours `429`/`418` with `Retry-After`, and retries 5xx answers and network errors with
exponential backoff and full jitter. Only closed klines are stored.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

import httpx

from configs.schema import BinanceConfig
from market.bronze import Batch, BatchMeta, Bronze, RawKline
from market.klines import ONE_MINUTE_MS, to_millis, utc_date
from market.sources.base import now_iso

log = logging.getLogger(__name__)
KLINES_PATH = "/api/v3/klines"


class BinanceAPIError(RuntimeError):
    """A request Binance answered with an error that retrying will not fix."""


class WeightBudget:
    """Request weight used in the current minute, from our count and the server's header."""

    def __init__(
        self, limit: int, safety: float, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        self.capacity = int(limit * safety)
        self.clock = clock
        self.sleep = sleep
        self.minute = int(clock() // 60)
        self.used = 0

    def _roll(self) -> None:
        minute = int(self.clock() // 60)
        if minute != self.minute:
            self.minute, self.used = minute, 0

    def acquire(self, weight: int) -> None:
        """Wait until `weight` fits in this minute's budget, then book it."""
        self._roll()
        if self.used + weight > self.capacity:
            wait = 60.0 - self.clock() % 60.0 + 0.05
            log.warning("request weight %d/%d used: waiting %.1fs", self.used, self.capacity, wait)
            self.sleep(wait)
            self._roll()
        self.used += weight

    def observe(self, header_value: str | None) -> None:
        """Adopt the server's count when it is higher than ours."""
        if header_value and header_value.isdigit():
            self.used = max(self.used, int(header_value))


class BinanceClient:
    """A small, careful client of Binance's klines endpoint."""

    def __init__(
        self,
        config: BinanceConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.budget = WeightBudget(
            config.weight_limit_per_minute, config.weight_safety, clock, sleep
        )
        self.http = httpx.Client(
            base_url=config.base_url, timeout=config.timeout_s, transport=transport
        )
        self.retries_done = 0

    def close(self) -> None:
        self.http.close()

    def _backoff(self, attempt: int) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**attempt)
        return self.rng.uniform(0.0, cap)

    def klines(self, symbol: str, start_ms: int, end_ms: int) -> tuple[list[list[Any]], str]:
        """One page of klines from `start_ms` to `end_ms` (inclusive), and the request made."""
        params: dict[str, str | int] = {
            "symbol": symbol,
            "interval": "1m",
            "startTime": start_ms,
            "endTime": end_ms,
            "limit": self.config.page_limit,
        }
        request = f"GET {KLINES_PATH}?" + "&".join(f"{k}={v}" for k, v in params.items())
        attempt = 0
        while True:
            self.budget.acquire(self.config.klines_weight)
            try:
                response = self.http.get(KLINES_PATH, params=params)
            except httpx.TransportError as error:
                wait = self._retry_or_raise(attempt, f"network error: {error!r}")
                attempt += 1
                self.sleep(wait)
                continue
            self.budget.observe(response.headers.get("x-mbx-used-weight-1m"))
            status = response.status_code
            if status == 200:
                try:
                    payload = response.json()
                except json.JSONDecodeError:
                    wait = self._retry_or_raise(attempt, "truncated or invalid JSON body")
                    attempt += 1
                    self.sleep(wait)
                    continue
                if not isinstance(payload, list):
                    raise BinanceAPIError(f"{request}: expected a JSON list, got {payload!r:.200}")
                return payload, request
            if status in (418, 429):
                retry_after = response.headers.get("retry-after", "")
                wait = (
                    float(retry_after)
                    if retry_after.replace(".", "", 1).isdigit()
                    else (self._backoff(attempt))
                )
                self._retry_or_raise(attempt, f"HTTP {status} (rate limited)")
                log.warning("%s: HTTP %d, retrying after %.1fs", request, status, wait)
                attempt += 1
                self.sleep(wait)
                continue
            if status >= 500:
                wait = self._retry_or_raise(attempt, f"HTTP {status}")
                attempt += 1
                self.sleep(wait)
                continue
            raise BinanceAPIError(f"{request}: HTTP {status}: {response.text[:300]}")

    def _retry_or_raise(self, attempt: int, why: str) -> float:
        if attempt >= self.config.max_retries:
            raise BinanceAPIError(f"giving up after {attempt} retries: {why}")
        self.retries_done += 1
        wait = self._backoff(attempt)
        log.warning("%s; retry %d in %.2fs", why, attempt + 1, wait)
        return wait

    def pages(self, symbol: str, start_ms: int, end_ms: int) -> Iterator[tuple[list[Any], str]]:
        """Pages from `start_ms` to `end_ms`, following the last open time of each page.

        A short page does not end the walk (Binance may return fewer rows than the limit); an
        empty page does.
        """
        cursor = start_ms
        while cursor <= end_ms:
            rows, request = self.klines(symbol, cursor, end_ms)
            if not rows:
                return
            yield rows, request
            last = max(to_millis(int(r[0])) for r in rows)
            if last < cursor:
                raise BinanceAPIError(f"{request}: page went backwards (last open time {last})")
            cursor = last + ONE_MINUTE_MS


class BinanceSource:
    """Binance REST as a kline source over an inclusive epoch-ms range."""

    name = "binance"
    tag = "rest"

    def __init__(
        self,
        client: BinanceClient,
        start_ms: int,
        end_ms: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.clock = clock

    def batches(self, symbol: str, store: Bronze) -> Iterator[Batch]:
        # Only closed klines: a bar is final once its close time has passed.
        newest_closed = int(self.clock() * 1000) // ONE_MINUTE_MS * ONE_MINUTE_MS - ONE_MINUTE_MS
        end = min(self.end_ms, newest_closed)
        covered = [(p.first_ms, p.last_ms) for p in store.parts(self.name, symbol)]
        for gap_start, gap_end in missing_ranges(covered, self.start_ms, end):
            yield from self._fetch(symbol, gap_start, gap_end)

    def _fetch(self, symbol: str, start: int, end: int) -> Iterator[Batch]:
        pending_day: date | None = None
        pending: list[RawKline] = []
        metas: list[BatchMeta] = []
        for rows, request in self.client.pages(symbol, start, end):
            meta = BatchMeta(now_iso(), request)
            for row in rows:
                open_time = to_millis(int(row[0]))
                if open_time > end:
                    continue
                day = utc_date(open_time)
                if pending_day is not None and day != pending_day and pending:
                    yield Batch(self.name, symbol, pending_day, self.tag, pending, metas)
                    pending, metas = [], []
                pending_day = day
                pending.append(RawKline(open_time, json.dumps(row, separators=(",", ":"))))
                metas.append(meta)
        if pending and pending_day is not None:
            yield Batch(self.name, symbol, pending_day, self.tag, pending, metas)


def missing_ranges(
    covered: list[tuple[int, int]], start_ms: int, end_ms: int
) -> list[tuple[int, int]]:
    """The inclusive sub-ranges of [start_ms, end_ms] that no stored part covers.

    Resuming after the last stored minute alone would skip a backfill of an earlier range.
    """
    missing: list[tuple[int, int]] = []
    cursor = start_ms
    for first, last in sorted(covered):
        if last < cursor:
            continue
        if first > end_ms:
            break
        if first > cursor:
            missing.append((cursor, min(first - ONE_MINUTE_MS, end_ms)))
        cursor = max(cursor, last + ONE_MINUTE_MS)
    if cursor <= end_ms:
        missing.append((cursor, end_ms))
    return missing
