"""The feature spec in two engines: parity, causality, TA-Lib agreement, warm-up and gaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import talib

from market.features import spec
from market.features.numpy_kernel import compute_symbol_features
from market.features.polars_engine import compute_features
from market.klines import ONE_MINUTE_MS
from market.sim_silver import simulated_bars
from tests.conftest import sim_config

HOUR_MS = 60 * ONE_MINUTE_MS


def scaled_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a-b| / max(|a|, median |a|): relative error judged at the column's own scale."""
    if a.size == 0:
        return 0.0
    scale = np.maximum(np.abs(a), np.median(np.abs(a)))
    scale = np.where(scale == 0.0, 1.0, scale)
    return float(np.max(np.abs(a - b) / scale))


def numpy_engine(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    """Run the numpy kernel (the Spark engine's) on the polars engine's segmented output."""
    inputs = ("close", "high", "low", "volume", "trades", "taker_buy_base")
    arrays = {k: frame[k].cast(pl.Float64).to_numpy() for k in inputs}
    open_time = frame["open_time"].cast(pl.Int64).to_numpy()
    return compute_symbol_features(open_time, frame["segment"].to_numpy(), arrays)


def assert_engines_agree(frame: pl.DataFrame, tolerance: float = 1e-9) -> None:
    other = numpy_engine(frame)
    for name in spec.FEATURE_COLUMNS:
        a = frame[name].cast(pl.Float64).fill_null(np.nan).to_numpy()
        b = other[name]
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{name}: null patterns differ"
        present = ~np.isnan(a)
        error = scaled_error(a[present], b[present])
        assert error <= tolerance, f"{name}: engines differ by {error:.3g} (relative)"


def sim_bars(days: int, gap_rate: float, seed: int = 3) -> pl.DataFrame:
    return simulated_bars(sim_config(seed=seed, gap_rate=gap_rate), ["SIMA", "SIMB"], days)


@pytest.fixture(scope="module")
def real_features(real_minutes: pl.DataFrame) -> pl.DataFrame:
    return compute_features(real_minutes)


@pytest.mark.realdata
def test_engines_agree_on_the_real_year(real_features: pl.DataFrame) -> None:
    assert real_features.height == 571_680
    assert_engines_agree(real_features)


def test_engines_agree_on_simulated_bars_with_gaps() -> None:
    features = compute_features(sim_bars(days=3, gap_rate=0.002))
    assert features["segment"].n_unique() > 4, "the simulator should have produced outages"
    for symbol in ("SIMA", "SIMB"):
        assert_engines_agree(features.filter(pl.col("symbol") == symbol))


@pytest.mark.realdata
def test_indicators_agree_with_talib(real_features: pl.DataFrame) -> None:
    close = real_features["close"].to_numpy()
    upper, middle, lower = talib.BBANDS(close, 20, 2.0, 2.0, 0)
    macd, signal, hist = talib.MACD(close, 12, 26, 9)
    reference = {
        "rsi_14": talib.RSI(close, 14),
        "ema_12": talib.EMA(close, 12),
        "ema_26": talib.EMA(close, 26),
        "macd": macd,
        "macd_signal": signal,
        "macd_hist": hist,
        "sma_5": talib.SMA(close, 5),
        "sma_10": talib.SMA(close, 10),
        "sma_20": talib.SMA(close, 20),
        "bb_pctb_20": (close - lower) / (upper - lower),
        "bb_width_20": (upper - lower) / middle,
    }
    for name, expected in reference.items():
        ours = real_features[name].to_numpy().astype(float)[spec.WARMUP_BARS :]
        theirs = expected[spec.WARMUP_BARS :]
        error = scaled_error(theirs, ours)
        assert error < 1e-6, f"{name} differs from TA-Lib by {error:.3g}"


@pytest.mark.realdata
def test_features_are_causal(real_minutes: pl.DataFrame, real_features: pl.DataFrame) -> None:
    """Features at bar t from data cut at t equal the full-history values: no look-ahead."""
    rng = np.random.default_rng(11)
    cuts = [*sorted(rng.integers(spec.WARMUP_BARS + 10, 20_000, size=4).tolist()), 300]
    history = real_minutes.head(20_000)
    full = real_features.head(20_000)
    for cut in cuts:
        truncated = compute_features(history.head(cut + 1))
        last_full = full.row(cut, named=True)
        last_cut = truncated.row(cut, named=True)
        for name in spec.FEATURE_COLUMNS:
            assert last_cut[name] == pytest.approx(last_full[name], rel=1e-12, abs=1e-15), (
                f"{name} at bar {cut} changes when later bars are added"
            )
        # The numpy kernel is causal too: same check on its output.
        kernel_cut = numpy_engine(truncated)
        kernel_full = numpy_engine(full)
        for name in spec.FEATURE_COLUMNS:
            assert kernel_cut[name][cut] == pytest.approx(kernel_full[name][cut], rel=1e-12)


def test_warmup_and_targets_respect_segments() -> None:
    features = compute_features(sim_bars(days=2, gap_rate=0.003, seed=5))
    times = features["open_time"].to_numpy()
    segments = features["segment"].to_numpy()
    symbols = features["symbol"].to_numpy()
    for (symbol, segment), group in features.group_by(["symbol", "segment"]):
        n = group.height
        warm = group.head(min(n, spec.WARMUP_BARS))
        assert warm.select(pl.col(list(spec.FEATURE_COLUMNS)).is_not_null().any()).row(0) == (
            (False,) * len(spec.FEATURE_COLUMNS)
        ), f"features present during warm-up of {symbol}/{segment}"
        targets = group["target_close_10"]
        assert targets.tail(min(n, spec.HORIZON_BARS)).null_count() == min(n, spec.HORIZON_BARS)
    index = {(s, t): i for i, (s, t) in enumerate(zip(symbols, times, strict=True))}
    close = features["close"].to_numpy()
    target = features["target_close_10"].to_numpy()
    for i in np.flatnonzero(features["target_close_10"].is_not_null().to_numpy()):
        j = index[(symbols[i], times[i] + spec.HORIZON_BARS * ONE_MINUTE_MS)]
        assert segments[j] == segments[i]
        assert close[j] == target[i]


@pytest.mark.realdata
def test_hourly_outages_make_segments_exactly_at_the_gaps(real_hours_path: Path) -> None:
    hours = pl.read_csv(real_hours_path).rename(
        {
            "open_time_ms": "open_time",
            "quote_asset_volume": "quote_volume",
            "number_of_trades": "trades",
            "taker_buy_base_asset_volume": "taker_buy_base",
            "taker_buy_quote_asset_volume": "taker_buy_quote",
        }
    )
    hours = hours.with_columns(pl.lit("BTCUSDT").alias("symbol"))
    features = compute_features(hours, interval_ms=HOUR_MS)
    times = features["open_time"].to_numpy()
    steps = np.diff(times)
    expected_breaks = np.flatnonzero(steps != HOUR_MS) + 1
    breaks = np.flatnonzero(np.diff(features["segment"].to_numpy()) != 0) + 1
    assert np.array_equal(breaks, expected_breaks)
    missing_hours = int(((steps[steps != HOUR_MS] // HOUR_MS) - 1).sum())
    assert missing_hours == 128, "the file documents 128 missing hours"
    # No target spans a gap: every non-null target is exactly 10 hours ahead in-segment.
    has_target = features["target_close_10"].is_not_null().to_numpy()
    position = {t: i for i, t in enumerate(times)}
    segment = features["segment"].to_numpy()
    for i in np.flatnonzero(has_target):
        j = position.get(times[i] + 10 * HOUR_MS)
        assert j is not None and segment[j] == segment[i]
    for b in expected_breaks:
        assert not has_target[max(0, b - 10) : b].any(), "a target reaches across an outage"
