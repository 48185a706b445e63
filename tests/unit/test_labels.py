"""Labels a trial trains on: a horizon's direction."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from market.features import spec
from market.klines import ONE_MINUTE_MS
from market.sim_silver import silver_frame, simulated_bars
from models.dataset import (
    MarketArrays,
    arrays_from_table,
    window_ends,
)
from tests.conftest import sim_config

NAN = float("nan")


@pytest.fixture(scope="module")
def frame() -> pl.DataFrame:
    """Two simulated days of one symbol's Silver, with a few outages."""
    return silver_frame(simulated_bars(sim_config(seed=4, gap_rate=0.0005), ["SIMA"], 2))


@pytest.fixture(scope="module")
def arrays(frame: pl.DataFrame) -> MarketArrays:
    return arrays_from_table(frame.to_arrow())


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
        arrays.labelled(10, "meta")
