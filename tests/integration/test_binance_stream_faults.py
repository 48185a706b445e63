"""The Binance WebSocket kline client and the live feed against real local servers replaying the
real BTCUSDT minutes (tests/fake_binance_ws.py for the stream, tests/fake_binance.py for REST, on
a shared 1,500x clock), with the stream's faults: a dropped connection, a silent stall, an
announced server shutdown, duplicated, out-of-order and malformed messages. Each run must
deliver exactly the replayed closed klines (none lost, duplicated, changed or out of order); what
the fault broke is fetched from REST, and a lost connection is replaced after a backoff wait."""

from __future__ import annotations

import time

import polars as pl
import pytest

from configs.schema import BinanceConfig, BinanceStreamConfig, FeedConfig
from market.klines import BAR_COLUMNS, ONE_MINUTE_MS
from serve.engine.feed import BarFeed
from tests.conftest import REAL_1M, read_real_minutes, require
from tests.fake_binance import load_dump_lines
from tests.fake_binance_ws import StreamRig, start_rig

pytestmark = pytest.mark.integration

SYMBOL = "BTCUSDT"
DAY1 = 1_701_388_800_000  # 2023-12-01 00:00 UTC, the dump's first minute
HISTORY = 20
MINUTES = 60
FAULT_MINUTE = 34  # a few minutes into the live part however late the client connects
STALL_TIMEOUT_S = 0.3  # about 7 replayed minutes
BACKOFF_BASE_S = 0.05


def at(minute: int) -> int:
    return DAY1 + minute * ONE_MINUTE_MS


@pytest.fixture(scope="module")
def dump_lines() -> list[str]:
    return load_dump_lines(require(REAL_1M), 160)


@pytest.mark.parametrize("fault", ["drop", "stall", "shutdown", "duplicate", "swap", "malformed"])
def test_every_closed_kline_arrives_exactly_once_through_each_fault(
    fault: str, dump_lines: list[str], rigs: list[StreamRig]
) -> None:
    rig = start_rig(
        {SYMBOL: dump_lines[:MINUTES]},
        HISTORY,
        faults={at(FAULT_MINUTE): fault},
        **({"stall_timeout_s": STALL_TIMEOUT_S} if fault == "stall" else {}),
        backoff_base_s=BACKOFF_BASE_S,
    )
    rigs.append(rig)

    delivered = rig.collect()

    assert rig.server.applied == [(at(FAULT_MINUTE), fault)]
    assert delivered == rig.tape  # 0 lost, 0 duplicated, 0 changed, in open-time order
    stats = rig.stream.stats()
    assert stats.malformed == (1 if fault == "malformed" else 0)
    after_fault = [r for r in rig.rest.klines_requests if r.start_time == at(FAULT_MINUTE)]
    if fault == "duplicate":
        # The three copies and the stale one are dropped; nothing was missing, nothing fetched.
        assert 3 <= stats.duplicates <= 4
        assert len(rig.rest.klines_requests) == 1  # the history only
        assert stats.reconnects == []
        return
    # What the fault broke came from REST, starting at the minute it broke.
    assert after_fault and after_fault[0].status == 200 and after_fault[0].rows >= 1
    if fault in ("swap", "malformed"):
        assert stats.reconnects == []  # the connection stayed; the gap was filled from REST
        return
    first, *_ = stats.reconnects
    reasons = {
        "drop": "ConnectionClosed",
        "stall": "StreamStalledError",
        "shutdown": "ServerShutdownError",
    }
    assert reasons[fault] in first.reason, first.reason
    # The lost connection had delivered klines: the first retry waits within [base/2, base].
    assert first.attempt == 0 and BACKOFF_BASE_S / 2 <= first.delay_s <= BACKOFF_BASE_S
    # The next attempt came no sooner than the fault (a stall: the last message before it and
    # the stall timeout) plus that wait.
    lost = rig.server.connections[0]
    if fault == "stall":
        assert lost.last_sent_at is not None
        lost_at = lost.last_sent_at + STALL_TIMEOUT_S
    else:
        assert lost.faulted_at is not None
        lost_at = lost.faulted_at
    assert len(rig.server.attempts) >= 2
    assert rig.server.attempts[1] - lost_at >= first.delay_s - 0.005


def test_the_live_feed_serves_the_real_minutes_from_the_stream_across_a_reconnect(
    dump_lines: list[str], rigs: list[StreamRig]
) -> None:
    history_bars = 100
    rig = start_rig({SYMBOL: dump_lines}, history_bars, faults={at(130): "drop"})
    rigs.append(rig)
    config = FeedConfig(
        source="binance",
        symbols=[SYMBOL],
        history_bars=history_bars,
        binance=BinanceConfig(base_url=rig.rest.url, timeout_s=5.0),
        binance_stream=BinanceStreamConfig(
            url=rig.server.url, stall_timeout_s=2.0, backoff_base_s=0.05, backoff_max_s=0.4
        ),
    )
    feed = BarFeed(config, clock=rig.clock)
    rig.clock.restart()
    new_bars = 0
    try:
        deadline = time.monotonic() + 30
        while feed.last_bar_open_ms(SYMBOL) != at(159) and time.monotonic() < deadline:
            new_bars += feed.poll()[SYMBOL]
            time.sleep(0.02)
        stats = feed.stream_stats()
    finally:
        feed.close()

    expected = read_real_minutes(require(REAL_1M), n_rows=160).select(BAR_COLUMNS)
    assert feed.bars(SYMBOL).equals(expected.slice(60, 100))
    assert feed.rejected() == {} and feed.last_error(SYMBOL) is None
    assert stats is not None and len(stats.reconnects) >= 1 and stats.open_updates > 0
    assert rig.server.applied == [(at(130), "drop")]
    assert any(r.start_time == at(130) for r in rig.rest.klines_requests)
    held = feed.bars(SYMBOL)["open_time"]
    assert held.is_sorted() and held.n_unique() == held.len()
    assert new_bars >= 100 and isinstance(feed.bars(SYMBOL), pl.DataFrame)


def test_minutes_that_close_while_reconnecting_come_from_the_backfill_after_the_reconnect(
    dump_lines: list[str], rigs: list[StreamRig]
) -> None:
    # The connection drops 8 minutes before the tape ends and the wait before reconnecting spans
    # 12-25 minutes: the catch-up when the connection is lost gets the minutes closed by then,
    # and no stream kline follows the reconnect to reveal a gap, so only the backfill that
    # follows the new subscription can fetch the rest.
    rig = start_rig(
        {SYMBOL: dump_lines[:MINUTES]},
        HISTORY,
        faults={at(MINUTES - 8): "drop"},
        backoff_base_s=1.0,
        backoff_max_s=2.0,
    )
    rigs.append(rig)

    assert rig.collect() == rig.tape
    assert len(rig.server.connections) == 2
    # Delivered before the silent server (the tape is over) could stall the new connection and
    # a catch-up after that stall could fetch the minutes instead.
    (reconnect,) = rig.stream.stats().reconnects
    assert reconnect.delay_s >= 0.5


def test_connections_are_replaced_before_their_age_limit_without_losing_or_repeating_a_kline(
    dump_lines: list[str], rigs: list[StreamRig]
) -> None:
    # Two symbols, one stream named per message: a replacement is live only once its SUBSCRIBE
    # is answered, and the old connection must keep delivering until then. 40 live minutes
    # take 1.6 s, so a 0.4 s age limit replaces the connection several times.
    other = "ETHUSDT"
    rig = start_rig(
        {SYMBOL: dump_lines[:MINUTES], other: dump_lines[:MINUTES]},
        HISTORY,
        max_connection_age_s=0.4,
        streams_per_message=1,
    )
    rigs.append(rig)

    assert rig.collect() == rig.tape  # 0 lost, 0 duplicated, 0 changed, in open-time order
    stats = rig.stream.stats()
    assert stats.rotations >= 2
    assert stats.reconnects == []  # a replacement is not a lost connection
    assert len(rig.server.connections) == stats.rotations + 1
    streams = {f"{SYMBOL.lower()}@kline_1m", f"{other.lower()}@kline_1m"}
    for connection in rig.server.connections:
        assert connection.streams == streams and connection.closed_by_server is None
    assert rig.stream.error(SYMBOL) is None and rig.stream.error(other) is None
