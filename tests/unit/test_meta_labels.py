"""The `meta` label: a primary rule proposes a side, the label says whether that side's trade
cleared the round-trip cost within the horizon, and the backtest trades the side only when the
meta model's probability passes the threshold.

The hand-made cases keep every close at 100, so a barrier of 1% (0.01 in log units) is touched
by a high >= 101.005 or a low <= 99.005.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from configs.schema import BacktestConfig, MetaLabelConfig, TripleBarrierConfig
from market.features.spec import HORIZON_BARS
from market.sim_silver import silver_frame, simulated_bars
from models.backtest import BUY, NEUTRAL, SELL, meta_signals
from models.dataset import INPUT_COLUMNS, arrays_from_table, meta_labels, primary_sides
from models.evaluation import OutOfSampleBars, evaluate
from models.folds import make_folds
from models.gate import GateDecision
from models.networks import ModelSpec
from models.selection import _refuse_unservable
from tests.conftest import sim_config
from tests.unit.test_fee_scenarios import FOLDS
from tests.unit.test_gate_and_evaluation import two_symbols
from tests.unit.test_model_data import T0

NAN = float("nan")


def meta_of(
    high: list[float],
    low: list[float],
    side: list[float],
    horizon: int,
    *,
    profit: float = 0.01,
    stop: float = 0.01,
    forward: list[float] | None = None,
    cost_bps: float = 0.0,
) -> list[float]:
    """Meta labels of flat-close bars (close 100): the long's profit-take `profit` and stop
    `stop` log units away (a short's mirrored); `forward` defaults to 0 where t+h exists."""
    n = len(high)
    has_horizon = np.arange(n) + horizon < n
    fwd = np.array(forward) if forward is not None else np.where(has_horizon, 0.0, NAN)
    labels = meta_labels(
        np.full(n, 100.0),
        np.array(high),
        np.array(low),
        fwd,
        horizon,
        np.array(side, dtype=np.float32),
        np.full(n, profit),
        np.full(n, stop),
        cost_bps,
    )
    return labels.tolist()


def test_a_side_wins_when_its_own_profit_take_comes_first() -> None:
    #      bar:  0      1      2      3      4
    high = [100.0, 101.5, 100.0, 100.0, 100.0]
    low = [100.0, 100.0, 98.5, 100.0, 100.0]
    # From bar 0 the +1.5% high comes first: a long wins, a short is stopped out.
    assert meta_of(high, low, [1, 0, 0, 0, 0], horizon=2)[0] == 1.0
    assert meta_of(high, low, [-1, 0, 0, 0, 0], horizon=2)[0] == 0.0
    # From bar 1 the -1.5% low comes first: a short wins, a long is stopped out.
    assert meta_of(high, low, [0, -1, 0, 0, 0], horizon=2)[1] == 1.0
    assert meta_of(high, low, [0, 1, 0, 0, 0], horizon=2)[1] == 0.0


def test_a_short_mirrors_asymmetric_barriers() -> None:
    # Profit-take 2%, stop 1%: a short takes profit at -2% and stops at +1%.
    high = [100.0, 100.0, 101.5]
    low = [100.0, 98.5, 100.0]
    # The -1.5% low is not a short's 2% profit; the +1.5% high after it is its 1% stop.
    assert meta_of(high, low, [-1, 0, 0], horizon=2, profit=0.02, stop=0.01)[0] == 0.0
    # A long on the same bars: -1.5% is its stop (1%).
    assert meta_of(high, low, [1, 0, 0], horizon=2, profit=0.02, stop=0.01)[0] == 0.0
    low[1] = 97.5  # -2.5%: the short's profit-take now comes first
    assert meta_of(high, low, [-1, 0, 0], horizon=2, profit=0.02, stop=0.01)[0] == 1.0


def test_both_barriers_in_one_bar_count_as_a_failure() -> None:
    high = [100.0, 102.0, 100.0]
    low = [100.0, 98.0, 100.0]
    assert meta_of(high, low, [1, 0, 0], horizon=2)[0] == 0.0
    assert meta_of(high, low, [-1, 0, 0], horizon=2)[0] == 0.0


def test_a_timed_out_trade_wins_only_beyond_the_cost() -> None:
    # No barrier within 2 bars; the horizon's log return decides against a 20 bps round trip.
    high = [100.0, 100.5, 100.5, 100.0]
    low = [100.0, 99.5, 99.5, 100.0]
    for forward, long_wins, short_wins in (
        (0.003, 1.0, 0.0),  # +30 bps: a long clears 20 bps
        (0.001, 0.0, 0.0),  # +10 bps: neither side pays the round trip
        (-0.003, 0.0, 1.0),  # -30 bps: a short clears it
    ):
        fwd = [forward, NAN, NAN, NAN]
        assert meta_of(high, low, [1, 0, 0, 0], 2, forward=fwd, cost_bps=20.0)[0] == long_wins
        assert meta_of(high, low, [-1, 0, 0, 0], 2, forward=fwd, cost_bps=20.0)[0] == short_wins


def test_no_side_or_no_horizon_has_no_label() -> None:
    high = [100.0, 101.5, 100.0, 100.0]
    low = [100.0, 100.0, 100.0, 100.0]
    labels = meta_of(high, low, [0, 1, 1, 1], horizon=2)
    # Bar 0 proposes nothing; bars 2 and 3 have no bar 2 minutes later.
    assert math.isnan(labels[0]) and labels[1] == 0.0
    assert all(math.isnan(v) for v in labels[2:])


def test_the_label_reads_no_bar_after_the_horizon() -> None:
    high = [100.0, 100.0, 100.0, 105.0]
    low = [100.0, 100.0, 100.0, 100.0]
    assert meta_of(high, low, [1, 0, 0, 0], horizon=2)[0] == 0.0
    assert meta_of(high, low, [1, 0, 0, 0], horizon=3)[0] == 1.0


def test_the_primary_rule_is_the_sign_of_a_model_input() -> None:
    j = INPUT_COLUMNS.index("ret_10")
    inputs = np.zeros((4, len(INPUT_COLUMNS)), dtype=np.float32)
    inputs[:, j] = [0.002, -0.001, 0.0, NAN]
    momentum = primary_sides(inputs, MetaLabelConfig())
    assert momentum.tolist() == [1.0, -1.0, 0.0, 0.0]
    reversal = primary_sides(inputs, MetaLabelConfig(primary_rule="reversal"))
    assert reversal.tolist() == [-1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="not a model input"):
        primary_sides(inputs, MetaLabelConfig(primary_feature="sma_20"))


def test_meta_signals_trade_the_primary_side_past_the_threshold() -> None:
    config = BacktestConfig(p_up_threshold=0.6)
    p = np.array([0.7, 0.7, 0.59, 0.6, 0.9, NAN])
    side = np.array([1.0, -1.0, 1.0, -1.0, 0.0, 1.0])
    assert meta_signals(p, side, config).tolist() == [BUY, SELL, NEUTRAL, SELL, NEUTRAL, NEUTRAL]


def _meta_record(p_meta: float, sizing: str = "all_in") -> dict[str, float]:
    """Walk-forward record of a meta model answering `p_meta` on every test bar, the primary
    side alternating in runs of 50 bars."""
    arrays = arrays_from_table(two_symbols(np.arange(0, 1500)))
    side = np.where((np.arange(arrays.bars) // 50) % 2 == 0, 1.0, -1.0).astype(np.float32)
    arrays = replace(arrays, primary_side=side, label="meta")
    folds = make_folds(T0, int(arrays.open_time_ms.max()), FOLDS)
    test = OutOfSampleBars.of(arrays, folds)
    p = np.full(len(test.rows), p_meta)
    config = BacktestConfig(sizing=sizing)  # type: ignore[arg-type]
    return evaluate("meta", arrays, folds, test, config, np.zeros(len(test.rows)), p).metrics


def test_the_backtest_trades_only_what_the_meta_model_accepts() -> None:
    # Below the threshold nothing trades, whatever the primary side says.
    assert _meta_record(0.54)["trades"] == 0.0
    accepted = _meta_record(0.9)
    assert accepted["trades"] > 0 and accepted["exposure"] > 0.5
    # Probability sizing: p = 0.65 is (0.65 - 0.5) / (0.75 - 0.5) = 60% of equity, on the
    # same bars: the same exposure (share of bars held), 60% of the turnover.
    sized = _meta_record(0.65, "probability")
    assert sized["exposure"] == accepted["exposure"]
    assert sized["turnover"] == pytest.approx(0.6 * accepted["turnover"], rel=1e-9)


def _meta_arrays(table: pa.Table, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = arrays_from_table(table).labelled(
        horizon,
        "meta",
        TripleBarrierConfig(profit_take=5.0, stop_loss=5.0),
        round_trip_cost_bps=4.0,
        meta=MetaLabelConfig(),
    )
    assert arrays.primary_side is not None
    return arrays.open_time_ms, arrays.target_up, arrays.primary_side


def test_labels_and_sides_are_causal_on_simulated_bars() -> None:
    """Silver computed on bars cut right after bar t + h gives the same side at every bar and
    the same label at every bar up to t: no label reads past its horizon, no side (feature)
    reads the future."""
    horizon = HORIZON_BARS
    bars = simulated_bars(sim_config(gap_rate=0.0), ["SIMAAA"], 2)
    full = silver_frame(bars).to_arrow()
    cut_at = 2000
    cut = silver_frame(bars.head(cut_at + horizon + 1)).to_arrow()
    times, labels, sides = _meta_arrays(full, horizon)
    cut_times, cut_labels, cut_sides = _meta_arrays(cut, horizon)
    n = len(cut_times)
    assert np.array_equal(times[:n], cut_times)
    np.testing.assert_array_equal(sides[:n], cut_sides)
    np.testing.assert_array_equal(labels[: cut_at + 1], cut_labels[: cut_at + 1])
    # Past warm-up the primary rule proposes a side at (nearly) every bar, and both outcomes
    # occur: a constant label would make this test unable to fail.
    known = labels[~np.isnan(labels)]
    assert len(known) > 1500 and 0.1 < known.mean() < 0.9


def test_a_meta_candidate_is_registered_but_never_promoted() -> None:
    """Serve decides on P(up); a meta model's probability is about the primary side, so the
    sweep keeps it out of production whatever its score."""
    passed = GateDecision(True, "t1", 0.99, 4, ["passed: DSR, baselines"])
    _refuse_unservable(
        passed, ModelSpec(family="gru", input_size=3, hidden_size=4, window_bars=8, label="meta")
    )
    assert not passed.promoted and passed.reasons == [
        "label 'meta' is research-only: Serve does not compute its decisions"
    ]
    direction = GateDecision(True, "t2", 0.99, 4, ["passed"])
    _refuse_unservable(
        direction, ModelSpec(family="gru", input_size=3, hidden_size=4, window_bars=8)
    )
    assert direction.promoted
