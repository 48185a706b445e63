"""BarFeed's binance source with REST polling (`binance_live: polling`) against a real local HTTP
server that speaks Binance's klines API.

The server (tests/fake_binance.py) serves the real BTCUSDT dump; here it also knows the time:
it answers only klines that have opened by `now` (the newest one still open, as Binance does).
Time is a fake clock shared by the server, the feed and the client's sleep, so Retry-After and
backoff waits are recorded instead of waited for. The HTTP traffic is real.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import polars as pl
import pytest

from configs.schema import BinanceConfig, FeedConfig
from market import validation as v
from market.klines import BAR_COLUMNS, ONE_MINUTE_MS
from serve.engine.feed import BarFeed
from tests.conftest import REAL_1M, read_real_minutes, require
from tests.fake_binance import FakeBinance, Fault, Kline, load_dump_lines

pytestmark = pytest.mark.integration

SYMBOL = "BTCUSDT"
DAY1 = 1_701_388_800_000  # 2023-12-01 00:00 UTC, the dump's first minute
SERVED_MINUTES = 3 * 1440
MINUTE = ONE_MINUTE_MS


def at(minute: int) -> int:
    """Open time (epoch ms) of the dump's `minute`-th bar."""
    return DAY1 + minute * MINUTE


class FakeClock:
    """Epoch seconds that move only when a test or a sleep moves them."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SleepRecorder:
    """The client's `sleep`: records each wait and advances the fake clock by it."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sleeps: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.advance(seconds)


class LiveBinance(FakeBinance):
    """FakeBinance that serves only klines opened by `clock()`, like the live API.

    `ignore_end_time` makes it answer up to the currently open kline whatever endTime says (a
    careless server), `corrupt` replaces fields of the kline opening at a time (open time ->
    {field index: value}) in every answer.
    """

    def __init__(self, lines: list[str], *, clock: FakeClock, **kwargs: Any) -> None:
        super().__init__(lines, clock=clock, **kwargs)
        self.ignore_end_time = False
        self.corrupt: dict[int, dict[int, Any]] = {}

    def _select(self, params: dict[str, str]) -> tuple[int, bytes, list[Kline]]:
        now_ms = int(self.clock() * 1000)
        current_open = now_ms - now_ms % MINUTE
        params = dict(params)
        asked = params.get("endTime", "")
        end = int(asked) if asked.isdigit() and not self.ignore_end_time else current_open
        params["endTime"] = str(min(end, current_open))
        status, body, rows = super()._select(params)
        return status, body, [self._corrupted(row) for row in rows]

    def _corrupted(self, row: Kline) -> Kline:
        changes = self.corrupt.get(int(row[0]))
        if not changes:
            return row
        copy = list(row)  # the served klines themselves stay intact
        for index, value in changes.items():
            copy[index] = value
        return copy


@pytest.fixture(scope="module")
def dump_lines() -> list[str]:
    return load_dump_lines(require(REAL_1M), SERVED_MINUTES)


@pytest.fixture(scope="module")
def real_bars() -> pl.DataFrame:
    """The same minutes parsed independently of the feed (polars CSV reader)."""
    return read_real_minutes(require(REAL_1M), n_rows=SERVED_MINUTES).select(BAR_COLUMNS)


@pytest.fixture
def clock() -> FakeClock:
    # 30 s into the minute that opens at minute 2000: minute 1999 is the newest closed bar.
    return FakeClock((at(2000) + 30_000) / 1000)


@pytest.fixture
def make_server(dump_lines: list[str], clock: FakeClock) -> Iterator[Callable[..., LiveBinance]]:
    servers: list[LiveBinance] = []

    def make(**kwargs: Any) -> LiveBinance:
        server = LiveBinance(dump_lines, clock=clock, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_feed(clock: FakeClock) -> Iterator[Callable[..., tuple[BarFeed, SleepRecorder]]]:
    feeds: list[BarFeed] = []

    def make(
        base_url: str, symbols: tuple[str, ...] = (SYMBOL,), history_bars: int = 200, **client: Any
    ) -> tuple[BarFeed, SleepRecorder]:
        sleep = SleepRecorder(clock)
        config = FeedConfig(
            source="binance",
            binance_live="polling",
            symbols=list(symbols),
            history_bars=history_bars,
            stale_after_s=150.0,
            binance=BinanceConfig(base_url=base_url, timeout_s=5.0, **client),
        )
        feed = BarFeed(config, clock=clock, sleep=sleep)
        feeds.append(feed)
        return feed, sleep

    yield make
    for feed in feeds:
        feed.close()


def open_times(feed: BarFeed, symbol: str = SYMBOL) -> list[int]:
    return feed.bars(symbol)["open_time"].to_list()


def test_initial_history_then_new_closed_bars_on_later_polls(
    make_server: Callable[..., LiveBinance],
    make_feed: Callable[..., tuple[BarFeed, SleepRecorder]],
    clock: FakeClock,
    real_bars: pl.DataFrame,
) -> None:
    server = make_server()
    feed, sleep = make_feed(server.url, history_bars=1500)  # more than one 1000-kline page

    assert feed.poll() == {SYMBOL: 1500}
    assert [(r.start_time, r.end_time, r.rows) for r in server.klines_requests] == [
        (at(500), at(1999), 1000),
        (at(1500), at(1999), 500),
    ]
    assert feed.bars(SYMBOL).equals(real_bars.slice(500, 1500))
    assert feed.last_bar_open_ms(SYMBOL) == at(1999)
    assert feed.staleness_s(SYMBOL) == 30.0  # the 1999 bar closed at 2000:00, now is 2000:30
    assert not feed.is_stale(SYMBOL)
    assert feed.last_error(SYMBOL) is None and feed.rejected() == {}

    clock.advance(3 * 60)  # 2003:30: minutes 2000..2002 have closed
    assert feed.poll() == {SYMBOL: 3}
    assert (server.klines_requests[-1].start_time, server.klines_requests[-1].end_time) == (
        at(2000),
        at(2002),
    )
    assert feed.bars(SYMBOL).equals(real_bars.slice(503, 1500))  # still 1500 bars
    assert feed.closes_since(SYMBOL, at(2001)) == dict(
        zip(
            real_bars["open_time"][2001:2003].to_list(),
            real_bars["close"][2001:2003].to_list(),
            strict=True,
        )
    )

    requests = len(server.klines_requests)
    clock.advance(29)  # 2003:59: no further bar has closed, so nothing is asked
    assert feed.poll() == {SYMBOL: 0}
    assert len(server.klines_requests) == requests
    assert feed.staleness_s(SYMBOL) == pytest.approx(59.0)
    clock.advance(100)  # no poll for a while: the newest bar ages past stale_after_s
    assert feed.staleness_s(SYMBOL) == pytest.approx(159.0) and feed.is_stale(SYMBOL)
    assert feed.poll() == {SYMBOL: 2}
    assert not feed.is_stale(SYMBOL)
    assert sleep.sleeps == []


def test_only_closed_bars_are_kept_when_the_server_sends_the_open_one(
    make_server: Callable[..., LiveBinance],
    make_feed: Callable[..., tuple[BarFeed, SleepRecorder]],
    clock: FakeClock,
) -> None:
    server = make_server()
    server.ignore_end_time = True
    feed, _ = make_feed(server.url)

    assert feed.poll() == {SYMBOL: 200}
    assert server.klines_requests[0].end_time == at(1999)  # the feed asks for closed bars only
    assert server.klines_requests[0].open_times[-1] == at(2000)  # the server sent the open one
    assert open_times(feed) == [at(m) for m in range(1800, 2000)]

    clock.advance(29.999)  # 2000:59.999: the 2000 bar closes at 2000:59.999, not yet past
    assert feed.poll() == {SYMBOL: 0}
    assert feed.last_bar_open_ms(SYMBOL) == at(1999)
    clock.advance(0.001)  # 2001:00.000
    assert feed.poll() == {SYMBOL: 1}
    assert feed.last_bar_open_ms(SYMBOL) == at(2000)
    assert feed.staleness_s(SYMBOL) == pytest.approx(0.0, abs=1e-6)


def test_rate_limit_with_retry_after_is_waited_out_inside_the_poll(
    make_server: Callable[..., LiveBinance],
    make_feed: Callable[..., tuple[BarFeed, SleepRecorder]],
) -> None:
    server = make_server(faults=[Fault.rate_limited(7)])
    feed, sleep = make_feed(server.url)

    assert feed.poll() == {SYMBOL: 200}
    assert sleep.sleeps == [7.0]
    assert [r.status for r in server.klines_requests] == [429, 200]
    assert feed.last_error(SYMBOL) is None


def test_errors_are_recorded_without_raising_and_recovered_on_the_next_poll(
    make_server: Callable[..., LiveBinance],
    make_feed: Callable[..., tuple[BarFeed, SleepRecorder]],
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = make_server(faults=[Fault.rate_limited(7)])
    feed, sleep = make_feed(server.url, max_retries=0)  # every failure reaches the feed

    with caplog.at_level(logging.WARNING, logger="serve.engine.feed"):
        assert feed.poll() == {SYMBOL: 0}
    error = feed.last_error(SYMBOL)
    assert error is not None and "HTTP 429" in error
    assert any("BTCUSDT" in r.getMessage() and "429" in r.getMessage() for r in caplog.records)
    assert feed.bars(SYMBOL).height == 0 and feed.is_stale(SYMBOL)

    assert feed.poll() == {SYMBOL: 200}  # the next poll retries
    assert feed.last_error(SYMBOL) is None
    assert open_times(feed) == [at(m) for m in range(1800, 2000)]

    clock.advance(2 * 60)  # 2002:30
    server.inject(Fault.http(503))
    assert feed.poll() == {SYMBOL: 0}
    error = feed.last_error(SYMBOL)
    assert error is not None and "HTTP 503" in error
    assert feed.last_bar_open_ms(SYMBOL) == at(1999)  # what was held is still served

    clock.advance(60)  # 2003:30: the missed minutes and the new one arrive together
    assert feed.poll() == {SYMBOL: 3}
    assert feed.last_error(SYMBOL) is None
    assert open_times(feed) == [at(m) for m in range(1803, 2003)]
    assert sleep.sleeps == []  # with no retries left, nothing was waited for
    assert [r.status for r in server.klines_requests] == [429, 200, 503, 200]


def test_a_failure_between_pages_keeps_the_pages_received(
    make_server: Callable[..., LiveBinance],
    make_feed: Callable[..., tuple[BarFeed, SleepRecorder]],
) -> None:
    server = make_server(faults=[None, Fault.http(502)])
    feed, _ = make_feed(server.url, history_bars=1500, max_retries=0)

    assert feed.poll() == {SYMBOL: 1000}
    assert feed.last_error(SYMBOL) is not None
    assert feed.poll() == {SYMBOL: 500}
    assert server.klines_requests[-1].start_time == at(1500)  # resumed after the first page
    assert open_times(feed) == [at(m) for m in range(500, 2000)]
    assert feed.last_error(SYMBOL) is None


def test_network_errors_are_recorded_after_the_client_retries(
    make_feed: Callable[..., tuple[BarFeed, SleepRecorder]],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    feed, sleep = make_feed(f"http://127.0.0.1:{port}", max_retries=2, backoff_max_s=1.0)

    assert feed.poll() == {SYMBOL: 0}
    error = feed.last_error(SYMBOL)
    assert error is not None and "network error" in error
    assert len(sleep.sleeps) == 2 and all(0 <= s <= 1.0 for s in sleep.sleeps)


def test_an_unknown_symbol_fails_alone(
    make_server: Callable[..., LiveBinance],
    make_feed: Callable[..., tuple[BarFeed, SleepRecorder]],
) -> None:
    server = make_server()
    feed, _ = make_feed(server.url, symbols=(SYMBOL, "NOPEUSDT"))

    assert feed.poll() == {SYMBOL: 200, "NOPEUSDT": 0}
    error = feed.last_error("NOPEUSDT")
    assert error is not None and "Invalid symbol" in error
    assert feed.last_error(SYMBOL) is None
    assert feed.bars("NOPEUSDT").height == 0 and feed.is_stale("NOPEUSDT")


def test_malformed_and_duplicated_rows_are_dropped_and_counted(
    make_server: Callable[..., LiveBinance],
    make_feed: Callable[..., tuple[BarFeed, SleepRecorder]],
    clock: FakeClock,
) -> None:
    server = make_server(faults=[Fault.dup_inside(5), Fault.dup_previous(3)])
    server.corrupt = {
        at(1900): {2: "1.00000000"},  # high below open and close
        at(1950): {5: "-3.5"},  # negative volume
        at(2001): {0: at(2001) + 7},  # an open time off the minute
    }
    feed, _ = make_feed(server.url)

    assert feed.poll() == {SYMBOL: 198}
    assert feed.rejected() == {
        v.DUPLICATE_OPEN_TIME: 1,
        v.OHLC_INCONSISTENT: 1,
        v.NEGATIVE_VOLUME: 1,
    }
    held = open_times(feed)
    assert held == sorted(set(held))
    assert set(range(at(1800), at(2000), MINUTE)) - set(held) == {at(1900), at(1950)}

    clock.advance(2 * 60)  # 2002:30: minutes 2000 and 2001 (malformed) have closed
    assert feed.poll() == {SYMBOL: 1}
    assert feed.rejected() == {
        v.DUPLICATE_OPEN_TIME: 1 + 3,  # the last 3 rows of the previous page, sent again
        v.OHLC_INCONSISTENT: 1,
        v.NEGATIVE_VOLUME: 1,
        v.BAD_TIMESTAMP: 1,
    }
    assert feed.last_bar_open_ms(SYMBOL) == at(2000)

    clock.advance(60)  # the malformed minute is not asked for (nor counted) again
    assert feed.poll() == {SYMBOL: 1}
    assert server.klines_requests[-1].start_time == at(2002)
    assert feed.rejected()[v.BAD_TIMESTAMP] == 1
    assert open_times(feed)[-3:] == [at(1999), at(2000), at(2002)]
