"""Cross-asset inputs: every symbol's same-minute return, aligned causally on open_time, for one
global model over several symbols; and the simulator's correlated symbols they are tested on."""

from __future__ import annotations

from datetime import date

import numpy as np
import polars as pl
import pytest

from configs.schema import SimConfig
from market.klines import ONE_MINUTE_MS
from market.sim_silver import silver_frame, simulated_bars
from market.sources.sim import MarketSimulator, simulate_symbols
from models.dataset import (
    INPUT_COLUMNS,
    MarketArrays,
    Scaler,
    arrays_from_table,
    cross_asset_columns,
    window_ends,
)
from models.gate import GateDecision
from models.networks import ModelSpec
from models.selection import _refuse_unservable
from models.sweep import spec_of
from models.training import trial_arrays
from tests.unit.test_horizon_search import trial_config

SYMBOLS = ["SIMAAA", "SIMBBB", "SIMCCC"]
CORRELATED = SimConfig(seed=9, anchor_date=date(2024, 3, 1), market_correlation=0.6)


@pytest.fixture(scope="module")
def bars() -> pl.DataFrame:
    return simulated_bars(CORRELATED, SYMBOLS, 1)


def arrays_of(bars: pl.DataFrame) -> MarketArrays:
    return arrays_from_table(silver_frame(bars).to_arrow()).with_cross_asset(SYMBOLS)


def test_the_simulator_correlates_symbols_and_stays_vectorised_bit_for_bit() -> None:
    block = simulate_symbols(CORRELATED, SYMBOLS[:2], 2)
    for k, symbol in enumerate(SYMBOLS[:2]):
        days = MarketSimulator(CORRELATED, symbol).days(date(2024, 3, 1), date(2024, 3, 2))
        expected = np.concatenate([day.close for _, day in days])
        assert np.array_equal(block.close[k], expected)
    returns = np.diff(np.log(block.close), axis=1)
    assert np.corrcoef(returns)[0, 1] == pytest.approx(0.6, abs=0.05)
    independent = simulate_symbols(
        CORRELATED.model_copy(update={"market_correlation": 0.0}), SYMBOLS[:2], 2
    )
    assert abs(np.corrcoef(np.diff(np.log(independent.close), axis=1))[0, 1]) < 0.05


def test_columns_hold_each_symbols_same_minute_return_mask_and_identity(
    bars: pl.DataFrame,
) -> None:
    arrays = arrays_of(bars)
    n = len(SYMBOLS)
    assert arrays.input_columns == INPUT_COLUMNS + cross_asset_columns(SYMBOLS)
    assert arrays.inputs.shape == (arrays.bars, len(INPUT_COLUMNS) + 3 * n)
    assert arrays.input_columns[len(INPUT_COLUMNS)] == "xret_SIMAAA"
    extra = arrays.inputs[:, len(INPUT_COLUMNS) :]
    slices = arrays.symbol_slices()
    closes = {s: np.log(arrays.close[slices[s]]) for s in SYMBOLS}
    # One minute of SIMAAA's rows: every column is the named symbol's return into that minute.
    row = slices["SIMAAA"].start + 500
    for k, symbol in enumerate(SYMBOLS):
        i = 500  # no gaps: minute 500 of each symbol is its row 500
        assert extra[row, k] == pytest.approx(closes[symbol][i] - closes[symbol][i - 1], rel=1e-5)
        assert extra[row, n + k] == 1.0
        assert extra[row, 2 * n + k] == (1.0 if symbol == "SIMAAA" else 0.0)
    # A symbol's own column is its ret_1 (where Silver has one).
    own = extra[slices["SIMBBB"], 1]
    ret_1 = arrays.inputs[slices["SIMBBB"], INPUT_COLUMNS.index("ret_1")]
    known = np.isfinite(ret_1)
    np.testing.assert_allclose(own[known], ret_1[known], rtol=1e-5, atol=1e-9)
    # The first minute has no return into it: 0 and mask 0.
    assert extra[slices["SIMAAA"].start, 0] == 0.0 and extra[slices["SIMAAA"].start, n] == 0.0
    # The correlated market shows in the columns.
    assert np.corrcoef(extra[slices["SIMAAA"], 0], extra[slices["SIMAAA"], 1])[0, 1] > 0.4


def test_missing_bars_give_zero_and_mask_not_dropped_rows(bars: pl.DataFrame) -> None:
    start = int(bars["open_time"].to_numpy().min())
    gone = start + np.array([700, 701]) * ONE_MINUTE_MS  # SIMBBB loses minutes 700 and 701
    holed = bars.filter(~((pl.col("symbol") == "SIMBBB") & pl.col("open_time").is_in(gone)))
    arrays = arrays_of(holed)
    n = len(SYMBOLS)
    extra = arrays.inputs[:, len(INPUT_COLUMNS) :]
    aaa = arrays.symbol_slices()["SIMAAA"]
    assert aaa.stop - aaa.start == 1440  # SIMAAA keeps every row
    # SIMAAA's rows at 700, 701 (SIMBBB absent) and 702 (no SIMBBB bar at 701): 0, mask 0.
    for minute in (700, 701, 702):
        assert extra[aaa.start + minute, 1] == 0.0 and extra[aaa.start + minute, n + 1] == 0.0
    assert extra[aaa.start + 703, n + 1] == 1.0
    # Cross-asset inputs are never missing, so they leave the valid windows as they were.
    plain = arrays_from_table(silver_frame(holed).to_arrow())
    t0, t1 = int(arrays.open_time_ms.min()), int(arrays.open_time_ms.max()) + 1
    ends = window_ends(arrays, t0, t1, 30, labelled=True)
    assert np.array_equal(ends, window_ends(plain, t0, t1, 30, labelled=True))


def test_changing_one_symbols_future_leaves_every_earlier_input_unchanged(
    bars: pl.DataFrame,
) -> None:
    start = int(bars["open_time"].to_numpy().min())
    cut = start + 900 * ONE_MINUTE_MS
    shocked = bars.with_columns(
        pl.when((pl.col("symbol") == "SIMCCC") & (pl.col("open_time") > cut))
        .then(pl.col(c) * 1.05)
        .otherwise(pl.col(c))
        .alias(c)
        for c in ("open", "high", "low", "close")
    )
    before, after = arrays_of(bars), arrays_of(shocked)
    past = before.open_time_ms <= cut
    extra = slice(len(INPUT_COLUMNS), None)
    np.testing.assert_array_equal(before.inputs[past, extra], after.inputs[past, extra])
    # ... and the change does show at the first later minute, in every symbol's rows.
    first_after = before.open_time_ms == cut + ONE_MINUTE_MS
    assert not np.array_equal(before.inputs[first_after, extra], after.inputs[first_after, extra])


def test_cross_asset_inputs_are_deterministic_and_fit_a_scaler(bars: pl.DataFrame) -> None:
    first, second = arrays_of(bars), arrays_of(bars)
    np.testing.assert_array_equal(first.inputs, second.inputs)
    t0, t1 = int(first.open_time_ms.min()), int(first.open_time_ms.max()) + 1
    scaler = Scaler.fit(first, window_ends(first, t0, t1, 30, labelled=True), 30)
    assert scaler.columns == first.input_columns
    assert Scaler.from_json(scaler.to_json()).columns == first.input_columns
    with pytest.raises(ValueError, match="already carry"):
        first.with_cross_asset(SYMBOLS)
    with pytest.raises(ValueError, match="SIMZZZ"):
        arrays_from_table(silver_frame(bars).to_arrow()).with_cross_asset(["SIMZZZ"])


def test_a_cross_asset_trial_spec_reads_the_swept_universe(bars: pl.DataFrame) -> None:
    config = {**trial_config(10, "direction"), "cross_asset": True}
    spec = spec_of(config, SYMBOLS)
    assert spec.cross_asset_symbols == tuple(SYMBOLS)
    assert spec.input_size == len(INPUT_COLUMNS) + 3 * len(SYMBOLS)
    assert spec_of({**config, "cross_asset": False}, SYMBOLS).input_size == len(INPUT_COLUMNS)
    assert ModelSpec.model_validate_json(spec.model_dump_json()) == spec
    plain = arrays_from_table(silver_frame(bars).to_arrow())
    arrays = trial_arrays(plain, {"horizon_bars": 10}, spec)
    assert arrays.inputs.shape[1] == spec.input_size


def test_a_cross_asset_candidate_is_never_promoted() -> None:
    """Serve builds each symbol's inputs apart, so a cross-asset model stays registered only."""
    decision = GateDecision(True, "t1", 0.99, 4, ["passed"])
    spec = spec_of({**trial_config(10, "direction"), "cross_asset": True}, SYMBOLS)
    _refuse_unservable(decision, spec)
    assert not decision.promoted
    assert decision.reasons == ["cross-asset inputs are research-only: Serve does not build them"]
