"""The market simulator: determinism, stylised facts, and the planted signal."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np

from market.sources.sim import MarketSimulator, format_dump_line
from tests.conftest import sim_config


def returns_and_flow(strength: float, days: int = 10) -> tuple[np.ndarray, np.ndarray]:
    config = sim_config(signal_strength=strength, gap_rate=0.0, seed=21)
    simulator = MarketSimulator(config, "SIMX")
    last = config.anchor_date + timedelta(days=days - 1)
    closes, ratios = [], []
    for _, day in simulator.days(config.anchor_date, last):
        closes.append(day.close)
        ratios.append(day.taker_buy_base / day.volume)
    close = np.concatenate(closes)
    return np.diff(np.log(close)), np.concatenate(ratios)[:-1]


def forward_sum(returns: np.ndarray, horizon: int = 10) -> np.ndarray:
    cumulative = np.r_[0.0, np.cumsum(returns)]
    return cumulative[horizon:] - cumulative[:-horizon]


def test_a_day_does_not_depend_on_the_range_requested() -> None:
    config = sim_config()
    simulator = MarketSimulator(config, "SIMA")
    target = config.anchor_date + timedelta(days=3)
    alone = dict(simulator.days(target, target))[target]
    within = dict(simulator.days(config.anchor_date, target + timedelta(days=2)))[target]
    assert np.array_equal(alone.close, within.close)
    assert np.array_equal(alone.present, within.present)
    other_symbol = dict(MarketSimulator(config, "SIMB").days(target, target))[target]
    assert not np.array_equal(alone.close, other_symbol.close)


def test_bars_are_consistent_and_binance_shaped() -> None:
    config = sim_config(gap_rate=0.0)
    _, day = next(MarketSimulator(config, "SIMA").days(config.anchor_date, config.anchor_date))
    assert np.all(day.high >= np.maximum(day.open, day.close))
    assert np.all(day.low <= np.minimum(day.open, day.close))
    assert np.all(day.taker_buy_base <= day.volume)
    fields = format_dump_line(day, 0).split(",")
    assert len(fields) == 12
    assert int(fields[6]) == int(fields[0]) + 59_999
    assert date.fromtimestamp(int(fields[0]) / 1000) >= config.anchor_date - timedelta(days=1)


def test_stylised_facts_fat_tails_and_volatility_clustering() -> None:
    returns, _ = returns_and_flow(0.0)
    standardised = (returns - returns.mean()) / returns.std()
    assert np.mean(standardised**4) > 4.0, "returns should be fat-tailed (kurtosis > 3)"
    absolute = np.abs(returns)
    lag_corr = np.corrcoef(absolute[:-1], absolute[1:])[0, 1]
    assert lag_corr > 0.05, "absolute returns should be autocorrelated (clustering)"
    assert abs(np.corrcoef(returns[:-1], returns[1:])[0, 1]) < 0.03


def test_planted_signal_is_found_only_when_planted() -> None:
    for strength, expect_signal in ((0.0, False), (0.15, True)):
        returns, taker_ratio = returns_and_flow(strength)
        future = forward_sum(returns[1:])
        flow = taker_ratio[: future.size]
        corr = np.corrcoef(flow, future)[0, 1]
        if expect_signal:
            assert corr > 0.1, f"planted signal not visible (corr {corr:.3f})"
        else:
            assert abs(corr) < 0.03, f"signal found where none was planted (corr {corr:.3f})"


def test_outages_remove_runs_of_minutes() -> None:
    config = sim_config(gap_rate=0.002, max_gap_minutes=20)
    _, day = next(MarketSimulator(config, "SIMA").days(config.anchor_date, config.anchor_date))
    missing = np.flatnonzero(~day.present)
    assert missing.size > 0
    runs = np.split(missing, np.flatnonzero(np.diff(missing) != 1) + 1)
    assert max(len(r) for r in runs) <= 20
