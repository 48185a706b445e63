"""BarFeed replays (simulator and dump files) on a fake clock: history, release rate, staleness,
validation of malformed rows, deduplication, closes_since, unknown symbols."""

from __future__ import annotations

import gzip
import math
import zipfile
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from configs.schema import FeedConfig, SimConfig
from market import validation as v
from market.klines import BAR_COLUMNS, ONE_MINUTE_MS
from market.sim_silver import simulated_bars
from market.sources.sim import MarketSimulator, format_dump_line, simulate_symbols
from market.validation.polars_rules import check_lines
from serve.engine.feed import BarFeed

T0 = 1_900_000_000.0  # epoch seconds where every fake clock starts
SIM = SimConfig(seed=11, anchor_date=date(2024, 2, 1))


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sim_feed(clock: FakeClock, **overrides: Any) -> BarFeed:
    settings: dict[str, Any] = {
        "source": "sim",
        "symbols": ["SIMAAA", "SIMBBB"],
        "history_bars": 120,
        "replay_bars_per_s": 2.0,
        "stale_after_s": 30.0,
        "sim": SIM,
        "sim_days": 1,
    }
    settings.update(overrides)
    return BarFeed(FeedConfig(**settings), clock=clock)


def expected_sim(symbol: str, days: int = 1) -> pl.DataFrame:
    return simulated_bars(SIM, [symbol], days).sort("open_time")


# -- sim replay --------------------------------------------------------------------------------


def test_sim_replay_exposes_history_then_releases_bars_at_the_accelerated_rate() -> None:
    clock = FakeClock()
    feed = sim_feed(clock)
    source = expected_sim("SIMAAA")
    assert source.height == 1440  # gap_rate 0: one whole day

    # Nothing is held before the first poll.
    assert feed.bars("SIMAAA").height == 0
    assert feed.last_bar_open_ms("SIMAAA") is None
    assert feed.staleness_s("SIMAAA") == math.inf and feed.is_stale("SIMAAA")

    assert feed.poll() == {"SIMAAA": 120, "SIMBBB": 120}
    bars = feed.bars("SIMAAA")
    assert bars.columns == list(BAR_COLUMNS)
    assert bars["open_time"].dtype == pl.Int64
    assert bars.equals(source.head(120))
    assert feed.bars("SIMBBB").equals(expected_sim("SIMBBB").head(120))
    assert feed.staleness_s("SIMAAA") == 0.0 and not feed.is_stale("SIMAAA")
    assert feed.poll() == {"SIMAAA": 0, "SIMBBB": 0}  # no time has passed

    clock.advance(10.0)  # 2 bars/s: 20 bars due
    assert feed.poll() == {"SIMAAA": 20, "SIMBBB": 20}
    bars = feed.bars("SIMAAA")
    assert bars.height == 120  # bounded: only the latest history_bars are held
    assert bars.equals(source.slice(20, 120))
    assert feed.last_bar_open_ms("SIMAAA") == source["open_time"][139]

    # (Binary fractions of a second keep the fake clock's sums exact.)
    clock.advance(0.375)  # 10.375 s * 2 = 20.75: no further bar yet
    assert feed.poll()["SIMAAA"] == 0
    assert feed.staleness_s("SIMAAA") == 0.375
    clock.advance(0.125)  # 21 bars due
    assert feed.poll()["SIMAAA"] == 1
    assert feed.staleness_s("SIMAAA") == 0.0
    clock.advance(0.25)  # not polled: the newest bar ages on the replay clock
    assert feed.staleness_s("SIMAAA") == 0.25

    clock.advance(100.0)  # a late poll releases everything due at once: 110.75 s * 2 = 221
    assert feed.poll()["SIMAAA"] == 200
    assert feed.bars("SIMAAA").equals(source.slice(341 - 120, 120))


def test_replay_that_runs_out_goes_stale() -> None:
    clock = FakeClock()
    feed = sim_feed(clock, symbols=["SIMAAA"])
    source = expected_sim("SIMAAA")
    feed.poll()
    # The last bar (index 1439) is due (1440 - 120) / 2 = 660 s after the start.
    clock.advance(665.0)
    assert feed.poll() == {"SIMAAA": 1320}
    assert feed.replay_remaining("SIMAAA") == 0
    assert feed.last_bar_open_ms("SIMAAA") == source["open_time"][-1]
    assert feed.staleness_s("SIMAAA") == pytest.approx(5.0)
    assert not feed.is_stale("SIMAAA")

    clock.advance(24.0)
    assert feed.poll() == {"SIMAAA": 0}
    assert feed.staleness_s("SIMAAA") == pytest.approx(29.0)
    assert not feed.is_stale("SIMAAA")
    clock.advance(2.0)  # 31 s > stale_after_s = 30
    assert feed.poll() == {"SIMAAA": 0}
    assert feed.staleness_s("SIMAAA") == pytest.approx(31.0)
    assert feed.is_stale("SIMAAA")
    assert feed.bars("SIMAAA").equals(source.tail(120))
    assert feed.rejected() == {}
    assert feed.last_error("SIMAAA") is None


def test_sim_replay_with_outages_holds_only_present_minutes() -> None:
    clock = FakeClock()
    config = SimConfig(seed=5, anchor_date=date(2024, 2, 1), gap_rate=0.005, max_gap_minutes=5)
    feed = sim_feed(clock, symbols=["SIMGAP"], sim=config, history_bars=400)
    feed.poll()
    clock.advance(1e6)
    feed.poll()
    expected = simulated_bars(config, ["SIMGAP"], 1).sort("open_time")
    assert expected.height < 1440  # the outages removed minutes
    assert feed.bars("SIMGAP").equals(expected.tail(400))


def test_closes_since_gives_the_closes_of_held_bars_from_an_open_time_on() -> None:
    clock = FakeClock()
    feed = sim_feed(clock, symbols=["SIMAAA"])
    feed.poll()
    bars = feed.bars("SIMAAA")
    since = int(bars["open_time"][-5])
    closes = feed.closes_since("SIMAAA", since)
    assert closes == dict(zip(bars["open_time"][-5:], bars["close"][-5:], strict=True))
    assert list(closes) == [since + i * ONE_MINUTE_MS for i in range(5)]
    # Older than the window: every held bar; newer than the newest bar: nothing.
    assert len(feed.closes_since("SIMAAA", 0)) == 120
    assert feed.closes_since("SIMAAA", int(bars["open_time"][-1]) + ONE_MINUTE_MS) == {}


def test_unknown_symbol_raises_key_error() -> None:
    feed = sim_feed(FakeClock(), symbols=["SIMAAA"])
    feed.poll()
    assert feed.symbols == ("SIMAAA",)
    for read in (
        feed.bars,
        feed.last_bar_open_ms,
        feed.staleness_s,
        feed.is_stale,
        feed.last_error,
        feed.rejected,
        lambda s: feed.closes_since(s, 0),
    ):
        with pytest.raises(KeyError, match="NOPE"):
            read("NOPE")


def test_dump_source_needs_a_path_and_an_existing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dump_path"):
        BarFeed(FeedConfig(source="dump", symbols=["BTCUSDT"]), clock=FakeClock())
    with pytest.raises(FileNotFoundError):
        BarFeed(
            FeedConfig(source="dump", symbols=["BTCUSDT"], dump_path=str(tmp_path / "no.csv")),
            clock=FakeClock(),
        )


# -- dump replay -------------------------------------------------------------------------------


def dump_lines(bars: int) -> list[str]:
    """`bars` valid Binance dump lines (millisecond timestamps) from the simulator."""
    _, day = next(MarketSimulator(SIM, "BTCUSDT").days(SIM.anchor_date, SIM.anchor_date))
    return [format_dump_line(day, i) for i in range(bars)]


def to_microseconds(line: str) -> str:
    fields = line.split(",")
    fields[0] = str(int(fields[0]) * 1000)
    fields[6] = str(int(fields[6]) * 1000 + 999)  # Binance's µs close time: open + 59,999,999
    return ",".join(fields)


def corrupt(line: str, **changes: str) -> str:
    fields = line.split(",")
    names = ["open_time", "open", "high", "low", "close", "volume", "close_time"]
    names += ["quote_volume", "trades", "taker_buy_base", "taker_buy_quote", "ignore"]
    for name, value in changes.items():
        fields[names.index(name)] = value
    return ",".join(fields)


def write_dump(path: Path, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(path.name.removesuffix(".zip") + ".csv", text)
    elif path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


@pytest.mark.parametrize(
    ("suffix", "micro"),
    [("csv", False), ("csv.gz", True), ("zip", True)],
    ids=["csv-ms", "gz-us", "zip-us"],
)
def test_dump_replay_rejects_malformed_rows_and_deduplicates(
    suffix: str, micro: bool, tmp_path: Path
) -> None:
    good = dump_lines(300)
    valid_open_times = [int(line.split(",")[0]) for line in good]

    def convert(line: str) -> str:
        return to_microseconds(line) if micro else line

    bad = [
        convert(corrupt(good[10], high="1.0")),  # high below open and close
        convert(corrupt(good[11], volume="-1.0")),
        convert(corrupt(good[12], close="0")),
        convert(corrupt(good[13], open="abc")),
        convert(corrupt(good[14], taker_buy_base="1e9")),
        convert(corrupt(good[15], open_time=str(valid_open_times[15] + 1))),  # not on a minute
        ",".join(convert(good[16]).split(",")[:7]),  # a truncated line
    ]
    lines = ["open_time,open,high,low,close,volume,close_time,quote_volume,count,x,y,ignore"]
    lines += [convert(line) for line in good]  # lines[i + 1] holds good[i]
    lines[101], lines[102] = lines[102], lines[101]  # two minutes out of order
    # A second copy of minute 250 with another trade count: the first copy must win.
    lines.insert(280, convert(corrupt(good[250], trades="7")))
    lines[200:200] = bad  # malformed copies of minutes also present valid
    path = tmp_path / f"BTCUSDT-1m-2024-02-01.{suffix}"
    write_dump(path, lines)
    clock = FakeClock()
    feed = BarFeed(
        FeedConfig(
            source="dump",
            symbols=["BTCUSDT"],
            dump_path=str(tmp_path / "BTCUSDT-1m-*"),
            history_bars=100,
            replay_bars_per_s=10.0,
        ),
        clock=clock,
    )

    assert feed.rejected() == {
        v.OHLC_INCONSISTENT: 1,
        v.NEGATIVE_VOLUME: 1,
        v.NON_POSITIVE_PRICE: 1,
        v.UNPARSEABLE_VALUE: 1,
        v.TAKER_BUY_EXCEEDS_VOLUME: 1,
        v.BAD_TIMESTAMP: 1,
        v.WRONG_FIELD_COUNT: 1,
        v.DUPLICATE_OPEN_TIME: 1,
    }
    assert feed.rejected("BTCUSDT") == feed.rejected()
    assert feed.poll() == {"BTCUSDT": 100}
    clock.advance(20.0)
    assert feed.poll() == {"BTCUSDT": 200}
    assert feed.replay_remaining("BTCUSDT") == 0
    bars = feed.bars("BTCUSDT")
    assert bars["open_time"].to_list() == valid_open_times[200:]  # ms, sorted, unique
    expected = check_lines(good, "BTCUSDT").drop("reason").tail(100)
    assert bars.equals(expected)
    # The first copy of the duplicated minute was kept, not the later one with 7 trades.
    minute_250 = bars.filter(pl.col("open_time") == valid_open_times[250])
    assert minute_250["trades"].to_list() == [int(good[250].split(",")[8])] != [7]


def test_dump_lines_in_microseconds_parse_to_the_same_bars() -> None:
    good = dump_lines(20)
    ms = check_lines(good, "BTCUSDT")
    us = check_lines([to_microseconds(line) for line in good], "BTCUSDT")
    assert ms["reason"].null_count() == 20
    assert us.equals(ms)


def test_rest_style_rows_are_checked_like_dump_lines() -> None:
    good = dump_lines(2)
    rest = [
        "[" + ",".join(f'"{f}"' if i not in (0, 6, 8) else f for i, f in enumerate(g.split(",")))
        for g in good
    ]
    rest = [row + "]" for row in rest]
    assert check_lines(rest, "BTCUSDT").equals(check_lines(good, "BTCUSDT"))
    checked = check_lines(["", "1,2,3", corrupt(good[0], trades="1.5"), good[1]], "BTCUSDT")
    assert checked["reason"].to_list() == [
        v.WRONG_FIELD_COUNT,
        v.WRONG_FIELD_COUNT,
        v.UNPARSEABLE_VALUE,
        None,
    ]


def test_vectorised_simulator_gives_each_symbol_its_own_bars_bit_for_bit() -> None:
    config = SimConfig(seed=5, anchor_date=date(2024, 2, 1), gap_rate=0.005, max_gap_minutes=5)
    symbols = ["SIMAAA", "SIMBBB", "SIMGAP"]
    block = simulate_symbols(config, symbols, 2)
    fields = ["open_time_ms", "open", "high", "low", "close", "volume", "trades"]
    fields += ["taker_buy_base", "present", "planted_signal"]
    for k, symbol in enumerate(symbols):
        days = [
            day
            for _, day in MarketSimulator(config, symbol).days(date(2024, 2, 1), date(2024, 2, 2))
        ]
        for name in fields:
            expected = np.concatenate([getattr(day, name) for day in days])
            assert np.array_equal(getattr(block, name)[k], expected), (symbol, name)
    assert not block.present.all()  # the outages are there


def test_newest_bars_and_held_counts_read_many_symbols_at_once() -> None:
    clock = FakeClock()
    feed = sim_feed(clock, symbols=["SIMAAA", "SIMBBB", "SIMCCC"])
    assert feed.held_counts(["SIMBBB"]).tolist() == [0]
    feed.poll()
    clock.advance(2.0)  # 4 bars each
    assert feed.poll() == {"SIMAAA": 4, "SIMBBB": 4, "SIMCCC": 4}
    assert feed.held_counts(["SIMCCC", "SIMAAA"]).tolist() == [120, 120]
    newest = feed.newest_bars(["SIMCCC", "SIMAAA"], [4, 500])
    expected = pl.concat([feed.bars("SIMCCC").tail(4), feed.bars("SIMAAA")])
    assert newest.equals(expected)
    # Bar 123 (the 4th after the 120 of history) was due 4 bars / 2 bars per s after the start.
    assert feed.replay_close_s(123) == T0 + 2.0
    assert feed.replay_close_s(0) == T0
    with pytest.raises(KeyError, match="NOPE"):
        feed.newest_bars(["NOPE"], [1])
