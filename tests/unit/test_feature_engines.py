"""The feature spec in two engines: parity, causality, TA-Lib agreement, warm-up and gaps.

The batch (polars) engine computes rolling windows over the whole sorted frame at once, in
blocks, and the recursive features per segment; the tests below also hold it to the rules that
make this equal to computing every segment on its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import talib

from market.features import polars_engine, spec
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
    for k in spec.RETURN_LAGS:
        reference[f"ret_{k}"] = np.log(talib.ROCR(close, k))
    ret_1 = np.log(talib.ROCR(close, 1))
    for k in spec.REALISED_VOL_WINDOWS:
        # TA-Lib's STDDEV is the population std; the spec's is the sample std.
        reference[f"rv_{k}"] = talib.STDDEV(ret_1, k, 1.0) * np.sqrt(k / (k - 1))
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
        for h in spec.TARGET_HORIZONS_BARS:
            targets = group[spec.target_close_column(h)]
            assert targets.tail(min(n, h)).null_count() == min(n, h)
            assert targets.head(max(n - h, 0)).null_count() == 0
    index = {(s, t): i for i, (s, t) in enumerate(zip(symbols, times, strict=True))}
    close = features["close"].to_numpy()
    for h in spec.TARGET_HORIZONS_BARS:
        target = features[spec.target_close_column(h)].to_numpy()
        ret = features[spec.target_ret_column(h)].to_numpy()
        up = features[spec.target_up_column(h)].to_numpy()
        present = np.flatnonzero(features[spec.target_close_column(h)].is_not_null().to_numpy())
        assert present.size > 0
        for i in present:
            j = index[(symbols[i], times[i] + h * ONE_MINUTE_MS)]
            assert segments[j] == segments[i]
            assert close[j] == target[i]
            assert ret[i] == pytest.approx(np.log(close[j] / close[i]), rel=1e-12)
            assert up[i] == int(close[j] > close[i])


@pytest.mark.parametrize("horizon", spec.TARGET_HORIZONS_BARS)
def test_targets_read_only_the_bars_up_to_their_horizon(horizon: int) -> None:
    """A target at bar t is fixed by bars t..t+h alone: no bar before t and none after t+h
    changes it, and without bar t+h it is null; features at t ignore every later bar."""
    bars = sim_bars(days=1, gap_rate=0.0, seed=8).filter(pl.col("symbol") == "SIMA")
    full = compute_features(bars)
    names = [spec.target_close_column(horizon), spec.target_ret_column(horizon)]
    names.append(spec.target_up_column(horizon))
    for t in (0, 317, bars.height - horizon - 1):
        only_window = compute_features(bars.slice(t, horizon + 1))
        for name in names:
            assert only_window[name][0] == full[name][t], f"{name} at {t} reads outside t..t+h"
        short = compute_features(bars.slice(t, horizon))
        assert short.select(names).row(0) == (None, None, None), "a target without bar t+h"
    # Bars after t+h may change arbitrarily: the target at t must not move.
    t = 300
    shocked = bars.with_columns(
        pl.when(pl.int_range(pl.len()) > t + horizon)
        .then(pl.col("close") * 3.0)
        .otherwise(pl.col("close"))
        .alias("close")
    )
    after_shock = compute_features(shocked).row(t, named=True)
    before_shock = full.row(t, named=True)
    for name in names:
        assert after_shock[name] == before_shock[name], f"{name} at {t} reads past t+h"
    for name in spec.FEATURE_COLUMNS:
        assert after_shock[name] == pytest.approx(before_shock[name], rel=1e-12), name


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


FEATURE_AND_TARGET_COLUMNS = [*spec.FEATURE_COLUMNS, *spec.TARGET_COLUMNS]


def assert_same_features(a: pl.DataFrame, b: pl.DataFrame, rel: float = 0.0) -> None:
    """Same rows, same nulls, values equal (within `rel` relative when given)."""
    assert a.select("symbol", "open_time").equals(b.select("symbol", "open_time"))
    for name in FEATURE_AND_TARGET_COLUMNS:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype, name
        assert x.is_null().equals(y.is_null()), f"{name}: null patterns differ"
        xv = x.drop_nulls().cast(pl.Float64).to_numpy()
        yv = y.drop_nulls().cast(pl.Float64).to_numpy()
        np.testing.assert_allclose(xv, yv, rtol=rel, atol=0.0, err_msg=name)


def test_each_segment_gets_the_features_it_would_get_alone() -> None:
    """A missing minute resets every window: the bars before a gap never reach past it, and
    the bars of other symbols never reach into a symbol's rows."""
    bars = sim_bars(days=3, gap_rate=0.002, seed=9)
    features = compute_features(bars)
    long_segments = 0
    for (symbol, _), group in features.group_by(["symbol", "segment"]):
        times = group["open_time"].implode()
        own_bars = bars.filter((pl.col("symbol") == symbol) & pl.col("open_time").is_in(times))
        alone = compute_features(own_bars)
        assert alone["segment"].unique().to_list() == [1]
        assert_same_features(group.sort("open_time"), alone, rel=1e-12)
        long_segments += group.height > spec.WARMUP_BARS
    assert long_segments >= 4, "the simulator should give several segments past the warm-up"


def test_features_restart_their_warm_up_after_every_gap() -> None:
    features = compute_features(sim_bars(days=3, gap_rate=0.002, seed=9))
    position = pl.int_range(pl.len()).over("symbol", "segment")
    ranked = features.with_columns(position.alias("position"))
    warm = ranked.filter(pl.col("position") >= spec.WARMUP_BARS)
    cold = ranked.filter(pl.col("position") < spec.WARMUP_BARS)
    assert warm.height > 0 and cold.height > 0
    assert warm.select(pl.col(list(spec.FEATURE_COLUMNS)).null_count()).sum_horizontal().item() == 0
    assert np.isfinite(warm.select(spec.FEATURE_COLUMNS).to_numpy()).all()
    assert (
        cold.select(pl.col(list(spec.FEATURE_COLUMNS)).is_not_null().sum()).sum_horizontal().item()
        == 0
    )


def test_block_boundaries_do_not_change_any_value(monkeypatch: pytest.MonkeyPatch) -> None:
    bars = sim_bars(days=2, gap_rate=0.002, seed=4)
    whole = compute_features(bars)
    assert bars.height > 97 * 20
    monkeypatch.setattr(polars_engine, "_BLOCK_ROWS", 97)
    assert compute_features(bars).equals(whole)


def test_row_order_does_not_change_the_output() -> None:
    bars = sim_bars(days=2, gap_rate=0.002, seed=4)
    in_order = compute_features(bars)
    shuffled = compute_features(bars.sample(fraction=1.0, shuffle=True, seed=1))
    assert shuffled.equals(in_order)
    # Sorted by time first and symbol second: the symbols interleave.
    assert compute_features(bars.sort("open_time", "symbol")).equals(in_order)


def test_symbols_computed_together_equal_symbols_computed_apart() -> None:
    bars = sim_bars(days=2, gap_rate=0.0, seed=6)
    together = compute_features(bars)
    apart = pl.concat(
        [compute_features(bars.filter(pl.col("symbol") == s)) for s in ("SIMA", "SIMB")]
    )
    assert_same_features(together, apart, rel=1e-12)


def test_a_400_bar_call_has_the_silver_columns_warm_up_and_targets() -> None:
    bars = sim_bars(days=1, gap_rate=0.0).filter(pl.col("symbol") == "SIMA").tail(400)
    features = compute_features(bars)
    assert features.columns == [*bars.columns, "segment", *FEATURE_AND_TARGET_COLUMNS]
    assert features.select(spec.FEATURE_COLUMNS).dtypes == [pl.Float64] * len(spec.FEATURE_COLUMNS)
    assert features.select(spec.TARGET_COLUMNS).dtypes == [
        pl.Float64,
        pl.Float64,
        pl.Int32,
    ] * len(spec.TARGET_HORIZONS_BARS)
    assert features["segment"].dtype == pl.Int64 and features["segment"].unique().to_list() == [1]
    head = features.head(spec.WARMUP_BARS).select(spec.FEATURE_COLUMNS)
    assert head.null_count().sum_horizontal().item() == head.height * head.width
    tail = features.tail(400 - spec.WARMUP_BARS).select(spec.FEATURE_COLUMNS).to_numpy()
    assert np.isfinite(tail).all()
    targets = features["target_close_10"]
    assert targets.tail(spec.HORIZON_BARS).null_count() == spec.HORIZON_BARS
    assert targets.head(400 - spec.HORIZON_BARS).null_count() == 0
    assert targets.head(5).to_list() == bars["close"].slice(spec.HORIZON_BARS, 5).to_list()
    assert_engines_agree(features)


@pytest.mark.parametrize("rows", [0, 1, spec.HORIZON_BARS, spec.WARMUP_BARS])
def test_frames_shorter_than_the_warm_up_have_no_features(rows: int) -> None:
    bars = sim_bars(days=1, gap_rate=0.0).filter(pl.col("symbol") == "SIMA").head(rows)
    features = compute_features(bars)
    assert features.height == rows
    assert features.columns == [*bars.columns, "segment", *FEATURE_AND_TARGET_COLUMNS]
    assert features.select(spec.FEATURE_COLUMNS).null_count().sum_horizontal().sum() == (
        rows * len(spec.FEATURE_COLUMNS)
    )
    assert features["target_close_10"].null_count() == rows - max(rows - spec.HORIZON_BARS, 0)


def test_no_window_reaches_past_the_warm_up() -> None:
    # The batch engine runs rolling windows over the whole sorted frame, across segments: a
    # kept value (past the warm-up) then reads bars of its own segment only.
    assert spec.LONGEST_WINDOW_BARS <= spec.WARMUP_BARS
