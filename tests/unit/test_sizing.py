"""Probability sizing, rebalance fees and the fee side, on hand-computed few-bar cases."""

from __future__ import annotations

import numpy as np
import pytest

from configs.schema import BacktestConfig
from models.backtest import BUY, SELL, backtest_positions, probability_sizes, run_backtest

# One block of six bars. BUY at close 0 (p_up 0.65), BUY again at close 1 (p_up 0.70, a re-size),
# SELL at close 3 (p_up 0.35, a reversal); every signal holds for two decisions.
OPEN = np.array([100.0, 100.0, 110.0, 99.0, 99.0, 90.0])
SIGNALS = np.array([BUY, BUY, 0, SELL, 0, 0], dtype=np.int8)
P_UP = np.array([0.65, 0.70, 0.5, 0.35, 0.5, 0.5])
BLOCKS = np.zeros(6, dtype=np.int64)


def _config(**update: object) -> BacktestConfig:
    # 10 bps taker fee, no slippage: c = 0.001 per unit of turnover.
    base = {"sizing": "probability", "full_size_p_up": 0.75, "hold_bars": 2}
    return BacktestConfig(**{**base, **update})  # type: ignore[arg-type]


def test_probability_sizes_map_p_up_linearly_to_full_size() -> None:
    cfg = _config()
    p = np.array([0.5, 0.55, 0.65, 0.75, 0.9, 0.3, np.nan])
    # |p - 0.5| / 0.25, clipped to [0, 1]; NaN -> 0
    assert probability_sizes(p, cfg) == pytest.approx([0.0, 0.2, 0.6, 1.0, 1.0, 0.8, 0.0])


def test_probability_sizing_long_short_rebalances_and_reverses() -> None:
    result = run_backtest(OPEN, SIGNALS, BLOCKS, _config(), P_UP)
    # targets: 0.6 (bar 0), 0.8 (bar 1's re-size), 0.8, -0.6 (reversal), -0.6, 0 (expiry);
    # held one bar later, the block's last bar flat.
    assert result.positions.tolist() == pytest.approx([0.0, 0.6, 0.8, 0.8, -0.6, 0.0])
    c = 0.001
    e1 = 1.0 * (1.0 - c * 0.6)  # entry, no move yet
    e2 = e1 * (1.0 + 0.6 * 0.10) * (1.0 - c * 0.2)  # +10% on 0.6, re-size 0.6 -> 0.8
    e3 = e2 * (1.0 + 0.8 * -0.10)  # -10% on 0.8, no fill
    e4 = e3 * (1.0 - c * 1.4)  # flat price, reversal 0.8 -> -0.6
    e5 = e4 * (1.0 + -0.6 * (90.0 / 99.0 - 1.0)) * (1.0 - c * 0.6)  # short gains, exit
    assert result.equity == pytest.approx([1.0, e1, e2, e3, e4, e5], rel=1e-12)
    fees = 0.6 * c + e1 * 1.06 * 0.2 * c + e3 * 1.4 * c + e4 * (1 + 0.6 / 11) * 0.6 * c
    assert result.fees_paid == pytest.approx(fees, rel=1e-12)
    assert result.fills == 4
    # round trips: the long (bars 1-3, closed at open 4), the short (bar 4, closed at open 5)
    assert result.trade_pnls == pytest.approx([e4 - 1.0, e5 / e3 - 1.0], rel=1e-12)
    gross = np.cumprod([1.0, 1.0, 1.06, 0.92, 1.0, 1.0 + 0.6 / 11])
    assert np.cumprod(1.0 + result.gross_returns) == pytest.approx(gross, rel=1e-12)


def test_probability_sizing_long_only_closes_on_sell() -> None:
    result = run_backtest(OPEN, SIGNALS, BLOCKS, _config(mode="long_only"), P_UP)
    assert result.positions.tolist() == pytest.approx([0.0, 0.6, 0.8, 0.8, 0.0, 0.0])
    c = 0.001
    e1 = 1.0 - c * 0.6
    e2 = e1 * 1.06 * (1.0 - c * 0.2)
    e3 = e2 * 0.92
    e4 = e3 * (1.0 - c * 0.8)  # the SELL only closes the long
    assert result.equity == pytest.approx([1.0, e1, e2, e3, e4, e4], rel=1e-12)


def test_all_in_sizing_ignores_p_up() -> None:
    result = run_backtest(OPEN, SIGNALS, BLOCKS, _config(sizing="all_in"), P_UP)
    assert result.positions.tolist() == [0.0, 1.0, 1.0, 1.0, -1.0, 0.0]
    f = 0.001
    # long 100 -> 99 all in, fee on both legs; then short 99 -> 90 (vectorbt's all-in short)
    long_factor = 0.99 * (1 - f) / (1 + f)
    short_factor = 2.0 / (1 + f) - 90.0 / 99.0
    assert result.equity[-1] == pytest.approx(long_factor * short_factor, rel=1e-12)
    assert result.trade_pnls == pytest.approx([long_factor - 1.0, short_factor - 1.0])


def test_rebalance_fees_follow_fee_side_and_slippage() -> None:
    flat = np.full(6, 100.0)
    held = np.array([0.0, 0.6, 0.8, 0.8, -0.6, 0.0])
    turnover = [0.6, 0.2, 0.0, 1.4, 0.6]  # every change of exposure pays, re-sizes included
    for side, fee in (("taker", 10.0), ("maker", 2.0)):
        cfg = _config(fee_side=side, slippage_bps=1.0)
        result = backtest_positions(flat, held, BLOCKS, cfg)
        c = (fee + 1.0) / 1e4
        assert result.equity[-1] == pytest.approx(np.prod([1 - c * t for t in turnover]))
        equity_before = np.cumprod([1.0, *[1 - c * t for t in turnover[:-1]]])
        assert result.fees_paid == pytest.approx(
            float(np.sum(equity_before * np.array(turnover))) * fee / 1e4
        )


def test_all_in_ledger_charges_the_configured_fee_side() -> None:
    held = np.array([0.0, 1.0, 1.0, 0.0])
    prices = np.array([100.0, 100.0, 100.0, 100.0])
    blocks = np.zeros(4, dtype=np.int64)
    for side, f in (("taker", 0.001), ("maker", 0.0002)):
        result = backtest_positions(prices, held, blocks, BacktestConfig(fee_side=side))
        assert result.equity[-1] == pytest.approx((1 - f) / (1 + f), rel=1e-12)


def test_probability_exposures_must_lie_in_unit_range() -> None:
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        backtest_positions(OPEN, np.array([0, 0.5, 0, 0, 0, 0.0]), BLOCKS, BacktestConfig())
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        backtest_positions(OPEN, np.array([0, 1.5, 0, 0, 0, 0.0]), BLOCKS, _config())
