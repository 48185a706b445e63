"""The vectorised backtester: timing, holding, blocks, a hand ledger, and vectorbt equality."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pytest

from configs.schema import BacktestConfig
from models.backtest import (
    BUY,
    NEUTRAL,
    SELL,
    backtest_positions,
    block_bounds,
    buy_and_hold,
    decide_signals,
    held_positions,
    positions_from_signals,
    regime_breakdown,
    regime_labels,
    run_backtest,
)


def random_walk(n: int, seed: int, vol: float = 0.002) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 100.0 * np.exp(np.cumsum(rng.normal(0.0, vol, n)))


def random_signals(n: int, seed: int, rate: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(
        np.array([SELL, NEUTRAL, BUY], dtype=np.int8), size=n, p=[rate, 1 - 2 * rate, rate]
    )


def random_blocks(n: int, seed: int, breaks: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cuts = np.zeros(n, dtype=np.int64)
    cuts[rng.choice(np.arange(1, n), size=breaks, replace=False)] = rng.integers(1, 4, breaks)
    return np.cumsum(cuts)  # nondecreasing, ids skip values like real fold ids may


def momentum_signals(close: np.ndarray, config: BacktestConfig, lookback: int = 5) -> np.ndarray:
    """A causal 'model': decisions at t from closes up to t only."""
    mom = np.full(close.size, np.nan)
    mom[lookback:] = np.log(close[lookback:] / close[:-lookback])
    p_up = 1.0 / (1.0 + np.exp(-mom / 0.002))
    return decide_signals(p_up, mom, config)


def no_cost(**kw: Any) -> BacktestConfig:
    return BacktestConfig(taker_fee_bps=0.0, maker_fee_bps=0.0, slippage_bps=0.0, **kw)


# ----- decisions ---------------------------------------------------------------------------


def test_decide_signals_thresholds_costs_and_nan() -> None:
    cfg = BacktestConfig(taker_fee_bps=10.0, slippage_bps=2.0, min_edge_bps=1.0)
    cost = 2 * (10 + 2) / 1e4 + 1 / 1e4  # 25 bps
    p = np.array([0.60, 0.55, 0.54, 0.60, 0.40, 0.45, 0.46, 0.40, np.nan, 0.9])
    pred = np.array([0.003, 0.003, 0.003, cost, -0.003, -0.003, -0.003, -cost, 0.01, np.nan])
    out = decide_signals(p, pred, cfg)
    assert out.dtype == np.int8
    assert out.tolist() == [1, 1, 0, 0, -1, -1, 0, 0, 0, 0]
    maker = BacktestConfig(fee_side="maker")  # 2 bps a side -> 4 bps round trip
    assert decide_signals(np.array([0.6]), np.array([0.0005]), maker).tolist() == [1]
    assert decide_signals(np.array([0.6]), np.array([0.0005]), cfg).tolist() == [0]


# ----- positions: hold, extend, reverse, long-only, blocks ---------------------------------


def test_hold_extend_reverse_and_expire() -> None:
    cfg = BacktestConfig(hold_bars=3)
    blocks = np.zeros(16, dtype=np.int64)
    sig = np.zeros(16, dtype=np.int8)
    sig[1] = BUY  # holds decisions 1..3
    sig[3] = BUY  # extends to 3..5
    sig[7] = SELL  # 7..9
    sig[8] = BUY  # reverses at once: 8..10
    target = positions_from_signals(sig, blocks, cfg)
    expected = [0, 1, 1, 1, 1, 1, 0, -1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert target.tolist() == expected
    held = held_positions(target, blocks)
    assert held.tolist() == [0, *expected[:-1]]  # traded one bar later
    neutral_inside_hold = sig.copy()
    neutral_inside_hold[2] = NEUTRAL
    assert positions_from_signals(neutral_inside_hold, blocks, cfg)[2] == 1


def test_long_only_maps_sell_to_flat() -> None:
    cfg = BacktestConfig(hold_bars=3, mode="long_only")
    sig = np.zeros(10, dtype=np.int8)
    sig[0] = SELL  # would open a short: stays flat
    sig[4] = BUY
    sig[5] = SELL  # closes the long
    target = positions_from_signals(sig, np.zeros(10, dtype=np.int64), cfg)
    assert target.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert target.min() == 0.0


def test_blocks_reset_signals_and_force_flat() -> None:
    cfg = BacktestConfig(hold_bars=5)
    blocks = np.array([0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2])
    sig = np.zeros(11, dtype=np.int8)
    sig[2] = BUY  # hold would reach decision 6, but block 0 ends at bar 4
    target = positions_from_signals(sig, blocks, cfg)
    assert target[5:].tolist() == [0] * 6  # a signal of block 0 never reaches block 2
    held = held_positions(target, blocks)
    # filled at open 3, closed at open 4 (block 0's last), and block 2 starts flat
    assert held.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    res = run_backtest(random_walk(11, 1), sig, blocks, cfg)
    assert res.fills == 2 and res.trade_pnls.size == 1


def test_signal_on_a_blocks_last_bars_never_trades() -> None:
    cfg = BacktestConfig()
    blocks = np.repeat([0, 1], 6)
    prices = random_walk(12, 2)
    for t in (4, 5, 10, 11):  # last and second-to-last bar of each block
        sig = np.zeros(12, dtype=np.int8)
        sig[t] = BUY
        res = run_backtest(prices, sig, blocks, cfg)
        assert res.fills == 0, t
        assert not res.positions.any()
        np.testing.assert_array_equal(res.equity, np.ones(12))


def test_no_same_bar_trading() -> None:
    cfg = BacktestConfig(slippage_bps=5.0, hold_bars=4)
    n, t = 200, 100
    prices = random_walk(n, 3)
    blocks = np.zeros(n, dtype=np.int64)
    sig = random_signals(n, 4)
    sig[t - 8 : t + 6] = NEUTRAL  # earlier trades are closed by open t-4
    sig[t] = BUY
    with_signal = run_backtest(prices, sig, blocks, cfg)
    without = sig.copy()
    without[t] = NEUTRAL
    base = run_backtest(prices, without, blocks, cfg)
    # the decision at the close of t is filled at open t+1: nothing before moves
    assert with_signal.positions[t] == 0 and with_signal.positions[t + 1] == 1
    np.testing.assert_array_equal(with_signal.returns[: t + 1], base.returns[: t + 1])
    assert with_signal.returns[t + 1] != base.returns[t + 1]  # the entry costs at open t+1
    # The trade's P&L, and every return from its fill on, ignore prices at or before t.
    bumped = prices.copy()
    bumped[t - 3 : t + 1] *= 1.07
    moved = run_backtest(bumped, sig, blocks, cfg)
    held = with_signal.positions
    entries = np.flatnonzero((held != 0) & (held != np.concatenate(([0.0], held[:-1]))))
    k = int(np.searchsorted(entries, t + 1))
    assert entries[k] == t + 1
    assert moved.trade_pnls[k] == pytest.approx(with_signal.trade_pnls[k], rel=1e-12)
    np.testing.assert_allclose(moved.returns[t + 1 :], with_signal.returns[t + 1 :], rtol=1e-12)
    np.testing.assert_array_equal(moved.trade_pnls[:k], with_signal.trade_pnls[:k])


def test_future_prices_cannot_leak_into_decisions() -> None:
    cfg = BacktestConfig(mode="long_short", fee_side="maker", hold_bars=3)
    n, t = 600, 350
    close = random_walk(n, 5)
    open_ = np.concatenate(([100.0], close[:-1]))
    blocks = np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(6)
    shuffled_close, shuffled_open = close.copy(), open_.copy()
    shuffled_close[t + 1 :] = rng.permutation(close[t + 1 :])
    shuffled_open[t + 1 :] = rng.permutation(open_[t + 1 :])
    sig_a, sig_b = momentum_signals(close, cfg), momentum_signals(shuffled_close, cfg)
    assert np.count_nonzero(sig_a[: t + 1]) > 10
    np.testing.assert_array_equal(sig_a[: t + 1], sig_b[: t + 1])
    tgt_a = positions_from_signals(sig_a, blocks, cfg)
    tgt_b = positions_from_signals(sig_b, blocks, cfg)
    np.testing.assert_array_equal(tgt_a[: t + 1], tgt_b[: t + 1])
    a = run_backtest(open_, sig_a, blocks, cfg)
    b = run_backtest(shuffled_open, sig_b, blocks, cfg)
    np.testing.assert_array_equal(a.positions[: t + 2], b.positions[: t + 2])
    np.testing.assert_array_equal(a.equity[: t + 1], b.equity[: t + 1])


# ----- the ledger by hand ------------------------------------------------------------------


def test_hand_computed_ledger_long_reversal_short() -> None:
    f, s = 10 / 1e4, 5 / 1e4
    cfg = BacktestConfig(taker_fee_bps=10.0, slippage_bps=5.0, hold_bars=2)
    prices = np.array([100.0, 100.0, 110.0, 121.0, 110.0, 100.0, 100.0, 90.0, 90.0])
    sig = np.zeros(9, dtype=np.int8)
    sig[0] = BUY  # long over opens 1..3
    sig[2] = SELL  # reversal at open 3, short until open 5
    sig[5] = SELL  # short again over opens 6..8, closed at the last open
    res = run_backtest(prices, sig, np.zeros(9, dtype=np.int64), cfg)
    assert res.positions.tolist() == [0, 1, 1, -1, -1, 0, -1, -1, 0]

    # Long: all cash buys at 100 * (1 + s), fee f on the notional.
    units_long = 1.0 / (100.0 * (1 + s) * (1 + f))
    v1 = units_long * 121.0 * (1 - s) * (1 - f)  # sold at 121 * (1 - s), fee f
    # Short from v1: proceeds plus fee use up the free cash; cash then holds the proceeds.
    units_short = v1 / (121.0 * (1 - s) * (1 + f))
    cash = v1 + units_short * 121.0 * (1 - s) * (1 - f)
    v2 = cash - units_short * 100.0 * (1 + s) * (1 + f)  # covered at 100 * (1 + s) + fee
    units_short3 = v2 / (100.0 * (1 - s) * (1 + f))
    cash3 = v2 + units_short3 * 100.0 * (1 - s) * (1 - f)
    v3 = cash3 - units_short3 * 90.0 * (1 + s) * (1 + f)
    expected_equity = [
        1.0,
        units_long * 100.0,  # the entry bar already carries the entry costs
        units_long * 110.0,
        cash - units_short * 121.0,  # reversal bar: marked after both legs
        cash - units_short * 110.0,
        v2,
        cash3 - units_short3 * 100.0,
        cash3 - units_short3 * 90.0,
        v3,
    ]
    np.testing.assert_allclose(res.equity, expected_equity, rtol=1e-13)
    np.testing.assert_allclose(res.trade_pnls, [v1 - 1.0, v2 / v1 - 1.0, v3 / v2 - 1.0])
    assert res.fills == 5  # entry, reversal (one order), cover, entry, cover
    notional = (
        units_long * 100.0 * (1 + s)
        + (units_long + units_short) * 121.0 * (1 - s)
        + units_short * 100.0 * (1 + s)
        + units_short3 * 100.0 * (1 - s)
        + units_short3 * 90.0 * (1 + s)
    )
    assert res.fees_paid == pytest.approx(notional * f, rel=1e-12)
    np.testing.assert_allclose(res.returns[1:], np.diff(expected_equity) / expected_equity[:-1])
    assert res.returns[0] == 0.0
    # Without costs: long +21%, then shorts at fixed units: 2 - exit / entry each.
    gross = np.cumprod(1.0 + res.gross_returns)
    assert gross[-1] == pytest.approx(1.21 * (2 - 100 / 121) * (2 - 90 / 100), rel=1e-13)
    m = res.metrics
    assert m["trades"] == 3 and m["hit_rate"] == 1.0  # 100->121 long, both shorts fall
    assert m["exposure"] == pytest.approx(6 / 9)
    assert m["turnover"] == pytest.approx((1 + 2 + 1 + 1 + 1) / 9)


def test_zero_cost_long_only_is_the_price_path() -> None:
    prices = random_walk(500, 7)
    blocks = np.zeros(500, dtype=np.int64)
    sig = np.full(500, BUY, dtype=np.int8)
    res = run_backtest(prices, sig, blocks, no_cost(mode="long_only"))
    # long from open 1 to open 499 (the last): equity tracks price / price[1]
    np.testing.assert_allclose(res.equity[1:], prices[1:] / prices[1], rtol=1e-12)
    np.testing.assert_allclose(res.returns, res.gross_returns)
    assert res.fills == 2 and res.fees_paid == 0.0


def test_buy_and_hold_per_block() -> None:
    f, s = 2 / 1e4, 1 / 1e4
    cfg = BacktestConfig(fee_side="maker", slippage_bps=1.0)
    prices = random_walk(300, 8)
    blocks = np.array([0] * 100 + [1] * 1 + [2] * 199)  # a one-bar block never trades
    res = buy_and_hold(prices, blocks, cfg)
    per_block = (
        prices[99]
        / prices[0]
        * prices[299]
        / prices[101]
        * ((1 - s) * (1 - f) / ((1 + s) * (1 + f))) ** 2
    )
    assert res.equity[-1] == pytest.approx(per_block, rel=1e-12)
    assert res.fills == 4 and res.trade_pnls.size == 2
    assert res.positions[99] == 0 and res.positions[100] == 0 and res.positions[101] == 1


def test_backtest_positions_rejects_positions_across_breaks() -> None:
    prices = random_walk(6, 9)
    blocks = np.array([0, 0, 0, 1, 1, 1])
    cfg = BacktestConfig()
    with pytest.raises(ValueError, match="flat"):
        backtest_positions(prices, np.array([0, 1, 1, 0, 0, 0.0]), blocks, cfg)
    with pytest.raises(ValueError, match="-1, 0"):
        backtest_positions(prices, np.array([0, 0.5, 0, 0, 0, 0.0]), blocks, cfg)
    with pytest.raises(ValueError, match="nondecreasing"):
        run_backtest(prices, np.zeros(6, dtype=np.int8), blocks[::-1], cfg)
    ok = backtest_positions(prices, np.array([0, 1, 0, 0, -1, 0.0]), blocks, cfg)
    assert ok.fills == 4


# ----- vectorbt equality -------------------------------------------------------------------


def vectorbt_portfolio(
    open_: np.ndarray, held: np.ndarray, config: BacktestConfig, **kw: Any
) -> Any:
    """vectorbt on the same decisions, already shifted one bar (orders where `held` changes)."""
    vbt = pytest.importorskip("vectorbt")
    prev = np.concatenate(([0.0], held[:-1]))
    kwargs: dict[str, Any] = {
        "price": open_,
        "fees": config.fee_bps / 1e4,
        "slippage": config.slippage_bps / 1e4,
        "init_cash": 1.0,
        "size": np.inf,
        "min_size": 0.0,
        "freq": "1min",
    }
    kwargs.update(kw)
    entries, exits = (held > 0) & (prev <= 0), (held == 0) & (prev > 0)
    if config.mode == "long_short":
        kwargs["short_entries"] = (held < 0) & (prev >= 0)
        kwargs["short_exits"] = (held == 0) & (prev < 0)
    return vbt.Portfolio.from_signals(open_, entries, exits, **kwargs)


@pytest.mark.parametrize("mode", ["long_only", "long_short"])
def test_equity_equals_vectorbt(mode: Literal["long_only", "long_short"]) -> None:
    n = 4000
    cfg = BacktestConfig(mode=mode, taker_fee_bps=10.0, slippage_bps=3.0, hold_bars=6)
    prices = random_walk(n, 10)
    blocks = random_blocks(n, 11)
    res = run_backtest(prices, random_signals(n, 12), blocks, cfg)
    prev = np.concatenate(([0.0], res.positions[:-1]))
    if mode == "long_short":  # the sample must exercise reversals and block-forced exits
        assert np.count_nonzero(res.positions * prev < 0) > 10
    _, last = block_bounds(blocks)
    assert np.count_nonzero((prev != 0) & last) > 0  # held into a block's last open

    pf = vectorbt_portfolio(prices, res.positions, cfg)
    value = pf.value().to_numpy()
    np.testing.assert_allclose(res.equity, value, rtol=1e-9, atol=0)
    np.testing.assert_allclose(res.returns, pf.returns().to_numpy(), rtol=0, atol=1e-12)
    assert res.fills == int(pf.orders.count())
    assert res.fees_paid == pytest.approx(float(pf.orders.fees.sum()), rel=1e-9)
    # vectorbt's trade return divides P&L by the entry notional without its fee; ours is
    # the equity return of the round trip, i.e. divides by notional * (1 + fee).
    trades = pf.trades.records_readable.sort_values("Entry Timestamp")
    assert len(trades) == res.trade_pnls.size
    np.testing.assert_allclose(
        res.trade_pnls * (1 + cfg.fee_bps / 1e4), trades["Return"].to_numpy(), rtol=1e-9
    )
    gross = vectorbt_portfolio(prices, res.positions, cfg, fees=0.0, slippage=0.0)
    np.testing.assert_allclose(
        np.cumprod(1.0 + res.gross_returns), gross.value().to_numpy(), rtol=1e-9
    )


def test_buy_and_hold_equals_vectorbt() -> None:
    n = 3000
    cfg = BacktestConfig(taker_fee_bps=10.0, slippage_bps=2.0)
    prices = random_walk(n, 13)
    blocks = random_blocks(n, 14)
    res = buy_and_hold(prices, blocks, cfg)
    pf = vectorbt_portfolio(prices, res.positions, cfg.model_copy(update={"mode": "long_only"}))
    np.testing.assert_allclose(res.equity, pf.value().to_numpy(), rtol=1e-9, atol=0)


# ----- regimes -----------------------------------------------------------------------------


def reference_labels(
    close: np.ndarray, blocks: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The regime labels by a plain loop, for comparison."""
    n = close.size
    labelled = np.zeros(n, dtype=bool)
    vol = np.full(n, np.nan)
    up = np.zeros(n, dtype=bool)
    for t in range(window, n):
        if blocks[t - window] != blocks[t]:
            continue
        labelled[t] = True
        steps = np.diff(np.log(close[t - window : t + 1]))
        vol[t] = np.std(steps, ddof=1)
        up[t] = np.log(close[t] / close[t - window]) >= 0
    high = labelled & (vol > np.nanmedian(vol))
    return labelled, high, up


def test_regime_labels_match_a_loop_and_are_causal() -> None:
    n, w = 900, 30
    rng = np.random.default_rng(15)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, n) * np.repeat([1.0, 3.0, 1.0], 300)))
    blocks = np.repeat([0, 1, 2], [250, 400, 250])
    got = regime_labels(close, blocks, w)
    for g, e in zip(got, reference_labels(close, blocks, w), strict=True):
        np.testing.assert_array_equal(g, e)
    t = 500
    shuffled = close.copy()
    shuffled[t + 1 :] = rng.permutation(close[t + 1 :])
    later = regime_labels(shuffled, blocks, w)
    np.testing.assert_array_equal(got[0][: t + 1], later[0][: t + 1])
    np.testing.assert_array_equal(got[2][: t + 1], later[2][: t + 1])  # trend: fully causal


def test_regime_breakdown_attributes_returns_two_bars_later() -> None:
    n, w = 800, 20
    close = random_walk(n, 16)
    blocks = np.repeat([0, 1], 400)
    labelled, _, up = regime_labels(close, blocks, w)
    # returns[k] = +1% when close k-2 was in an up trend, -1% in a down trend
    returns = np.zeros(n)
    returns[2:] = np.where(up[:-2], 0.01, -0.01)
    breakdown = regime_breakdown(returns, close, blocks, 525_600.0, w)
    rows = {
        str(r["regime"]): {k: v for k, v in r.items() if isinstance(v, float)} for r in breakdown
    }
    assert [r["regime"] for r in breakdown] == [
        "high_vol_up", "high_vol_down", "low_vol_up", "low_vol_down",
        "high_vol", "low_vol", "up", "down",
    ]  # fmt: skip
    assert rows["up"]["hit"] == 1.0 and rows["down"]["hit"] == 0.0
    valid = labelled[:-2] & (blocks[2:] == blocks[:-2])
    assert rows["up"]["bars"] + rows["down"]["bars"] == np.count_nonzero(valid)
    assert rows["high_vol"]["bars"] + rows["low_vol"]["bars"] == np.count_nonzero(valid)
    assert rows["high_vol_up"]["bars"] + rows["low_vol_up"]["bars"] == rows["up"]["bars"]
    assert abs(rows["high_vol"]["bars"] - rows["low_vol"]["bars"]) <= 0.05 * n
    assert rows["up"]["total_return"] == pytest.approx(1.01 ** rows["up"]["bars"] - 1)
    empty = regime_breakdown(np.zeros(10), random_walk(10, 17), np.zeros(10), 525_600.0, 20)
    assert all(r["bars"] == 0 and math.isnan(float(r["hit"])) for r in empty)
