"""The incremental engine, advanced bar by bar over many symbols at once, equals the batch engine
on the same bars (1e-9 at each column's scale) and the offline full-history features once past
the warm-up (1e-6, DESIGN.md section 4); gaps reset a symbol exactly as a new segment does."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import numpy as np
import polars as pl
import pytest

from market.features import spec
from market.features.incremental import BarArrays, IncrementalFeatures, StaleBarError
from market.features.polars_engine import compute_features
from market.klines import ONE_MINUTE_MS
from market.sim_silver import simulated_bars
from serve.engine.online_features import ONLINE_RELATIVE_TOLERANCE
from tests.conftest import sim_config
from tests.unit.test_online_features import scaled_difference

FEATURES = list(spec.FEATURE_COLUMNS)
# The batch and incremental engines differ only by floating-point rounding.
ENGINE_TOLERANCE = 1e-9
WINDOW_ROWS = 16


def replay(
    engine: IncrementalFeatures, bars: pl.DataFrame, checkpoint_every: int = 0
) -> pl.DataFrame:
    """Advance `engine` through `bars` minute by minute, every symbol with a bar in that minute
    in one call; returns `symbol`, `open_time` and the feature rows, sorted as the batch engine
    sorts. Every `checkpoint_every` calls, the engine's windows are checked against the rows."""
    bars = bars.sort("open_time", "symbol")
    arrays = engine.bar_arrays(bars)
    time = arrays.open_time_ms
    bounds = np.flatnonzero(np.r_[True, time[1:] != time[:-1], True])
    rows = np.empty((len(arrays), len(FEATURES)))
    for call, (start, stop) in enumerate(pairwise(bounds)):
        rows[start:stop] = engine.advance(arrays.rows(slice(start, stop)))
        if checkpoint_every and call % checkpoint_every == checkpoint_every - 1:
            check_windows(engine, arrays.rows(slice(0, stop)), rows[:stop])
    features = pl.from_numpy(rows, schema=FEATURES).fill_nan(None)
    return bars.select("symbol", "open_time").hstack(features).sort("symbol", "open_time")


def check_windows(engine: IncrementalFeatures, taken: BarArrays, rows: np.ndarray) -> None:
    """Each symbol's window holds the last WINDOW_ROWS rows `advance` returned for it (`rows`,
    for the bars `taken`, in order) and their closes, and is ready exactly when all of them are
    past the warm-up of one segment (a gap restarts the warm-up, so that is when none is
    null)."""
    windows = engine.windows()
    for i in range(len(engine.symbols)):
        mine = taken.symbol == i
        expected = rows[mine][-WINDOW_ROWS:]
        warm = expected.shape[0] == WINDOW_ROWS and not np.isnan(expected).any()
        assert windows.ready[i] == warm
        if warm:
            assert np.array_equal(windows.values[i], expected)
            assert np.array_equal(windows.close[i], taken.close[mine][-WINDOW_ROWS:])
            assert windows.open_time_ms[i] == taken.open_time_ms[mine][-1]
        else:
            assert np.isnan(windows.values[i]).all() and np.isnan(windows.close[i]).all()


def median_abs(frame: pl.DataFrame) -> np.ndarray:
    """Each feature's median |value| (nulls left out), the scale of `scaled_difference`."""
    return frame.select(pl.col(FEATURES).abs().median()).to_numpy()[0]


def simulated_universe() -> pl.DataFrame:
    """Four symbols over three days: outages at different minutes in each, one symbol that
    joins 9 hours late and one that misses 5 hours (a gap longer than the warm-up)."""
    bars = simulated_bars(
        sim_config(seed=13, gap_rate=0.002, max_gap_minutes=6), ["SIMA", "SIMB", "SIMC", "SIMD"], 3
    )
    start = bars["open_time"].min()
    assert isinstance(start, int)
    late = (pl.col("symbol") == "SIMC") & (pl.col("open_time") < start + 540 * ONE_MINUTE_MS)
    minute = (pl.col("open_time") - start) // ONE_MINUTE_MS
    outage = (pl.col("symbol") == "SIMD") & minute.is_between(2000, 2299)
    return bars.filter(~late & ~outage)


def test_equals_the_batch_engine_on_simulated_symbols_with_gaps() -> None:
    bars = simulated_universe()
    batch = compute_features(bars)
    starts = batch.filter(pl.col("segment").diff().over("symbol") != 0)
    assert starts.group_by("symbol").len()["len"].min() >= 3, "each symbol should have outages"
    assert starts["open_time"].n_unique() > starts.height // 2, "outages should differ by symbol"

    engine = IncrementalFeatures(["SIMA", "SIMB", "SIMC", "SIMD"], WINDOW_ROWS)
    incremental = replay(engine, bars, checkpoint_every=97)
    worst = scaled_difference(incremental, batch, median_abs(batch)).max()
    assert worst <= ENGINE_TOLERANCE
    assert incremental["symbol"].equals(batch["symbol"])


@pytest.mark.realdata
def test_the_real_year_in_pieces_equals_batch_and_offline(real_minutes: pl.DataFrame) -> None:
    """The year as 500 symbols advanced together: piece i holds the bars of block i and, before
    them, the 240 bars its warm-up needs (none for the first). Each piece equals the batch
    engine on the same bars, and its rows past the warm-up (the whole year after the first 240
    minutes) equal the offline features of the full history."""
    year = real_minutes.sort("open_time")
    n, pieces = year.height, 500
    block = -(-n // pieces)
    starts = [max(i * block - spec.WARMUP_BARS, 0) for i in range(pieces)]
    stops = [min((i + 1) * block, n) for i in range(pieces)]
    names = [f"P{i:03d}" for i in range(pieces)]
    folded = pl.concat(
        [
            year.slice(a, b - a).with_columns(pl.lit(name).alias("symbol"))
            for name, a, b in zip(names, starts, stops, strict=True)
        ]
    )
    engine = IncrementalFeatures(names, WINDOW_ROWS)
    # Pieces advance in lockstep (call t takes bar t of every piece), as symbols do live.
    arrays = engine.bar_arrays(folded)
    lengths = np.array(stops) - np.array(starts)
    first_row = np.r_[0, np.cumsum(lengths)[:-1]]
    rows = np.empty((len(arrays), len(FEATURES)))
    for step in range(int(lengths.max())):
        at = first_row[lengths > step] + step
        rows[at] = engine.advance(arrays.rows(at))
    incremental = folded.select("symbol", "open_time").hstack(
        pl.from_numpy(rows, schema=FEATURES).fill_nan(None)
    )

    batch = compute_features(folded)
    assert scaled_difference(incremental, batch, median_abs(batch)).max() <= ENGINE_TOLERANCE

    offline = compute_features(year)
    position = pl.int_range(pl.len()).over("symbol")
    warm = incremental.filter(position >= spec.WARMUP_BARS)
    assert warm.height == n - spec.WARMUP_BARS
    expected = offline.tail(n - spec.WARMUP_BARS)
    worst = scaled_difference(warm, expected, median_abs(offline)).max()
    assert worst <= ONLINE_RELATIVE_TOLERANCE


def one_symbol(rows: int) -> pl.DataFrame:
    return simulated_bars(sim_config(gap_rate=0.0), ["SIMA"], 1).head(rows)


def test_a_window_is_ready_once_the_warm_up_and_the_window_are_past() -> None:
    bars = one_symbol(spec.WARMUP_BARS + WINDOW_ROWS)
    engine = IncrementalFeatures(["SIMA", "SIMB"], WINDOW_ROWS)
    arrays = engine.bar_arrays(bars)
    rows = [engine.advance(arrays.rows(slice(i, i + 1))) for i in range(bars.height - 1)]
    windows = engine.windows()
    assert windows.values.shape == (2, WINDOW_ROWS, len(FEATURES))
    assert not windows.ready.any() and np.isnan(windows.values).all()
    rows.append(engine.advance(arrays.rows(slice(bars.height - 1, bars.height))))
    windows = engine.windows(np.array([0]))
    assert windows.ready.tolist() == [True]
    assert windows.open_time_ms.tolist() == [bars["open_time"][-1]]
    assert np.array_equal(windows.values[0], np.concatenate(rows[-WINDOW_ROWS:]))
    assert np.array_equal(windows.close[0], bars["close"].tail(WINDOW_ROWS).to_numpy())
    assert not np.isnan(windows.values).any()


def test_stale_bars_are_rejected_and_change_nothing() -> None:
    bars = one_symbol(spec.WARMUP_BARS + 20)
    engine = IncrementalFeatures(["SIMA", "SIMB"], WINDOW_ROWS)
    untouched = IncrementalFeatures(["SIMA", "SIMB"], WINDOW_ROWS)
    arrays = engine.bar_arrays(bars)
    for i in range(bars.height - 1):
        engine.advance(arrays.rows(slice(i, i + 1)))
        untouched.advance(arrays.rows(slice(i, i + 1)))
    for stale in (bars.height - 2, bars.height - 5):  # the last bar again, an older bar
        # Beside a valid first bar of SIMB: the whole call is refused.
        pair = replace(arrays.rows(np.array([stale, stale])), symbol=np.array([1, 0]))
        with pytest.raises(StaleBarError, match=r"1 bar.* not newer .*: SIMA at"):
            engine.advance(pair)
    assert np.array_equal(engine.segment_bars, [bars.height - 1, 0])
    assert np.array_equal(engine.windows().values, untouched.windows().values, equal_nan=True)
    # The next bar continues the segment as if nothing had happened.
    newest = arrays.rows(slice(bars.height - 1, bars.height))
    assert np.array_equal(engine.advance(newest), untouched.advance(newest))


def test_malformed_batches_are_rejected() -> None:
    engine = IncrementalFeatures(["SIMA", "SIMB"], WINDOW_ROWS)
    arrays = engine.bar_arrays(one_symbol(3))
    twice = replace(arrays.rows(slice(0, 2)), symbol=np.array([0, 0]))
    with pytest.raises(ValueError, match="more than once"):
        engine.advance(twice)
    outside = replace(arrays.rows(slice(0, 1)), symbol=np.array([2]))
    with pytest.raises(ValueError, match="indices"):
        engine.advance(outside)
    ragged = replace(arrays.rows(slice(0, 2)), close=np.ones(3))
    with pytest.raises(ValueError, match="equal length"):
        engine.advance(ragged)
    with pytest.raises(ValueError, match="SIMX"):
        engine.symbol_indices(["SIMA", "SIMX"])
    assert engine.advance(arrays.rows(slice(0, 0))).shape == (0, len(FEATURES))
    assert np.array_equal(engine.segment_bars, [0, 0])
    with pytest.raises(ValueError, match="window_rows"):
        IncrementalFeatures(["SIMA"], 0)
    with pytest.raises(ValueError, match="distinct"):
        IncrementalFeatures(["SIMA", "SIMA"], 4)
