"""Online features over the latest `min_history_bars(window)` bars equal the offline features over
the full history for the newest `window` rows (DESIGN.md section 4: no training/serving skew)."""

from __future__ import annotations

from datetime import date

import numpy as np
import polars as pl
import pytest

from configs.schema import FeedConfig
from market.features import spec
from market.features.polars_engine import compute_features
from market.sim_silver import simulated_bars
from serve.engine.feed import BarFeed
from serve.engine.online_features import (
    CONVERGENCE_BARS,
    ONLINE_RELATIVE_TOLERANCE,
    latest_features,
    min_history_bars,
)
from tests.conftest import REAL_1M, read_real_minutes, require, sim_config

FEATURES = list(spec.FEATURE_COLUMNS)


def scaled_difference(
    online: pl.DataFrame, offline: pl.DataFrame, median_abs: np.ndarray
) -> np.ndarray:
    """|online - offline| / max(|offline|, the column's median |offline|), per row and feature.

    The scale DESIGN.md section 4 judges the engines by: series that cross zero (MACD) are
    measured at their own typical size. Both frames must have the same rows in the same order.
    """
    assert online["open_time"].equals(offline["open_time"])
    on = online.select(FEATURES).to_numpy()
    off = offline.select(FEATURES).to_numpy()
    # Null (warm-up) must be null in both engines; compare values where both have one.
    assert np.array_equal(np.isnan(on), np.isnan(off))
    scale = np.maximum(np.abs(off), median_abs)
    return np.nan_to_num(np.abs(on - off) / scale, nan=0.0)


def check_online_equals_offline(bars: pl.DataFrame, window: int, ends: list[int]) -> float:
    """Worst scaled difference of the last `window` rows over the bars ending at each of `ends`.

    Each online history (the `min_history_bars(window)` bars before an end) runs as a symbol of
    its own, so one engine call computes them all.
    """
    bars = bars.sort("open_time")
    offline = compute_features(bars)
    median_abs = np.nanmedian(np.abs(offline.select(FEATURES).to_numpy()), axis=0)
    history = min_history_bars(window)
    pieces = [
        bars.slice(end - history, history).with_columns(pl.lit(f"end{end:07d}").alias("symbol"))
        for end in ends
    ]
    online = latest_features(pl.concat(pieces))
    worst = 0.0
    for end in ends:
        mine = online.filter(pl.col("symbol") == f"end{end:07d}")
        assert mine.height == history
        expected = offline.slice(end - window, window)
        difference = scaled_difference(mine.tail(window), expected, median_abs)
        worst = max(worst, float(difference.max()))
    return worst


def test_min_history_bars_covers_the_warm_up_and_the_window() -> None:
    assert CONVERGENCE_BARS >= spec.WARMUP_BARS
    for window in (1, 16, 60, 240):
        assert min_history_bars(window) == CONVERGENCE_BARS + window
    for bad in (0, -5):
        with pytest.raises(ValueError, match="window_bars"):
            min_history_bars(bad)


@pytest.mark.parametrize("window", [1, 16, 60, 240])
def test_online_features_equal_offline_on_simulated_bars(window: int) -> None:
    bars = simulated_bars(sim_config(gap_rate=0.0), ["SIMAAA"], 2)
    ends = [*range(min_history_bars(window), bars.height, 61), bars.height]
    worst = check_online_equals_offline(bars, window, ends)
    assert worst <= ONLINE_RELATIVE_TOLERANCE


def test_online_features_with_outages_in_the_history_equal_offline() -> None:
    """A missing minute starts a new segment in both engines, so gaps keep them equal."""
    bars = simulated_bars(sim_config(gap_rate=0.002, max_gap_minutes=4), ["SIMGAP"], 3)
    assert bars.height < 3 * 1440
    ends = list(range(700, bars.height + 1, 37))
    assert check_online_equals_offline(bars, 60, ends) <= ONLINE_RELATIVE_TOLERANCE


def test_fewer_bars_leave_the_newest_rows_in_the_warm_up() -> None:
    bars = simulated_bars(sim_config(gap_rate=0.0), ["SIMAAA"], 1)
    window = 16
    short = latest_features(bars.tail(min_history_bars(window) - 1)).tail(window)
    assert short["rsi_14"].null_count() == 1  # the oldest row of the window is still warming up
    full = latest_features(bars.tail(min_history_bars(window))).tail(window)
    assert full.select(FEATURES).null_count().sum_horizontal().item() == 0
    assert np.isfinite(full.select(FEATURES).to_numpy()).all()


def test_latest_features_of_a_replay_feed_equal_offline() -> None:
    """The feed's bars feed the online engine as they are (columns, dtypes, order)."""
    window = 32
    config = sim_config(gap_rate=0.0, anchor_date=date(2024, 3, 1))
    now = [1_900_000_000.0]
    feed = BarFeed(
        FeedConfig(
            source="sim",
            symbols=["SIMAAA"],
            history_bars=min_history_bars(window),
            replay_bars_per_s=4.0,
            sim=config,
            sim_days=1,
        ),
        clock=lambda: now[0],
    )
    feed.poll()
    now[0] += 100.0
    feed.poll()
    online = latest_features(feed.bars("SIMAAA")).tail(window)
    offline = compute_features(simulated_bars(config, ["SIMAAA"], 1))
    median_abs = np.nanmedian(np.abs(offline.select(FEATURES).to_numpy()), axis=0)
    expected = offline.filter(pl.col("open_time").is_in(online["open_time"].implode()))
    worst = scaled_difference(online, expected, median_abs).max()
    assert worst <= ONLINE_RELATIVE_TOLERANCE


def test_latest_features_rejects_frames_without_the_bar_columns() -> None:
    bars = simulated_bars(sim_config(gap_rate=0.0), ["SIMAAA"], 1).drop("taker_buy_base")
    with pytest.raises(ValueError, match="taker_buy_base"):
        latest_features(bars)


@pytest.mark.realdata
def test_online_features_equal_offline_on_real_btc_minutes() -> None:
    bars = read_real_minutes(require(REAL_1M), n_rows=20_000)
    window = 240
    ends = [*range(min_history_bars(window), bars.height + 1, 499), bars.height]
    worst = check_online_equals_offline(bars, window, ends)
    assert worst <= ONLINE_RELATIVE_TOLERANCE
    newest = latest_features(bars.tail(min_history_bars(window))).tail(window)
    assert np.isfinite(newest.select(FEATURES).to_numpy()).all()
