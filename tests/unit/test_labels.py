"""Labels a trial trains on: a horizon's direction and the cost-aware triple barrier.

The triple-barrier cases are small enough to check by hand: every bar's close is 100, so a
barrier of 1% (0.01 in log units) is touched by a high >= 101.005 or a low <= 99.005.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from configs.schema import TripleBarrierConfig
from market.features import spec
from market.klines import ONE_MINUTE_MS
from market.sim_silver import silver_frame, simulated_bars
from models.dataset import (
    TIME_BARRIER_TARGET,
    MarketArrays,
    arrays_from_table,
    barrier_targets,
    barrier_widths,
    triple_barrier_labels,
    window_ends,
)
from tests.conftest import sim_config

NAN = float("nan")


def labels_of(high: list[float], low: list[float], horizon: int, barrier: float) -> list[float]:
    """Triple-barrier labels of flat-close bars (close 100), one segment, symmetric barriers
    of `barrier` log units."""
    n = len(high)
    close = np.full(n, 100.0)
    has_horizon = np.arange(n) + horizon < n
    width = np.full(n, barrier)
    labels = triple_barrier_labels(
        close, np.array(high), np.array(low), has_horizon, horizon, width, width
    )
    return labels.tolist()


def test_the_first_barrier_touched_decides_the_label() -> None:
    #        bar:   0      1      2      3      4      5      6      7      8      9
    high = [100.0, 100.5, 101.5, 100.0, 100.0, 100.2, 100.3, 102.0, 100.1, 100.0]
    low = [100.0, 99.5, 99.9, 98.5, 99.95, 98.0, 99.9, 97.5, 99.9, 100.0]
    labels = labels_of(high, low, horizon=3, barrier=0.01)
    expected = [
        1.0,  # bar 2's high (+1.49%) comes before any low
        1.0,  # the next bar is bar 2
        -1.0,  # bar 3's low (-1.5%)
        -1.0,  # bar 4 is quiet, then bar 5's low (-2%)
        -1.0,  # bar 5's low
        0.0,  # bar 6 quiet, then bar 7 touches both: their order inside the bar is unknown
        0.0,  # bar 7 touches both
    ]
    assert labels[:7] == expected
    # Bars 7..9 have no bar 3 minutes later: no label.
    assert all(math.isnan(v) for v in labels[7:])


def test_no_touch_within_the_horizon_is_the_time_barrier() -> None:
    high = [100.0, 100.9, 100.9, 100.9, 102.0]
    low = [100.0, 99.1, 99.1, 99.1, 100.0]
    # +-0.9% never reaches a 1% barrier; bar 4's +2% lies past bar 0's 3-bar horizon.
    assert labels_of(high, low, horizon=3, barrier=0.01)[:2] == [0.0, 1.0]
    assert labels_of(high, low, horizon=4, barrier=0.01)[0] == 1.0


def test_the_label_reads_no_bar_after_the_horizon() -> None:
    high = [100.0, 100.0, 100.0, 105.0]
    low = [100.0, 100.0, 100.0, 100.0]
    # A 2-bar horizon from bar 0 ends at bar 2: bar 3's spike is not seen.
    assert labels_of(high, low, horizon=2, barrier=0.01)[0] == 0.0
    assert labels_of(high, low, horizon=3, barrier=0.01)[0] == 1.0


def test_the_round_trip_cost_widens_both_barriers() -> None:
    bps = TripleBarrierConfig(unit="bps", profit_take=30.0, stop_loss=20.0)
    upper, lower = barrier_widths(bps, 10, round_trip_cost_bps=20.0, vol=np.array([0.002]))
    assert upper.tolist() == pytest.approx([0.005]) and lower.tolist() == pytest.approx([0.004])
    vol = TripleBarrierConfig(unit="vol", profit_take=2.0, stop_loss=1.0)
    upper, lower = barrier_widths(vol, 16, 20.0, np.array([0.001, NAN]))
    # 2 x 0.001 per bar x sqrt(16 bars) + 20 bps; NaN where the volatility is unknown.
    assert upper[0] == pytest.approx(0.008 + 0.002) and lower[0] == pytest.approx(0.004 + 0.002)
    assert math.isnan(upper[1]) and math.isnan(lower[1])
    # A 31 bps move clears a 30 bps profit-take only without costs: with 20 bps of round trip
    # the same bar is a time-barrier 0, not a +1 that would lose money after costs.
    high, low = np.array([100.0, 100.0 * math.exp(0.0031)]), np.array([100.0, 100.0])
    close, has = np.array([100.0, 100.0]), np.array([True, False])
    free = barrier_widths(bps, 1, 0.0, np.zeros(2))
    costly = barrier_widths(bps, 1, 20.0, np.zeros(2))
    assert triple_barrier_labels(close, high, low, has, 1, *free)[0] == 1.0
    assert triple_barrier_labels(close, high, low, has, 1, *costly)[0] == 0.0


def test_barrier_labels_become_classification_targets() -> None:
    targets = barrier_targets(np.array([1.0, -1.0, 0.0, NAN], dtype=np.float32))
    assert targets[:3].tolist() == [1.0, 0.0, TIME_BARRIER_TARGET]
    assert math.isnan(targets[3])


@pytest.fixture(scope="module")
def frame() -> pl.DataFrame:
    """Two simulated days of one symbol's Silver, with a few outages."""
    return silver_frame(simulated_bars(sim_config(seed=4, gap_rate=0.0005), ["SIMA"], 2))


@pytest.fixture(scope="module")
def arrays(frame: pl.DataFrame) -> MarketArrays:
    return arrays_from_table(frame.to_arrow())


def brute_force_labels(arrays: MarketArrays, horizon: int, upper: float, lower: float) -> list:
    """Bar by bar from the definition: bars t+1..t+h of t's segment, first touch wins."""
    assert arrays.high is not None and arrays.low is not None
    out = []
    for t in range(arrays.bars):
        ahead = t + horizon
        if ahead >= arrays.bars or arrays.segment[ahead] != arrays.segment[t]:
            out.append(None)
            continue
        label = 0.0
        for k in range(t + 1, ahead + 1):
            up = math.log(arrays.high[k] / arrays.close[t]) >= upper
            down = math.log(arrays.low[k] / arrays.close[t]) <= -lower
            if up or down:
                label = 0.0 if up and down else (1.0 if up else -1.0)
                break
        out.append(label)
    return out


def test_triple_barrier_labels_of_silver_match_the_definition(arrays: MarketArrays) -> None:
    config = TripleBarrierConfig(unit="bps", profit_take=8.0, stop_loss=8.0)
    labelled = arrays.labelled(30, "triple_barrier", config, round_trip_cost_bps=4.0)
    expected = brute_force_labels(arrays, 30, 12e-4, 12e-4)
    got = labelled.target_up
    assert len(set(expected) - {None}) == 3, "the simulated day should touch every barrier"
    for t, label in enumerate(expected):
        if label is None:
            assert math.isnan(got[t]), t
        else:
            assert got[t] == {1.0: 1.0, -1.0: 0.0, 0.0: TIME_BARRIER_TARGET}[label], t
    # In volatility units the barriers need rv_60: no label during the warm-up.
    scaled = TripleBarrierConfig(unit="vol", profit_take=1.0, stop_loss=1.0)
    by_vol = arrays.labelled(30, "triple_barrier", scaled, round_trip_cost_bps=4.0).target_up
    warm = np.isfinite(arrays.inputs).all(axis=1)
    assert np.isnan(by_vol[~warm]).all()
    assert set(np.unique(by_vol[warm & np.isfinite(arrays.forward_returns[30])])) == {
        0.0,
        TIME_BARRIER_TARGET,
        1.0,
    }
    # The regression target stays the horizon's return; accuracy is scored on its direction.
    assert np.array_equal(labelled.target_ret, arrays.forward_returns[30], equal_nan=True)
    assert labelled.direction_up is not None
    known = np.isfinite(labelled.target_ret)
    assert np.array_equal(labelled.direction_up[known], labelled.target_ret[known] > 0)


@pytest.mark.parametrize("horizon", spec.TARGET_HORIZONS_BARS)
def test_a_horizon_picks_its_silver_targets_and_keeps_labels_in_range(
    frame: pl.DataFrame, arrays: MarketArrays, horizon: int
) -> None:
    labelled = arrays.labelled(horizon)
    assert labelled.horizon_bars == horizon and labelled.label == "direction"
    ret = frame[spec.target_ret_column(horizon)].cast(pl.Float32).fill_null(NAN).to_numpy()
    up = frame[spec.target_up_column(horizon)].cast(pl.Float32).fill_null(NAN).to_numpy()
    assert np.array_equal(labelled.target_ret, ret, equal_nan=True)
    assert np.array_equal(labelled.target_up, up, equal_nan=True)
    end_ms = int(arrays.open_time_ms[3 * arrays.bars // 4])
    ends = window_ends(labelled, 0, end_ms, 30, labelled=True)
    assert len(ends) > 0
    assert labelled.open_time_ms[ends].max() + horizon * ONE_MINUTE_MS < end_ms


def test_unknown_horizons_labels_and_missing_prices_are_refused(arrays: MarketArrays) -> None:
    with pytest.raises(ValueError, match="no 15-bar target"):
        arrays.labelled(15)
    with pytest.raises(ValueError, match="unknown label"):
        arrays.labelled(10, "trend")
    with pytest.raises(ValueError, match="high and low"):
        replace(arrays, high=None).labelled(10, "triple_barrier")
    with pytest.raises(ValueError, match="high and low"):
        replace(arrays, high=None).labelled(10, "meta")
